"""``gptoss serve`` under load and at its limits: big bodies, Nagle, the first event, shutdown.

Real sockets on loopback; no timing is asserted where the machine's load could decide it. Where
"the event loop is not blocked" is the claim, the work is held on purpose (a gate around the real
renderer) and the test checks that the loop still answers meanwhile: if the work ran on the loop,
the loop could not answer until the gate opened.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import threading
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from conftest import SERVED_MODEL as MODEL, launch_serve, start_server, stop_server  # noqa: E402
from gptoss_cli import serve  # noqa: E402
from gptoss_cli.engine import Engine  # noqa: E402


def root(url: str) -> str:
    return url.removesuffix("/v1")


def wait_idle(server, timeout=60):
    deadline = time.time() + timeout
    while (server.worker.busy is not None or server.worker.queue.qsize()) and time.time() < deadline:
        time.sleep(0.01)
    assert server.worker.busy is None


def raw_request(url: str, path: str, body: dict) -> socket.socket:
    """A raw socket that has sent a POST: a client we can read byte by byte, or drop."""
    host, port = re.match(r"http://([^:]+):(\d+)", url).groups()
    sock = socket.create_connection((host, int(port)))
    data = json.dumps(body).encode()
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def hold_engine(server, url: str) -> socket.socket:
    """A long stream that keeps the engine busy until its socket is closed."""
    sock = raw_request(url, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "Long."}],
                                                     "max_tokens": 1000, "stream": True})
    deadline = time.time() + 30
    while server.worker.busy is None and time.time() < deadline:
        time.sleep(0.005)
    assert server.worker.busy is not None
    return sock


# ---- 1: body size, work off the event loop ------------------------------------------------------


def test_a_body_over_max_body_gets_413_and_the_server_goes_on(served, client):
    server, url = served
    big = "word " * (server.max_body // 5 + 10)
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": big}], max_tokens=1)
    assert e.value.status_code == 413 and e.value.body["code"] == "request_too_large"
    assert "--max-body" in e.value.body["message"]

    def chunks():                                  # no Content-Length: counted as it arrives
        for _ in range(server.max_body // 65536 + 2):
            yield b"x" * 65536
    r = httpx.post(url + "/chat/completions", content=chunks(), timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    ok = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    assert ok.usage.completion_tokens == 1


def test_parsing_and_rendering_happen_off_the_event_loop(served, monkeypatch):
    """While a 3 MB request is being rendered (held at the renderer), /health answers and an open
    stream keeps streaming."""
    server, url = served
    wait_idle(server)
    entered, gate, real = threading.Event(), threading.Event(), serve.render_completion

    def held(conv, enc):
        if len(conv.messages[-1].content) > 1_000_000:
            entered.set()
            assert gate.wait(120)
        return real(conv, enc)
    monkeypatch.setattr(serve, "render_completion", held)
    stream = httpx.Client(timeout=60)
    result = {}

    def big():
        r = httpx.post(url + "/chat/completions", timeout=120, json={
            "model": MODEL, "messages": [{"role": "user", "content": "word " * 600_000}], "max_tokens": 1})
        result["big"] = r.status_code, r.json()
    try:
        with stream.stream("POST", url + "/chat/completions", json={
                "model": MODEL, "messages": [{"role": "user", "content": "go"}], "max_tokens": 600,
                "stream": True}) as s:
            lines = s.iter_lines()
            assert next(lines).startswith("data:")
            t = threading.Thread(target=big)
            t.start()
            assert entered.wait(60)
            health = httpx.get(root(url) + "/health", timeout=30)      # blocks forever if the loop is held
            assert health.status_code == 200 and health.json()["status"] == "ok"
            more = [x for x in (next(lines) for _ in range(10)) if x.startswith("data:")]
            assert len(more) >= 4                                     # the stream did not stall
            gate.set()
    finally:
        gate.set()
        stream.close()
    t.join(120)
    status, body = result["big"]
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"


# ---- 2: TCP_NODELAY ----------------------------------------------------------------------------


def test_every_connection_has_tcp_nodelay(served):
    """Nagle plus delayed ACKs hold a kept-alive reply's last segment ~40 ms: asyncio disables
    Nagle only on sockets made with IPPROTO_TCP, which ``bind`` now makes."""
    server, url = served
    with httpx.Client() as c:
        assert c.get(url + "/models").status_code == 200              # the connection stays open
        conns = list(server.uvicorn.server_state.connections)
        assert conns
        for conn in conns:
            sock = conn.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


# ---- 6: the first event comes with the first token ---------------------------------------------


def test_a_queued_stream_sends_nothing_until_its_first_token(served):
    server, url = served
    wait_idle(server)
    busy = hold_engine(server, url)
    queued = raw_request(url, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "q"}],
                                                       "max_tokens": 2, "stream": True})
    try:
        deadline = time.time() + 10
        while server.worker.queue.qsize() < 1 and time.time() < deadline:
            time.sleep(0.005)
        assert server.worker.queue.qsize() == 1
        queued.settimeout(1.0)
        with pytest.raises(socket.timeout):            # not even the headers while it waits
            queued.recv(1)
    finally:
        busy.close()
    queued.settimeout(60)
    data = b""
    while b"[DONE]" not in data:
        chunk = queued.recv(65536)
        assert chunk
        data += chunk
    queued.close()
    assert data.startswith(b"HTTP/1.1 200") and b'"role": "assistant"' in data


# ---- 3 and 9: shutdown, and how a stream ends when it cannot finish -----------------------------


def _read_sse(lines) -> list:
    out = []
    for line in lines:
        if line.startswith("data: "):
            out.append(line[6:] if line[6:] == "[DONE]" else json.loads(line[6:]))
    return out


def test_ctrl_c_ends_streams_refuses_the_queue_and_exits_in_one_line(tiny_hf_single):
    # one at a time, so that two requests queue behind the running one
    proc, _, url = launch_serve(tiny_hf_single, "--context", "8192", "--served-model-name", MODEL, "--parallel", "1")
    try:
        out = {}
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Go on."}], "max_tokens": 8000}
        began = threading.Event()

        def running():
            with httpx.stream("POST", url + "/chat/completions", json={**body, "stream": True}, timeout=60) as r:
                lines = r.iter_lines()
                first = next(lines)
                began.set()
                out["running"] = [json.loads(first[6:])] + _read_sse(lines)

        def queued(kind):
            extra = {"stream": True} if kind == "stream" else {}
            r = httpx.post(url + "/chat/completions", json={**body, "max_tokens": 5, **extra}, timeout=60)
            out[kind] = r.status_code, r.headers.get("content-type"), r.json()
        threads = [threading.Thread(target=running)]
        threads[0].start()
        assert began.wait(60)
        threads += [threading.Thread(target=queued, args=(k,)) for k in ("stream", "plain")]
        for t in threads[1:]:
            t.start()
        deadline = time.time() + 30
        while httpx.get(root(url) + "/health").json()["queued"] < 2:
            assert time.time() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        for t in threads:
            t.join(60)
        rest = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    events = out["running"]
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "shutting_down"
    assert all("choices" in e for e in events[:-2])
    for kind in ("stream", "plain"):
        status, ctype, err = out[kind]
        assert status == 503 and ctype == "application/json" and err["error"]["code"] == "shutting_down"
    assert rest.strip().splitlines() == ["gptoss serve: stopped · 1 running request ended · 2 queued requests refused"]


def test_a_responses_stream_that_cannot_finish_ends_with_response_failed(tiny_hf_single):
    from openai.types.responses import ResponseStreamEvent
    from pydantic import TypeAdapter

    engine = Engine.load(tiny_hf_single, device="cpu", dtype="float32", max_context=4096)
    server, uv, url = start_server(engine)
    try:
        client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=60)
        stream = client.responses.create(model=MODEL, input="Go on.", max_output_tokens=4000, stream=True)
        events = [next(stream) for _ in range(3)]
        server.begin_shutdown()                       # what Ctrl-C does first
        events += list(stream)
    finally:
        stop_server(server, uv)
    adapter = TypeAdapter(ResponseStreamEvent)
    for e in events:
        adapter.validate_python(e.model_dump())
    last = events[-1]
    assert last.type == "response.failed" and last.response.status == "failed"
    assert last.response.error.code == "server_error" and "shutting down" in last.response.error.message
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert all(e.type != "response.completed" for e in events)
