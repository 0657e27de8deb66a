"""Our own clients of OpenAI-compatible servers (``endpoint.py``, ``bench --endpoint``) against
what servers send: characters that ``str.splitlines`` splits on, CRLF line ends, 429 under load.

The SSE cases run against ``gptoss serve`` (a logit bias makes the model write U+2028, which it
escapes so that clients splitting lines as ``str.splitlines`` does read whole events) and against
a stand-in written with the standard library's HTTP server, for what ours never sends (CRLF,
U+0085, an event split across network reads).
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from typer.testing import CliRunner

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from conftest import SERVED_MODEL as MODEL, start_server, stop_server  # noqa: E402
from gptoss_cli.cli import app  # noqa: E402
from gptoss_cli.endpoint import Endpoint  # noqa: E402
from gptoss_cli.engine import Engine  # noqa: E402

ODD = "a\u2028b\u2029c\u0085d\u000be\u001cf"        # line separators for str.splitlines, not for SSE


class _StandIn(BaseHTTPRequestHandler):
    """A server that streams one chunk of ODD text, in pieces, with CRLF line ends."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _send(self, body: bytes, ctype: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send(json.dumps({"object": "list", "data": [{"id": "stand-in", "object": "model"}]}).encode(),
                   "application/json")

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        chunk = {"id": "x", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": ODD}}]}
        body = (b": a comment\r\n" + f"data: {json.dumps(chunk, ensure_ascii=False)}\r\n\r\n".encode()
                + b"data: [DONE]\r\n\r\n")
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        cut = body.index("\u2028".encode()) + 1              # inside the character's three bytes
        for piece in (body[:cut], body[cut:cut + 7], body[cut + 7:]):
            self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            self.wfile.flush()
            time.sleep(0.01)
        self.wfile.write(b"0\r\n\r\n")


def test_sse_events_keep_unicode_line_separators_from_a_stand_in():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _StandIn)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        ep = Endpoint(f"http://127.0.0.1:{httpd.server_address[1]}/v1")
        chunks = [c for _, c in ep.stream_chat({"messages": [{"role": "user", "content": "x"}]})]
        ep.close()
    finally:
        httpd.shutdown()
    assert [c["choices"][0]["delta"]["content"] for c in chunks] == [ODD]


def test_sse_events_keep_u2028_from_gptoss_serve(served):
    server, url = served
    sep = server.engine.tokenizer.encode_ordinary("\u2028")
    ep = Endpoint(url)
    # 136 tokens: random weights never close a header, so the last 8 come out as content
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 136, "temperature": 0,
            "logit_bias": {str(t): 100 for t in sep[:1]}}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for _, c in ep.stream_chat(body) if c.get("choices"))
    ep.close()
    assert text and set(text) == {"\u2028"}
    # a client that reads the stream with httpx's iter_lines (str.splitlines underneath) gets every
    # event whole: the server escapes U+2028 in its JSON, which decodes to the same text
    with httpx.stream("POST", url + "/chat/completions", json={**body, "model": MODEL, "stream": True},
                      timeout=120) as r:
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    events = [json.loads(d) for d in data[:-1]]
    assert data[-1] == "[DONE]"
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices")) == text


# 140 tokens: random weights never close a Harmony header, so text streams only after 128
def test_bench_retries_a_429_after_retry_after(tiny_hf_single, tmp_path):
    engine = Engine.load(tiny_hf_single, device="cpu", dtype="float32", max_context=8192)
    server, uv, url = start_server(engine, max_queue=1)
    try:
        hold = httpx.Client(timeout=120)
        with hold.stream("POST", url + "/chat/completions", json={
                "model": MODEL, "messages": [{"role": "user", "content": "Go on."}], "max_tokens": 8000, "stream": True}):
            out = tmp_path / "bench.json"
            result = {}
            bench = threading.Thread(target=lambda: result.setdefault("r", CliRunner().invoke(app, [
                "bench", "--endpoint", url, "--prompt-lens", "8", "--gen-tokens", "140", "--concurrency", "2",
                "--repeat", "1", "--warmup", "0", "--format", "json", "-o", str(out)])))
            bench.start()
            deadline = time.time() + 60                       # one waits in the queue, one is refused
            while server.metrics.requests.get(("/v1/chat/completions", 429), 0) < 1:
                assert time.time() < deadline and bench.is_alive()
                time.sleep(0.01)
        bench.join(120)                                       # the hold is gone: the retry gets in
    finally:
        hold.close()
        stop_server(server, uv)
    r = result["r"]
    assert r.exit_code == 0, r.output
    level = json.loads(out.read_text())["results"][0]
    assert level["retries_429"] >= 1 and level["completion_tokens"]["values"] == [140, 140]


def test_bench_reports_the_levels_it_finished_when_one_fails(served, tmp_path):
    _, url = served
    out = tmp_path / "bench.json"
    r = CliRunner().invoke(app, ["bench", "--endpoint", url, "--prompt-lens", "8,3000", "--gen-tokens", "140",
                                 "--concurrency", "1", "--repeat", "1", "--warmup", "0", "--format", "md",
                                 "-o", str(out)])
    assert r.exit_code == 1
    assert "| 8 |" in r.output and "INCOMPLETE: stopped at prompt 3000" in r.output
    assert "context_length_exceeded" in r.output or "context holds" in r.output
    assert "stopped at prompt 3000 · concurrency 1" in r.output and "Traceback" not in r.output
    assert "| 8 |" in out.read_text()
