"""Graders on hand-written model outputs, well-formed and malformed; no model involved."""

from __future__ import annotations

import json

import pytest
import torch

from gptoss_cli.errors import GptossError
from gptoss_cli.graders import Reply, extract_boxed, extract_choice, extract_numeric, grade, normalize_text


def final(text: str, **kw) -> Reply:
    return Reply(answer=text, **kw)


# ---- extraction ------------------------------------------------------------------------------


@pytest.mark.parametrize("text, boxed", [
    (r"so \boxed{42}", "42"),
    (r"\boxed{1} then \boxed{2}", "2"),                      # the last box wins
    (r"\boxed{\frac{3}{4}}", r"\frac{3}{4}"),               # nested braces
    (r"\fbox{7}", "7"),
    (r"\boxed{unclosed", None),
    ("no box", None),
])
def test_extract_boxed(text, boxed):
    assert extract_boxed(text) == boxed


@pytest.mark.parametrize("text, value", [
    (r"so \boxed{1,234}", 1234),
    ("It is 3/4, or 0.75 m.", 0.75),                          # the last number
    (r"\boxed{\frac{3}{4}}", 0.75),
    (r"\boxed{\dfrac{-1}{2}}", -0.5),
    (r"\boxed{x = 12}", 12),
    ("−5 degrees", -5),                                      # unicode minus
    ("about 2.5e3 units", 2500),
    ("$12.50", 12.5),
    (r"\boxed{45\%}", 45),
    ("no idea", None),
    (r"\boxed{}", None),
])
def test_extract_numeric(text, value):
    got, _ = extract_numeric(text)
    assert (got is None and value is None) or float(got) == pytest.approx(value)


@pytest.mark.parametrize("text, letter", [
    ("Answer: C", "C"),
    ("**Answer:** D", "D"),
    ("The answer is (B).", "B"),
    ("Final answer: option C", "C"),
    (r"\boxed{A}", "A"),
    (r"\boxed{\text{B}}", "B"),
    ("B", "B"),
    ("**C**", "C"),
    ("C) because the others are wrong", "C"),
    ("I first thought (A) ... no, actually (D)", "D"),      # a correction: the later one
    ("Answer: B\n\n(A) is tempting but wrong", "B"),         # an explicit declaration beats (A)
    ("A or B", None),                                         # undecided
    ("the answer is a trick question", None),                 # lower-case 'a' is an article
    ("", None),
])
def test_extract_choice(text, letter):
    assert extract_choice(text) == letter


def test_extract_choice_other_letters():
    assert extract_choice("Answer: E", "ABCDE") == "E"
    assert extract_choice("Answer: E", "ABCD") is None


def test_normalize_text():
    assert normalize_text("  **Paris.** ") == "paris"
    assert normalize_text('"New   York"') == "new york"


# ---- the graders -----------------------------------------------------------------------------


def test_exact():
    assert grade("exact", final("**Paris.**"), "Paris").correct
    assert grade("exact", final("paris"), ["Lyon", "Paris"]).correct
    g = grade("exact", final("Paris, France"), "Paris")
    assert not g.correct and g.extracted == "paris, france"


def test_numeric():
    g = grade("numeric", final(r"The total is \boxed{4020}."), "4020", {"integer": True})
    assert g.correct and g.extracted == 4020 and "boxed" in g.reason
    assert grade("numeric", final("so it is 7.62 cm"), "7.62", {"rel_tol": 1e-3}).correct
    assert grade("numeric", final("about 7.625"), "7.62", {"rel_tol": 1e-3}).correct
    assert not grade("numeric", final("about 7.7"), "7.62", {"rel_tol": 1e-3}).correct
    assert not grade("numeric", final(r"\boxed{12.5}"), "12", {"integer": True, "abs_tol": 1}).correct
    g = grade("numeric", final("I cannot compute that"), "12")
    assert not g.correct and g.extracted is None and "no number" in g.reason


def test_choice():
    g = grade("choice", final("Answer: C"), "C")
    assert g.correct and g.extracted == "C"
    g = grade("choice", final("Answer: A"), "C")
    assert not g.correct and g.reason == "wrong option"
    g = grade("choice", final("I am not sure."), "C")
    assert not g.correct and g.extracted is None


def test_answer_only_from_the_final_channel():
    # the right answer in the reasoning does not count; running out of tokens is said so
    g = grade("numeric", Reply(reasoning=r"\boxed{42}", stop_reason="length"), "42")
    assert not g.correct and "max-tokens" in g.reason
    # malformed output (no Harmony headers): the raw text is not an answer either
    g = grade("choice", Reply(raw="Answer: C"), "C")
    assert not g.correct and "not well-formed" in g.reason


WEATHER = {
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {
        "location": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["location"], "additionalProperties": False},
}


def call(arguments: str, recipient: str = "functions.get_weather") -> Reply:
    return Reply(tool_calls=[{"recipient": recipient, "arguments": arguments, "content_type": "<|constrain|>json"}])


def test_tool_call_valid():
    opts = {"tools": [WEATHER], "expected_arguments": {"location": "Tokyo"}}
    g = grade("tool_call", call('{"location": "Tokyo, Japan", "unit": "celsius"}'), "get_weather", opts)
    assert g.correct and g.extracted == {"location": "Tokyo, Japan", "unit": "celsius"}


@pytest.mark.parametrize("reply, reason", [
    (call('{"location": "Tokyo"'), "not JSON"),                                  # truncated JSON
    (call('["Tokyo"]'), "not a JSON object"),
    (call('{"unit": "celsius"}'), "'location' is a required property"),
    (call('{"location": "Tokyo", "unit": "kelvin"}'), "unit: 'kelvin' is not one of"),
    (call('{"location": 7}'), "location: 7 is not of type 'string'"),
    (call('{"location": "Tokyo", "when": "now"}'), "Additional properties"),
    (call('{"location": "Osaka"}'), "argument 'location' is 'Osaka'"),
    (call('{"location": "Tokyo"}', "functions.get_time"), "called 'functions.get_time'"),
    (Reply(answer="It is sunny in Tokyo."), "no tool call"),
    (Reply(raw="to=functions.get_weather {"), "not well-formed"),
])
def test_tool_call_bad(reply, reason):
    opts = {"tools": [WEATHER], "expected_arguments": {"location": "Tokyo"}}
    g = grade("tool_call", reply, "get_weather", opts)
    assert not g.correct
    assert reason in g.reason


def test_final_channel():
    assert grade("final_channel", final("Bonjour !"), "bonjour").correct
    assert grade("final_channel", final("Leaves fall, slowly"), None).correct
    cases = [
        (Reply(answer="hi", raw="<|channel|>nonsense"), "not well-formed"),
        (Reply(answer="yes", stop_reason="length"), "did not end with <|return|>"),
        (Reply(reasoning="thinking..."), "no final-channel answer"),
        (Reply(tool_calls=[{"recipient": "functions.x", "arguments": "{}"}]), "called a tool"),
        (Reply(answer="no"), "lacks the expected text"),
    ]
    for reply, reason in cases:
        g = grade("final_channel", reply, "yes")
        assert not g.correct and reason in g.reason, (reply, g)


def test_unknown_grader_and_bad_expected():
    with pytest.raises(GptossError, match="unknown grader"):
        grade("fuzzy", final("x"), "x")
    with pytest.raises(GptossError, match="not a number"):
        grade("numeric", final("12"), "twelve")


def test_grade_is_json_serialisable():
    g = grade("tool_call", call('{"location": "Tokyo"}'), "get_weather", {"tools": [WEATHER]})
    assert json.loads(json.dumps(g.to_dict()))["correct"] is True


# ---- hand-written Harmony output through the real path: ChatSession, StreamParser, grader -----


class ScriptedEngine:
    """Stands in for ``Engine``: 'generates' a fixed token sequence (a hand-written reply)."""

    def __init__(self, tokenizer, script: str):
        from gptoss_cli.engine import GenerationStats

        self.tokenizer = tokenizer
        self.script = tokenizer.encode(script, allowed_special="all")
        self.max_context, self.device = 4096, torch.device("cpu")
        self.last_stats = GenerationStats()

    def generate(self, tokens, max_new_tokens=256, temperature=1.0, top_p=1.0, stop_tokens=(), seed=None):
        from gptoss_cli.engine import GenerationStats

        self.last_stats = GenerationStats(prompt_tokens=len(tokens), stop_reason="length")
        for tok in self.script[:max_new_tokens]:
            yield tok
            if tok in set(stop_tokens):
                self.last_stats.stop_reason = "stop"
                return


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_full):
    from gptoss_cli.tokenizer import load_encoding

    return load_encoding(tiny_full)


A, F = "<|channel|>analysis<|message|>", "<|start|>assistant<|channel|>final<|message|>"
SCRIPTS = [  # (suite, hand-written reply, correct?, words in the reason)
    ("arithmetic", A + "30 times 134 is 4020.<|end|>" + F + r"\boxed{4020}<|return|>", True, "boxed"),
    ("arithmetic", A + r"so \boxed{4020}<|end|>" + F + "I am not sure.<|return|>", False, "no number"),
    ("arithmetic", A + r"it is \boxed{4020} and I keep thinking", False, "max-tokens"),
    ("arithmetic", r"The answer is \boxed{4020}.<|return|>", False, "not well-formed"),
    ("multiple-choice", A + "Sodium is Na.<|end|>" + F + "**Answer: A**<|return|>", True, "right option"),
    ("multiple-choice", "<|channel|>final<|message|>(B)<|return|>", False, "wrong option"),
    ("tool-calls", A + "Need the weather.<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather"
     ' <|constrain|>json<|message|>{"location": "Paris"}<|call|>', True, "valid call"),
    ("tool-calls", '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"location": "Paris"<|call|>',
     False, "not JSON"),
    ("tool-calls", "<|channel|>final<|message|>It is sunny in Paris.<|return|>", False, "no tool call"),
    ("final-channel", A + "Say yes.<|end|>" + F + "Yes.<|return|>", True, "final channel"),
    ("final-channel", A + "Say yes.<|end|>" + F + "Yes.<|end|>", False, "<|return|>"),
    ("final-channel", "<|channel|>final<|message|>Yes<|message|> again<|return|>", False, "not well-formed"),
]


@pytest.mark.parametrize("suite_name, script, correct, words", SCRIPTS)
def test_hand_written_replies_through_the_chat_path(tiny_tokenizer, suite_name, script, correct, words):
    from gptoss_cli.evals import run_sample
    from gptoss_cli.suites import load_suite

    suite = load_suite(suite_name, 0)
    problem = suite.problems[0]
    if suite_name == "arithmetic":
        problem.expected = "4020"
    sample = run_sample(ScriptedEngine(tiny_tokenizer, script), suite, problem, "low", 0, 1, 1.0, 40)
    assert sample["grade"]["correct"] is correct, sample
    assert words in sample["grade"]["reason"], sample["grade"]
