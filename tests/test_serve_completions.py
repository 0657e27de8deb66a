"""``/v1/completions``, logprobs on chat, vLLM's tokenizer endpoints, and lm-evaluation-harness.

The figures are checked against the engine itself: a prompt's log-probabilities from the server
(``echo``) are exactly ``Engine.prompt_logprobs`` of a second engine on the same checkpoint, and
their sum is exactly what ``gptoss eval``'s perplexity reports as the text's NLL. lm-evaluation-
harness runs a local multiple-choice task (a JSONL file, no hub) through ``local-completions``
against the server, and every log-likelihood it computed is checked the same way.
"""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from conftest import SERVED_CONTEXT as CONTEXT, SERVED_MODEL as MODEL  # noqa: E402
from gptoss_cli.cli import app  # noqa: E402
from gptoss_cli.engine import Engine  # noqa: E402

TEXT = ("The harbour was quiet that morning. Gulls circled the masts, and the fishermen mended their nets "
        "while the tide turned. Nobody spoke of the storm, though everyone had heard it in the night.")


@pytest.fixture(scope="module")
def reference(tiny_hf_single):
    """A second engine on the served checkpoint, for the figures the server must give."""
    return Engine.load(tiny_hf_single, device="cpu", dtype="float32", max_context=CONTEXT)


def test_completions_of_text_and_of_token_ids_streamed_or_not(client, reference):
    kw = dict(model=MODEL, max_tokens=8, temperature=0)
    full = client.completions.create(prompt="Once upon a time", **kw)
    c = full.choices[0]
    assert full.object == "text_completion" and c.finish_reason == "length" and full.usage.completion_tokens == 8
    assert full.usage.prompt_tokens == len(reference.tokenizer.encode_ordinary("Once upon a time"))
    streamed = list(client.completions.create(prompt="Once upon a time", stream=True,
                                              stream_options={"include_usage": True}, **kw))
    assert "".join(x.choices[0].text for x in streamed if x.choices) == c.text
    assert streamed[-1].usage.completion_tokens == 8
    ids = reference.tokenizer.encode_ordinary("Once upon a time")
    assert client.completions.create(prompt=ids, **kw).choices[0].text == c.text
    many = client.completions.create(prompt=["Once upon a time", ids], n=2, **kw)
    assert [x.index for x in many.choices] == [0, 1, 2, 3] and {x.text for x in many.choices} == {c.text}
    assert many.usage.completion_tokens == 32
    cut = client.completions.create(prompt="Once upon a time", stop=[c.text[3:6]], **kw)
    assert cut.choices[0].text == c.text[:3] and cut.choices[0].finish_reason == "stop"


def test_echo_gives_the_prompts_logprobs_as_eval_perplexity_computes_them(client, reference, tiny_hf_single, tmp_path):
    r = client.completions.create(model=MODEL, prompt=TEXT, echo=True, max_tokens=0, logprobs=3)
    lp = r.choices[0].logprobs
    ids = reference.tokenizer.encode_ordinary(TEXT)
    assert r.choices[0].text == TEXT and len(lp.tokens) == len(ids) and "".join(lp.tokens) == TEXT
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want, top_ids, top_lps = reference.prompt_logprobs(ids, top=3)
    assert lp.token_logprobs[1:] == want.tolist()                        # to the bit
    for got, i, v in zip(lp.top_logprobs[1:], top_ids.tolist(), top_lps.tolist()):
        names = [reference.tokenizer.decode([t]) for t in i]
        assert [got[n] for n in names] == v
    assert lp.text_offset == [len(reference.tokenizer.decode(ids[:k])) for k in range(len(ids))]

    text = tmp_path / "harbour.txt"
    text.write_text(TEXT)
    report = tmp_path / "ppl.json"
    run = CliRunner().invoke(app, ["eval", f"perplexity={text}", "--model", str(tiny_hf_single), "--device", "cpu",
                                   "--dtype", "float32", "--context", str(CONTEXT), "--ppl-window", "512",
                                   "-o", str(report)])
    assert run.exit_code == 0, run.output
    sample = json.loads(report.read_text())["samples"][0]
    assert sample["tokens"]["scored"] == len(ids) - 1
    assert -math.fsum(lp.token_logprobs[1:]) == pytest.approx(sample["nll"], rel=1e-12, abs=0)


def test_generated_tokens_logprobs_and_cached_decoding(client, served):
    """A prompt's figures never depend on what the cache held (each ``echo`` scores a fresh
    sequence); a reply decoded from a cached prompt is the reply decoded before; a generated
    token's logprob is the model's, as scoring the prompt and the reply gives it (decode and prefill
    differ in float rounding only)."""
    kw = dict(model=MODEL, prompt=TEXT, max_tokens=6, temperature=0, logprobs=2,
              extra_body={"return_tokens_as_token_ids": True})
    echo = dict(model=MODEL, prompt=TEXT, echo=True, max_tokens=0, logprobs=1)
    fresh = client.completions.create(**echo).choices[0].logprobs
    a = client.completions.create(**kw)
    assert client.completions.create(**echo).choices[0].logprobs == fresh     # the cache holds TEXT now
    client.completions.create(model=MODEL, prompt="Something else entirely.", max_tokens=3)
    b = client.completions.create(**kw)
    c = client.completions.create(**kw)                    # the whole prompt from the cache
    assert b.choices[0].logprobs == c.choices[0].logprobs and b.choices[0].text == a.choices[0].text
    lp = b.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx(a.choices[0].logprobs.token_logprobs, abs=1e-4)
    gen = [int(t.removeprefix("token_id:")) for t in lp.tokens]
    assert all(top[t] == lp.token_logprobs[k] == max(top.values()) for k, (t, top) in
               enumerate(zip(lp.tokens, lp.top_logprobs)))                # greedy: the top one
    prompt = served[0].engine.tokenizer.encode_ordinary(TEXT)
    scored = client.completions.create(model=MODEL, prompt=prompt + gen, echo=True, max_tokens=0, logprobs=0)
    assert scored.choices[0].logprobs.token_logprobs[-6:] == pytest.approx(lp.token_logprobs, abs=1e-4)


def test_chat_logprobs_cover_the_content_streamed_or_not(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Say hi."}], max_tokens=136, temperature=0,
              logprobs=True, top_logprobs=3)
    full = client.chat.completions.create(**kw)
    content = full.choices[0].message.content
    entries = full.choices[0].logprobs.content
    assert content and "".join(e.token for e in entries) == content
    for e in entries:
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token
        assert e.logprob == e.top_logprobs[0].logprob <= 0 and bytes(e.bytes).decode() == e.token
    chunks = list(client.chat.completions.create(**kw, stream=True))
    streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]
    two = client.chat.completions.create(**{**kw, "max_tokens": 3, "n": 2})
    assert [ch.index for ch in two.choices] == [0, 1] and two.usage.completion_tokens == 6


def test_tokenize_and_detokenize_as_vllm_has_them(served, client):
    server, url = served
    base = url.removesuffix("/v1")
    r = httpx.post(base + "/tokenize", json={"prompt": "Hello <|return|>", "add_special_tokens": False}).json()
    assert r["tokens"][-1] == 200002 and r["count"] == len(r["tokens"]) and r["max_model_len"] == CONTEXT
    assert httpx.post(base + "/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": "Hello <|return|>"}
    messages = [{"role": "user", "content": "Hi there"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
    rendered = next(j for j in server.worker.history if j.id == chat.id).prompt
    assert httpx.post(base + "/tokenize", json={"model": MODEL, "messages": messages}).json()["tokens"] == rendered
    info = httpx.get(base + "/tokenizer_info").json()
    assert info["eos_token"] == "<|return|>" and info["model_max_length"] == CONTEXT
    bad = httpx.post(base + "/detokenize", json={"tokens": [1, 10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


TASK = """task: tiny_sums
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}} Answer:"
doc_to_target: label
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def test_lm_eval_local_completions_runs_a_local_loglikelihood_task(served, reference, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = tmp_path / "sums.jsonl"
    rows = [{"question": f"What is {a} plus {b}?", "choices": [str(a + b), str(a + b + 1), str(a * b + 3)], "label": 0}
            for a, b in [(2, 3), (4, 5), (7, 2)]]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tiny_sums.yaml").write_text(TASK.format(data=data, cache=tmp_path / "datasets-cache"))
    _, url = served
    out = lm_eval.simple_evaluate(
        model="local-completions", tasks=["tiny_sums"], task_manager=TaskManager(include_path=str(tmp_path)),
        model_args=f"model={MODEL},base_url={url}/completions,tokenizer_backend=remote,max_length={CONTEXT}",
        log_samples=True)
    assert 0 <= out["results"]["tiny_sums"]["acc,none"] <= 1
    enc = reference.tokenizer
    samples = out["samples"]["tiny_sums"]
    assert len(samples) == 3
    for s in samples:
        for args, resp in zip(s["arguments"], s["resps"]):
            context, continuation = args                   # lm-eval moves the context's trailing space
            whole, ctx = enc.encode(context + continuation, allowed_special="all"), enc.encode(context, allowed_special="all")
            logprobs, _, _ = reference.prompt_logprobs(whole)
            assert float(resp[0][0]) == sum(logprobs[len(ctx) - 1:].tolist())
