"""Sampling parameters and ``tool_choice`` through ``gptoss serve``, with the official client.

The model is random, so each parameter is shown to act by what it must do whatever the weights:
top_k=1 and min_p=1 leave only the most likely token (the greedy reply, at any temperature and
seed); a large logit bias makes one token win every step; penalties make a token the bias
favours come back far less often; ``tool_choice`` makes the reply a call. Replies of 20 tokens
never close a Harmony header on random weights, so ``harmony.raw`` holds their text.
"""

from __future__ import annotations

import re

import pytest

openai = pytest.importorskip("openai")

from conftest import SERVED_MODEL as MODEL  # noqa: E402
from gptoss_cli.harmony import CALL_ID, END_ID  # noqa: E402

USER = [{"role": "user", "content": "hi"}]
TOOLS = [{"type": "function", "function": {"name": name, "description": f"The {what}.",
                                           "parameters": {"type": "object", "properties": {}}}}
         for name, what in (("get_weather", "weather"), ("get_time", "time"))]


def raw(client, **kw) -> str:
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=20, **kw)
    assert r.usage.completion_tokens == 20 and r.harmony["malformed"] == ["output ended inside a message header"]
    return r.harmony["raw"]


def test_top_k_1_and_min_p_1_sample_the_greedy_reply(client):
    greedy = raw(client, temperature=0)
    assert raw(client, temperature=1.0, seed=5) != greedy                 # sampling does sample
    assert raw(client, temperature=1.0, seed=5, extra_body={"top_k": 1}) == greedy
    assert raw(client, temperature=1.5, seed=6, extra_body={"min_p": 1.0}) == greedy


def test_logit_bias_and_penalties_act_on_the_reply(served, client):
    hi = served[0].engine.tokenizer.encode_ordinary(" hi")[0]
    assert raw(client, temperature=0, logit_bias={str(hi): 100}) == " hi" * 20

    def count(**kw):
        return len(re.findall(r" hi(?![A-Za-z])", raw(client, temperature=0, logit_bias={str(hi): 5}, **kw)))
    plain = count()
    assert plain >= 8                                   # the bias makes " hi" come back often...
    for kw in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"extra_body": {"repetition_penalty": 2.0}}):
        assert count(**kw) <= plain // 3, kw            # ...and each penalty pushes it away


def _forced(client, tool_choice, **kw):
    # The bias makes the random model close its reasoning at once and end a call as soon as it may
    # (<|end|> and <|call|> are otherwise as unlikely as any token): the choice of header is its own.
    bias = {str(END_ID): 30, str(CALL_ID): 30}
    return client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice=tool_choice,
                                          max_tokens=300, temperature=1.0, logit_bias=bias, **kw)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_tool_choice_required_or_named_makes_the_reply_a_call(client, seed):
    named = _forced(client, {"type": "function", "function": {"name": "get_time"}}, seed=seed)
    choice = named.choices[0]
    assert choice.finish_reason == "tool_calls" and [c.function.name for c in choice.message.tool_calls] == ["get_time"]
    required = _forced(client, "required", seed=seed)
    assert required.choices[0].finish_reason == "tool_calls"
    assert required.choices[0].message.tool_calls[0].function.name in ("get_weather", "get_time")
    free = _forced(client, "auto", seed=seed)                              # not enforced: no call
    assert free.choices[0].message.tool_calls is None and free.choices[0].finish_reason != "tool_calls"


def test_tool_choice_is_enforced_when_streaming_and_on_responses(client):
    stream = _forced(client, {"type": "function", "function": {"name": "get_weather"}}, seed=4, stream=True)
    chunks = list(stream)
    names = [tc.function.name for c in chunks for tc in (c.choices[0].delta.tool_calls or []) if tc.function.name]
    assert names == ["get_weather"] and chunks[-1].choices[0].finish_reason == "tool_calls"
    tools = [{"type": "function", **t["function"]} for t in TOOLS]
    r = client.responses.create(model=MODEL, input="hi", tools=tools, tool_choice={"type": "function", "name": "get_time"},
                                max_output_tokens=300, temperature=1.0, extra_body={"seed": 4, "logit_bias": {
                                    str(END_ID): 30, str(CALL_ID): 30}})
    calls = [o for o in r.output if o.type == "function_call"]
    assert [c.name for c in calls] == ["get_time"]


def test_what_cannot_be_honoured_is_refused_with_the_field_named(client):
    for kw, param in [({"store": True}, "store"), ({"background": True}, "background"),
                      ({"include": ["message.output_text.logprobs"]}, "include"), ({"truncation": "auto"}, "truncation"),
                      ({"extra_body": {"top_logprobs": 2}}, "top_logprobs"),
                      ({"tool_choice": "required"}, "tool_choice")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(model=MODEL, input="hi", **kw)
        assert e.value.body["param"] == param, kw
