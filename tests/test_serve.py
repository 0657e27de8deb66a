"""``gptoss serve`` through a real socket, with the official ``openai`` client; ``--endpoint``.

One server per module (``served`` in conftest.py: uvicorn in a background thread, the tiny random
checkpoint, a free loopback port). The model is noise, so what is checked is the machinery: the wire formats the SDK parses,
what a request renders to (against openai-harmony, the reference renderer), the queue (order,
429, a client that goes away), errors, and that eval over the endpoint gives the in-process report.
How a reply with reasoning and tool calls maps out is checked on real Harmony tokens of such a
reply, fed through the same ``ReplyBuilder`` the server runs, and validated with the SDK's types.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time

import pytest
from typer.testing import CliRunner

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from gptoss_cli.cli import app  # noqa: E402
from gptoss_cli.harmony import Message, render_message  # noqa: E402
from gptoss_cli.serve import bind  # noqa: E402
from gptoss_cli.serve_api import ChatChunks, Done, ReplyBuilder, chat_completion  # noqa: E402
from gptoss_cli.serve_responses import ResponseEvents  # noqa: E402

from conftest import SERVED_CONTEXT as CONTEXT, SERVED_MODEL as MODEL, launch_serve  # noqa: E402

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.", "parameters": WEATHER}}]


def job(server, rid):
    return next(j for j in server.worker.history if j.id == rid)


def wait_idle(server, timeout=30):
    deadline = time.time() + timeout
    while (server.worker.busy is not None or server.worker.queue.qsize()) and time.time() < deadline:
        time.sleep(0.01)
    assert server.worker.busy is None


# ---- chat completions ---------------------------------------------------------------------------


def test_models_and_health(served, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(served[1].removesuffix("/v1") + "/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL


# Random weights never close a Harmony header: past 128 tokens the parser gives up on it and the
# rest streams as content. LONG tokens give a reply with text in it.
LONG = 136


def test_chat_non_streaming_and_streaming_agree(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Say hi."}], max_tokens=LONG, temperature=0, seed=1)
    full = client.chat.completions.create(**kw)
    choice = full.choices[0]
    assert full.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason == "length" and full.usage.completion_tokens == LONG
    assert choice.message.content and full.harmony["malformed"] == ["no <|message|> after a long header"]
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == LONG
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) > 1 and "".join(deltas) == choice.message.content
    # greedy twice: the same tokens, the second prompt entirely from the cache but its last token
    assert chunks[-1].harmony == full.harmony
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= full.usage.prompt_tokens - 1

    # a stop string in the middle of that text ends the reply just before it, across token pieces
    text = choice.message.content
    stop = text[len(text) // 2:len(text) // 2 + 4]
    cut = client.chat.completions.create(**kw, stop=[stop, "\u2603never"])
    assert cut.choices[0].message.content == text[:text.find(stop)]
    assert cut.choices[0].finish_reason == "stop" and cut.usage.completion_tokens < LONG


def test_follow_up_turn_reuses_the_cached_prefix(client):
    first = [{"role": "user", "content": "Name a colour."}]
    a = client.chat.completions.create(model=MODEL, messages=first, max_tokens=3, temperature=0)
    follow = first + [{"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"}]
    b = client.chat.completions.create(model=MODEL, messages=follow, max_tokens=3, temperature=0)
    cached = b.usage.prompt_tokens_details.cached_tokens
    assert cached >= a.usage.prompt_tokens - 1 and b.usage.prompt_tokens > a.usage.prompt_tokens


def test_tool_round_trip_and_effort_render_like_the_reference(served, client, harmony_oracle):
    oh = pytest.importorskip("openai_harmony")
    server, _ = served
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "reasoning_content": "Need the tool.",
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 3}'},
    ]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, reasoning_effort="high",
                                       max_tokens=2, temperature=0,
                                       extra_body={"chat_template_kwargs": {"current_date": "2025-08-05"}})
    assert r.choices[0].finish_reason in ("length", "stop", "tool_calls")
    system = oh.SystemContent.new().with_reasoning_effort(oh.ReasoningEffort.HIGH).with_conversation_start_date("2025-08-05")
    developer = oh.DeveloperContent.new().with_instructions("Be brief.").with_function_tools(
        [oh.ToolDescription.new("get_weather", "Weather in a city.", WEATHER)])
    ref = oh.Conversation.from_messages([
        oh.Message.from_role_and_content(oh.Role.SYSTEM, system),
        oh.Message.from_role_and_content(oh.Role.DEVELOPER, developer),
        oh.Message.from_role_and_content(oh.Role.USER, "Weather in Oslo?"),
        oh.Message.from_role_and_content(oh.Role.ASSISTANT, "Need the tool.").with_channel("analysis"),
        oh.Message.from_role_and_content(oh.Role.ASSISTANT, '{"city":"Oslo"}').with_channel("commentary")
          .with_recipient("functions.get_weather").with_content_type("<|constrain|>json"),
        oh.Message.from_author_and_content(oh.Author.new(oh.Role.TOOL, "functions.get_weather"), '{"temp": 3}')
          .with_channel("commentary").with_recipient("assistant"),
    ])
    want = harmony_oracle.render_conversation_for_completion(ref, oh.Role.ASSISTANT)
    got = job(server, r.id).prompt
    assert harmony_oracle.decode(got) == harmony_oracle.decode(want)
    assert got == want
    assert "Reasoning: high" in harmony_oracle.decode(got)


def test_reply_with_reasoning_and_a_tool_call_maps_to_what_the_sdk_reads(served):
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    server, _ = served
    enc = server.engine.tokenizer
    turn = (render_message(Message("assistant", "Check the weather.", channel="analysis"), enc)
            + render_message(Message("assistant", '{"city":"Oslo"}', channel="commentary",
                                     recipient="functions.get_weather", content_type="<|constrain|>json"), enc))
    reply = turn[1:]                    # the prompt already opened <|start|>
    builder, chunks = ReplyBuilder(enc), ChatChunks("chatcmpl-x", MODEL)
    streamed = [chunks.of(d) for tok in reply for d in builder.feed(tok)] + [chunks.of(d) for d in builder.finish()]
    full = ChatCompletion.model_validate(chat_completion("chatcmpl-x", MODEL, [Done(builder, "stop", 10, 0)]))
    msg = full.choices[0].message
    assert full.choices[0].finish_reason == "tool_calls" and msg.content is None
    assert msg.reasoning_content == "Check the weather."
    assert [(c.function.name, c.function.arguments) for c in msg.tool_calls] == [("get_weather", '{"city":"Oslo"}')]
    assert full.usage.completion_tokens == len(reply) and full.harmony["tool_calls"][0]["content_type"] == "<|constrain|>json"
    parsed = [ChatCompletionChunk.model_validate(c).choices[0].delta for c in streamed]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in parsed) == "Check the weather."
    assert "".join(d.tool_calls[0].function.arguments or "" for d in parsed if d.tool_calls) == '{"city":"Oslo"}'

    answer = (render_message(Message("assistant", "Think.", channel="analysis"), enc)[1:]
              + render_message(Message("assistant", "It is 3 degrees. END more", channel="final"), enc))
    b = ReplyBuilder(enc, stops=["END"])
    [b.feed(t) for t in answer], b.finish()
    assert "".join(b.content) == "It is 3 degrees. " and b.stop_hit

    from openai.types.responses import Response, ResponseStreamEvent
    from pydantic import TypeAdapter

    events = ResponseEvents("resp_x", MODEL, {"input": "x"}, 10)
    b2 = ReplyBuilder(enc)
    stream = events.start() + [e for t in answer + turn for d in b2.feed(t) for e in events.add(d)]
    stream += [e for d in b2.finish() for e in events.add(d)] + events.finish(Done(b2, "stop", 10, 0))
    adapter = TypeAdapter(ResponseStreamEvent)
    kinds = [type(adapter.validate_python(e)).__name__ for e in stream]
    assert kinds[0] == "ResponseCreatedEvent" and kinds[-1] == "ResponseCompletedEvent"
    assert {"ResponseReasoningTextDeltaEvent", "ResponseTextDeltaEvent",
            "ResponseFunctionCallArgumentsDeltaEvent"} <= set(kinds)
    resp = Response.model_validate(events.response)
    assert [o.type for o in resp.output] == ["reasoning", "message", "reasoning", "function_call"]
    assert resp.output_text == "It is 3 degrees. END more" and resp.usage.output_tokens_details.reasoning_tokens > 0


# ---- the responses API ------------------------------------------------------------------------


def test_responses_non_streaming_and_streaming(served, client):
    kw = dict(model=MODEL, instructions="Be brief.", reasoning={"effort": "low"}, max_output_tokens=LONG, temperature=0)
    r = client.responses.create(input="Hello", **kw)
    assert r.object == "response" and r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == LONG and r.output_text and [o.type for o in r.output] == ["message"]
    assert "Reasoning: low" in served[0].engine.tokenizer.decode(job(served[0], r.id).prompt)
    events = list(client.responses.create(input=[{"role": "user", "content": "Hello"}], stream=True, **kw))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-1] == "response.incomplete" and [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text
    assert events[-1].response.output_text == r.output_text


# ---- the queue -------------------------------------------------------------------------------


def test_eight_concurrent_clients_are_all_answered_in_order(served, client):
    server, url = served
    wait_idle(server)
    results, threads = {}, []

    def ask(i):
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"client {i}"}],
                                           max_tokens=2, temperature=0)
        results[i] = r.id

    busy = _open_stream(url, {"model": MODEL, "messages": [{"role": "user", "content": "Long."}],
                              "max_tokens": 900, "stream": True})
    while server.worker.busy is None:
        time.sleep(0.005)
    for i in range(8):                   # all 8 wait together; each sends once the one before is queued
        threads.append(threading.Thread(target=ask, args=(i,)))
        threads[-1].start()
        deadline = time.time() + 10
        while server.worker.queue.qsize() < i + 1:
            assert time.time() < deadline
            time.sleep(0.002)
    busy.close()
    for t in threads:
        t.join(60)
    assert sorted(results) == list(range(8))
    served_order = [j.id for j in server.worker.history if j.id in results.values()]
    assert served_order == [results[i] for i in range(8)]


def _open_stream(url, body):
    """A raw socket sending a streaming request: the client we can drop at will."""
    host, port = re.match(r"http://([^:]+):(\d+)", url).groups()
    sock = socket.create_connection((host, int(port)))
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


@pytest.mark.parametrize("stream", [True, False])
def test_client_that_disconnects_frees_the_engine_within_one_token(served, client, stream):
    server, url = served
    wait_idle(server)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Go on forever."}], "max_tokens": 900,
            "temperature": 0, "stream": stream}
    sock = _open_stream(url, body)
    deadline = time.time() + 30
    while (server.worker.busy is None or server.worker.busy.generated < 5) and time.time() < deadline:
        time.sleep(0.005)
    running = server.worker.busy
    sock.close()
    wait_idle(server)
    assert running.outcome == "cancelled" and running.generated_at_cancel is not None
    assert running.generated <= running.generated_at_cancel + 1 < 900
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Still there?"}], max_tokens=1)
    assert r.usage.completion_tokens == 1                    # the engine serves the next request


def test_full_queue_answers_429_with_retry_after(served, client):
    server, url = served
    wait_idle(server)
    long = _open_stream(url, {"model": MODEL, "messages": [{"role": "user", "content": "Long."}],
                              "max_tokens": 900, "stream": True})
    while server.worker.busy is None:
        time.sleep(0.005)
    waiting = [threading.Thread(target=client.chat.completions.create,
                                kwargs=dict(model=MODEL, messages=[{"role": "user", "content": "q"}], max_tokens=1))
               for _ in range(7)]
    for t in waiting:
        t.start()
    leaver = _open_stream(url, {"model": MODEL, "messages": [{"role": "user", "content": "I leave."}], "max_tokens": 50})
    while server.worker.queue.qsize() < 8:
        time.sleep(0.005)
    r = httpx.post(url + "/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["type"] == "rate_limit_error"
    leaver.close()                                 # goes away while queued: never decoded
    time.sleep(0.2)
    long.close()
    for t in waiting:
        t.join(60)
    wait_idle(server)
    left = next(j for j in server.worker.history if j.req.conversation.messages[-1].content == "I leave.")
    assert left.outcome == "cancelled" and left.generated == 0


# ---- errors --------------------------------------------------------------------------------


def test_bad_requests_get_error_objects_and_the_server_keeps_serving(served, client):
    _, url = served
    r = httpx.post(url + "/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "x"}])
    user = [{"role": "user", "content": "x"}]
    for kw, param in [({"temperature": 5}, "temperature"), ({"top_p": 0}, "top_p"), ({"max_tokens": 0}, "max_tokens"),
                      ({"n": 17}, "n"), ({"reasoning_effort": "extreme"}, "reasoning_effort"),
                      ({"messages": []}, "messages"), ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0]"),
                      ({"presence_penalty": 3}, "presence_penalty"), ({"frequency_penalty": -2.5}, "frequency_penalty"),
                      ({"logit_bias": {"999999": 1}}, "logit_bias"), ({"logit_bias": {"5": 101}}, "logit_bias"),
                      ({"top_logprobs": 3}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                      ({"store": True}, "store"), ({"tool_choice": "required"}, "tool_choice"),
                      ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
                      ({"extra_body": {"top_k": -2}}, "top_k"), ({"extra_body": {"min_p": 1.5}}, "min_p"),
                      ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
                      ({"extra_body": {"min_tokens": 5}}, "min_tokens"),
                      ({"extra_body": {"response_format": {"type": "json_object"}}}, "response_format")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**{"model": MODEL, "messages": user, **kw})
        assert e.value.body["param"] == param, kw
    with pytest.raises(openai.BadRequestError, match="context holds 1024") as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 1200}])
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        client.responses.create(model=MODEL, input="x", previous_response_id="resp_1")
    assert httpx.get(url + "/nothing").status_code == 404
    r = client.chat.completions.create(model=MODEL, messages=user, max_tokens=1)
    assert r.usage.completion_tokens == 1


# ---- the command line ------------------------------------------------------------------------


def test_serve_command_says_where_it_listens_and_wants_the_api_key(tiny_hf_single):
    proc, startup, url = launch_serve(tiny_hf_single, "--context", "256", "--api-key", "sekrit")
    try:
        assert "127.0.0.1" in startup and str(tiny_hf_single) in startup and "RANDOM weights" in startup
        assert "cpu" in startup and "API key required" in startup
        r = httpx.get(url + "/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        ok = openai.OpenAI(base_url=url, api_key="sekrit", max_retries=0)
        assert ok.chat.completions.create(model=str(tiny_hf_single), messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=1).usage.completion_tokens == 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
        denied = CliRunner().invoke(app, ["eval", "arithmetic", "--limit", "1", "--endpoint", url])
        assert denied.exit_code == 1 and "answered 401" in denied.output and "pass --api-key" in denied.output
    finally:
        proc.terminate()
        proc.wait(20)


def test_serve_on_a_busy_port_is_one_line(tiny_hf_single):
    taken = bind("127.0.0.1", 0)
    try:
        result = CliRunner().invoke(app, ["serve", "--model", str(tiny_hf_single), "--port", str(taken.getsockname()[1])])
    finally:
        taken.close()
    assert result.exit_code == 1 and "cannot listen on 127.0.0.1" in result.output


# ---- eval and bench against the endpoint -----------------------------------------------------


def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in ("seconds", "tokens_per_s")}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def test_eval_over_the_endpoint_gives_the_in_process_report(served, tiny_hf_single, tmp_path):
    _, url = served
    common = ["arithmetic", "tool-calls", "--limit", "2", "--max-tokens", "3", "--temperature", "0", "--effort", "low"]
    local, remote = tmp_path / "local.json", tmp_path / "remote.json"
    a = CliRunner().invoke(app, ["eval", *common, "--model", str(tiny_hf_single), "--device", "cpu",
                                 "--dtype", "float32", "--context", str(CONTEXT), "-o", str(local)])
    b = CliRunner().invoke(app, ["eval", *common, "--endpoint", url.removesuffix("/v1"), "-o", str(remote)])
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    ra, rb = json.loads(local.read_text()), json.loads(remote.read_text())
    assert _strip(rb["samples"]) == _strip(ra["samples"]) and _strip(rb["scores"]) == _strip(ra["scores"])
    assert rb["settings"]["endpoint"] == url and rb["settings"]["model"] == MODEL
    assert rb["runtime"]["endpoint"] == url and rb["random_weights"] is True
    assert "endpoint " + url in b.output
    bad = CliRunner().invoke(app, ["eval", "perplexity", "--endpoint", url])
    assert bad.exit_code == 1 and "cannot run against --endpoint" in bad.output


def test_bench_over_the_endpoint_reports_client_side_figures(served, tmp_path):
    _, url = served
    out = tmp_path / "bench.json"
    # 140 tokens: random weights never close a Harmony header, so text streams only after 128
    r = CliRunner().invoke(app, ["bench", "--endpoint", url, "--prompt-lens", "8", "--gen-tokens", "140",
                                 "--concurrency", "1,2", "--repeat", "1", "--warmup", "0", "--format", "json",
                                 "-o", str(out)])
    assert r.exit_code == 0, r.output
    result = json.loads(out.read_text())
    assert result["endpoint"] == url and result["model"]["id"] == MODEL and result["model"]["random_weights"]
    assert [(x["concurrency"], x["gen_tokens"]) for x in result["results"]] == [(1, 140), (2, 140)]
    for x in result["results"]:
        assert x["completion_tokens"]["values"] == [140] * x["concurrency"]
        assert x["ttft_ms"]["mean"] > 0 and x["itl_p50_ms"]["mean"] > 0 and x["total_tok_s"]["mean"] > 0
        assert len(x["ttft_ms"]["values"]) == x["concurrency"]


def test_a_reply_without_the_harmony_field_is_read_from_the_standard_fields():
    from gptoss_cli.endpoint import reply_of

    vllm_like = {"choices": [{"finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": None, "reasoning_content": "Use the tool.",
        "tool_calls": [{"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]}}],
        "usage": {"prompt_tokens": 90, "completion_tokens": 20, "completion_tokens_details": {"reasoning_tokens": 8}}}
    fields, tokens = reply_of(vllm_like)
    assert fields == {"answer": "", "reasoning": "Use the tool.", "raw": "", "malformed": [], "stop_reason": "stop",
                      "tool_calls": [{"recipient": "functions.get_weather", "arguments": '{"city":"Oslo"}',
                                      "content_type": None}]}
    assert tokens == {"prompt": 90, "reasoning": 8, "answer": 12, "generated": 20}
    fields, _ = reply_of({"choices": [{"finish_reason": "length", "message": {"content": "4", "reasoning": "2+2"}}]})
    assert (fields["answer"], fields["reasoning"], fields["stop_reason"]) == ("4", "2+2", "length")


def test_endpoint_problems_are_one_line(served):
    _, url = served
    free = bind("127.0.0.1", 0)
    port = free.getsockname()[1]
    free.close()
    for args, says in [(["--endpoint", f"http://127.0.0.1:{port}/v1"], "cannot reach"),
                       (["--endpoint", "ftp://x"], "is not an http(s) URL"),
                       (["--endpoint", url, "--served-model", "other"], "does not serve 'other'")]:
        r = CliRunner().invoke(app, ["eval", "arithmetic", "--limit", "1", *args])
        assert r.exit_code == 1 and says in r.output and "Traceback" not in r.output, r.output
