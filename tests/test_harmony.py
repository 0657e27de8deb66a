"""Harmony rendering and streaming parsing, token for token against OpenAI's openai-harmony."""

from __future__ import annotations

import itertools
import json
import math
import random
import struct

import pytest

from gptoss_cli.errors import GptossError
from gptoss_cli.harmony import (
    STOP_TOKEN_IDS, Conversation, FunctionTool, Malformed, Message, MessageEnd, MessageStart,
    Stop, StreamParser, TextDelta, history_after_reply, render_completion, render_message,
)
from gptoss_cli.harmony_tools import rust_json

oh = pytest.importorskip("openai_harmony")

WEATHER = FunctionTool(
    "get_weather", "Gets the current weather in the provided location.",
    {"type": "object", "properties": {
        "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
        "format": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"}},
     "required": ["location"]},
)
NO_ARGS = FunctionTool("get_time", "Current time.\nUTC only.")


def to_oracle(conv: Conversation) -> "oh.Conversation":
    """The same conversation in openai-harmony's types."""
    effort = oh.ReasoningEffort(conv.reasoning_effort.title())
    system = oh.SystemContent.new().with_reasoning_effort(effort)
    system.model_identity = conv.model_identity
    system.knowledge_cutoff = conv.knowledge_cutoff
    system.conversation_start_date = conv.current_date
    messages = [oh.Message.from_role_and_content(oh.Role.SYSTEM, system)]
    if conv.developer_instructions is not None or conv.tools:
        developer = oh.DeveloperContent.new()
        if conv.developer_instructions is not None:
            developer = developer.with_instructions(conv.developer_instructions)
        if conv.tools:
            developer = developer.with_function_tools(
                [oh.ToolDescription.new(t.name, t.description, t.parameters) for t in conv.tools])
        messages.append(oh.Message.from_role_and_content(oh.Role.DEVELOPER, developer))
    for m in conv.messages:
        messages.append(oh.Message(
            author=oh.Author(role=oh.Role(m.role), name=m.name), content=[oh.TextContent(text=m.content)],
            channel=m.channel, recipient=m.recipient, content_type=m.content_type))
    return oh.Conversation.from_messages(messages)


def assert_renders_like_oracle(conv, enc, oracle):
    ours = render_completion(conv, enc)
    ref = oracle.render_conversation_for_completion(to_oracle(conv), oh.Role.ASSISTANT)
    assert enc.decode(ours) == oracle.decode(ref)  # readable diff first
    assert ours == ref


# ---- rendering ---------------------------------------------------------------------------------

def user(text):
    return Message("user", text)


def analysis(text):
    return Message("assistant", text, channel="analysis")


def final(text):
    return Message("assistant", text, channel="final")


def call(args, name="get_weather", content_type="<|constrain|>json"):
    return Message("assistant", args, "commentary", f"functions.{name}", content_type)


def result(output, name="get_weather"):
    return Message.tool_result(f"functions.{name}", output)


SHAPES = {
    "empty": [],
    "single": [user("What is 2+2?")],
    "multi_turn": [user("Hi"), analysis("User greets."), final("Hello!"), user("How are you?")],
    "two_earlier_analyses": [user("a"), analysis("t1"), final("A1"), user("b"), analysis("t2"),
                             final("B1"), user("c")],
    "analysis_pending": [user("Think"), analysis("Still thinking...")],
    "tool_call_pending": [user("Weather in Paris?"), analysis("Need weather."),
                          call('{"location":"Paris"}'), result('{"temp": 21}')],
    "tool_chain_done": [user("Weather in Paris?"), analysis("Need weather."),
                        call('{"location":"Paris"}'), result('{"temp": 21}'), analysis("Answer."),
                        final("21 °C in Paris."), user("And Rome?")],
    "preamble_and_plain_json": [user("Check"), Message("assistant", "Let me check.", "commentary"),
                                call("{}", "get_time", "json"), result("12:00", "get_time")],
    "unicode": [user("Héllo 你好 🎉 👩\u200d👩\u200d👧 e\u0301 \u200b ＦＵＬＬ"), analysis("∑ Ω ≈ √"),
                final("Ça va? مرحبا 🇫🇷"), user("literal <|end|> and <|start|> text\r\n\t  ")],
    "named_user_and_empty": [Message("user", "", name="alice"), final(""), user(" ")],
    "empty_author_names": [Message("user", "hi", name=""), Message("assistant", "a", "final", name=""),
                           Message("user", "ok", name="bob")],
}


def _render_cases():
    cases = []
    for effort, instructions, (shape, messages) in itertools.product(
            ("low", "medium", "high"), (None, "Answer in French.\nBe brief."), SHAPES.items()):
        tools = [WEATHER, NO_ARGS] if "tool" in shape or "preamble" in shape or effort == "high" else []
        conv = Conversation(list(messages), current_date="2025-08-05", reasoning_effort=effort,
                            developer_instructions=instructions, tools=tools)
        cases.append(pytest.param(conv, id=f"{effort}-{'dev' if instructions else 'nodev'}-{shape}"))
    return cases


@pytest.mark.parametrize("conv", _render_cases())
def test_render_equals_openai_harmony(conv, o200k_encoding, harmony_oracle):
    assert_renders_like_oracle(conv, o200k_encoding, harmony_oracle)


@pytest.mark.parametrize("settings", [
    {"model_identity": "You are a terse assistant."}, {"model_identity": None},
    {"knowledge_cutoff": None}, {"current_date": None}, {"developer_instructions": ""},
    {"model_identity": None, "knowledge_cutoff": None, "current_date": None},
], ids=lambda s: "-".join(f"{k}={v!r}" for k, v in s.items()))
def test_render_system_settings(settings, o200k_encoding, harmony_oracle):
    conv = Conversation([user("hi")], **{"current_date": "2025-01-31", **settings})
    assert_renders_like_oracle(conv, o200k_encoding, harmony_oracle)


SCHEMAS = {
    "nested_object_array": {"type": "object", "description": "Search options", "properties": {
        "query": {"type": "string", "title": "Query", "examples": ["cats", "dogs"]},
        "filters": {"type": "object", "description": "Narrow it", "properties": {
            "tags": {"type": "array", "items": {"type": "string"}},
            "since": {"type": "integer", "nullable": True, "default": 2020}}, "required": ["tags"]},
        "limit": {"type": "number", "default": 10.5}, "exact": {"type": "boolean", "default": False},
        "any": {}, "list": {"type": "array"}, "objects": {"type": "array", "items": {
            "type": "object", "properties": {"id": {"type": "integer"}}}}},
        "required": ["query", "filters"]},
    "enums_and_defaults": {"type": "object", "properties": {
        "unit": {"type": "string", "enum": ["c", "f"], "default": "c"},
        "lang": {"type": "string", "default": "en"}, "tags": {"type": "array", "default": ["a", "é"]},
        "mode": {"type": ["string", "integer"], "description": "Either"},
        "weird": {"type": "custom"}}},
    "one_of_property": {"type": "object", "properties": {
        "target": {"description": "Where", "default": "home", "oneOf": [
            {"type": "string", "description": "A name"},
            {"type": "integer", "description": "An id", "default": 3, "nullable": True}]},
        "same_desc": {"description": "Shared", "oneOf": [
            {"type": "string", "description": "Shared"}, {"type": "number", "description": "Other"}]}},
        "required": ["target"]},
    "one_of_top": {"oneOf": [{"type": "object", "properties": {"a": {"type": "string"}}},
                             {"type": "string", "enum": ["x"], "default": "x", "description": "X"}]},
    "empty_object": {"type": "object", "properties": {}},
    "no_type": {},
}


@pytest.mark.parametrize("name", SCHEMAS)
def test_render_function_schemas(name, o200k_encoding, harmony_oracle):
    tools = [FunctionTool(f"tool_{name}", "A tool.\n\nWith a blank line.\r\nAnd a CRLF.", SCHEMAS[name]),
             FunctionTool("no_description", "", {"type": "object", "properties": {}})]
    conv = Conversation([user("go")], current_date="2025-01-31", tools=tools)
    assert_renders_like_oracle(conv, o200k_encoding, harmony_oracle)


NAMED_NUMBERS = [  # (value, serde_json's text): the issue's cases and ryu's layout boundaries
    (1e-06, "1e-6"), (1e+20, "1e20"), (2 ** 70, "1.1805916207174113e21"), (0.1, "0.1"), (1.5, "1.5"),
    (-0.0, "-0.0"), (1e16, "1e16"), (123456789012345678, "123456789012345678"),
    (1e15, "1000000000000000.0"), (1e-05, "0.00001"), (0.0001, "0.0001"), (5e-324, "5e-324"),
    (2 ** 64 - 1, "18446744073709551615"), (2 ** 64, "1.8446744073709552e19"),
    (-2 ** 63, "-9223372036854775808"), (-2 ** 63 - 1, "-9.223372036854776e18"), (0, "0"), (0.0, "0.0"),
    (-1, "-1"), (1234560000000.0, "1234560000000.0"), (123.456, "123.456"),
    (1.7976931348623157e308, "1.7976931348623157e308"),
    (2.7715077941825975e-163, "2.7715077941825978e-163"),  # serde_json's parser lands one ulp off
]


def _many_numbers() -> list:
    """Floats of every magnitude (random bits, random 17-digit decimals, powers of 2 and 10) and
    integers around the u64/i64 limits, where serde_json switches to f64."""
    rng = random.Random(3)
    floats = [struct.unpack("<d", struct.pack("<Q", rng.getrandbits(64)))[0] for _ in range(1500)]
    floats += [float(f"{rng.randint(1, 10 ** 17 - 1)}e{rng.randint(-340, 300)}") for _ in range(1500)]
    floats += [10.0 ** e for e in range(-323, 309)] + [2.0 ** e for e in range(-1074, 1024, 5)]
    ints = [rng.randint(-2 ** 80, 2 ** 80) for _ in range(300)] + [s * 2 ** e + d for e in (53, 63, 64, 70)
                                                                  for s in (1, -1) for d in (-1, 0, 1)]
    return [*(v for v, _ in NAMED_NUMBERS), *ints, *(f for f in floats if math.isfinite(f))]


def test_numbers_print_as_serde_json_does():
    assert [(v, rust_json(v)) for v, _ in NAMED_NUMBERS] == NAMED_NUMBERS
    nested = {"a": [1e-06, 2 ** 70, True, None, "é\n"], "b": {}}
    assert rust_json(nested) == '{"a":[1e-6,1.1805916207174113e21,true,null,"é\\n"],"b":{}}'


def test_schema_defaults_render_like_openai_harmony(o200k_encoding, harmony_oracle):
    """Every number a schema's ``default`` can hold prints as openai-harmony prints it."""
    numbers = _many_numbers()
    assert len(numbers) > 4000
    for at in range(0, len(numbers), 1000):
        properties = {f"n{i}": {"type": "number", "default": v} for i, v in enumerate(numbers[at:at + 1000])}
        properties["list"] = {"type": "array", "default": numbers[at:at + 20]}
        properties["object"] = {"type": "object", "default": {"z": 1e-7, "a": [-0.0, 1e300]}}
        tool = FunctionTool("f", "Numbers.", {"type": "object", "properties": properties})
        assert_renders_like_oracle(Conversation([user("go")], current_date="2025-01-31", tools=[tool]),
                                   o200k_encoding, harmony_oracle)


@pytest.mark.parametrize("description", ["ends in CR\r", "two\r\rlines\r\n\r", "a\rb\nc\r\n", "\r", "\n\n", "",
                                         "trailing\n", "x\n\r"])
def test_tool_description_lines_like_rust(description, o200k_encoding, harmony_oracle):
    """Rust's str::lines: a line ends at \\n or \\r\\n; a lone \\r, at the end too, stays."""
    tools = [FunctionTool("f", description, {"type": "object", "properties": {}}), FunctionTool("g", description)]
    assert_renders_like_oracle(Conversation([user("go")], current_date="2025-01-31", tools=tools),
                               o200k_encoding, harmony_oracle)


def test_reasoning_effort_changes_between_turns(o200k_encoding, harmony_oracle):
    conv = Conversation([user("Hi")], current_date="2025-08-05", reasoning_effort="low")
    first = render_completion(conv, o200k_encoding)
    conv.add_reply([analysis("Greeting."), final("Hello!")])
    conv.messages.append(user("Now think hard."))
    conv.reasoning_effort = "high"
    second = render_completion(conv, o200k_encoding)
    assert_renders_like_oracle(conv, o200k_encoding, harmony_oracle)
    assert "Reasoning: low" in o200k_encoding.decode(first)
    assert "Reasoning: high" in o200k_encoding.decode(second)
    with pytest.raises(GptossError, match="reasoning effort"):
        Conversation(reasoning_effort="extreme")


def test_completion_prompt_ends_with_start_assistant(o200k_encoding):
    tokens = render_completion(Conversation([user("x")]), o200k_encoding)
    assert o200k_encoding.decode(tokens[-2:]) == "<|start|>assistant"
    assert [o200k_encoding.decode([t]) for t in STOP_TOKEN_IDS] == ["<|return|>", "<|call|>"]


# ---- history and serialisation -------------------------------------------------------------


def test_history_after_reply_drops_analysis_once_final():
    history = [user("q"), analysis("plan"), call("{}"), result("{}")]
    assert history_after_reply([user("q")], history[1:3]) == history[:3]  # a tool call keeps it
    after = history_after_reply(history, [analysis("more"), final("done")])
    assert after == [user("q"), call("{}"), result("{}"), final("done")]


def test_next_turn_renders_like_oracle_on_parsed_reply(o200k_encoding, harmony_oracle):
    conv = Conversation([user("2+2?")], current_date="2025-08-05", tools=[WEATHER])
    reply = ("<|channel|>analysis<|message|>Easy.<|end|>"
             "<|start|>assistant<|channel|>final<|message|>4<|return|>")
    parser = StreamParser(o200k_encoding)
    for t in o200k_encoding.encode(reply, allowed_special="all"):
        parser.feed(t)
    conv.add_reply(parser.messages)
    conv.messages.append(user("times 3?"))
    assert conv.messages[-2] == final("4")
    assert_renders_like_oracle(conv, o200k_encoding, harmony_oracle)


def test_json_round_trip():
    conv = Conversation(list(SHAPES["tool_chain_done"]), reasoning_effort="high",
                        developer_instructions="Be nice", tools=[WEATHER, NO_ARGS])
    raw = json.loads(json.dumps(conv.to_dict()))
    assert Conversation.from_dict(raw) == conv
    assert Message.from_dict(result("x").to_dict()) == result("x")
    assert "channel" not in user("x").to_dict()
    with pytest.raises(GptossError):
        Message.from_dict({"role": "wizard", "content": "x"})
    with pytest.raises(GptossError):
        Conversation.from_dict({"messages": [{"role": "tool", "content": "no name"}]})


def test_render_message_of_tool_call(o200k_encoding):
    text = o200k_encoding.decode(render_message(call('{"a":1}'), o200k_encoding))
    assert text == ('<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json'
                    '<|message|>{"a":1}<|call|>')


# ---- the streaming parser ---------------------------------------------------------------------


def from_oracle(m) -> Message:
    text = "".join(c.text for c in m.content)
    return Message(m.author.role.value, text, m.channel, m.recipient, m.content_type, m.author.name)


def feed_all(parser: StreamParser, tokens) -> list:
    events = []
    for t in tokens:
        events += parser.feed(t)
    return events + parser.finish()


def visible_text(events) -> str:
    return "".join(e.text for e in events if isinstance(e, (TextDelta, Malformed)))


REPLIES = {
    "analysis_final": "<|channel|>analysis<|message|>The user asks 2+2. Answer 4.<|end|>"
                      "<|start|>assistant<|channel|>final<|message|>2 + 2 = **4**.<|return|>",
    "call_recipient_after_channel": "<|channel|>analysis<|message|>Need the weather.<|end|>"
                                    "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
                                    '<|message|>{"location":"Paris"}<|call|>',
    "call_recipient_before_channel": "<|channel|>analysis<|message|>x<|end|>"
                                     "<|start|>assistant to=functions.f<|channel|>commentary json<|message|>{}<|call|>",
    "preamble_then_call": "<|channel|>commentary<|message|>Checking…<|end|><|start|>assistant"
                          "<|channel|>commentary to=functions.get_time<|message|><|call|>",
    "unicode_final": "<|channel|>final<|message|>Ça va 🎉 👩\u200d👩\u200d👧 你好 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 e\u0301<|return|>",
    "code": "<|channel|>final<|message|>```python\ndef f(x):\n\treturn  x\n```\n\n  done<|return|>",
    "truncated_content": "<|channel|>analysis<|message|>I was cut o",
    "truncated_mid_character": "<|channel|>final<|message|>ok 🎉",
}


@pytest.mark.parametrize("name", REPLIES)
def test_parser_matches_openai_harmony(name, o200k_encoding, harmony_oracle):
    tokens = o200k_encoding.encode(REPLIES[name], allowed_special="all")
    if name == "truncated_mid_character":
        tokens = tokens[:-1]  # the emoji's first byte-token only
    ref = oh.StreamableParser(harmony_oracle, oh.Role.ASSISTANT)
    parser = StreamParser(o200k_encoding)
    events = []
    for t in tokens:
        new = parser.feed(t)
        ref.process(t)
        delta = "".join(e.text for e in new if isinstance(e, TextDelta))
        assert (delta or None) == ref.last_content_delta  # deltas arrive with the same tokens
        events += new
    events += parser.finish()
    ref.process_eos()
    assert parser.messages == [from_oracle(m) for m in ref.messages]
    assert not [e for e in events if isinstance(e, Malformed)]
    assert [e.message for e in events if isinstance(e, MessageEnd)] == parser.messages


def _random_reply(rng: random.Random) -> list[Message]:
    pool = ["Sure.", " 🎉", "你好", "e\u0301", "\n\n", "  code(x) ", "𝔘𝔫", "<|end|> as text", "{\"a\": 1}"]
    text = lambda: "".join(rng.choice(pool) for _ in range(rng.randint(0, 8)))  # noqa: E731
    reply = [rng.choice([analysis, final, lambda t: Message("assistant", t, "commentary")])(text())
             for _ in range(rng.randint(0, 3))]
    return reply + [rng.choice([final(text()), call(text()), call(text(), "f", "json")])]


def test_parser_matches_openai_harmony_on_generated_replies(o200k_encoding, harmony_oracle):
    """Replies rendered from random messages, parsed back by both parsers token by token."""
    rng = random.Random(7)
    for _ in range(60):
        reply = _random_reply(rng)
        tokens = [t for m in reply for t in render_message(m, o200k_encoding)][2:]  # after the prompt
        if reply[-1].channel == "final":
            tokens[-1] = 200002  # <|return|> ends the turn
        ref = oh.StreamableParser(harmony_oracle, oh.Role.ASSISTANT)
        parser = StreamParser(o200k_encoding)
        for t in tokens:
            delta = "".join(e.text for e in parser.feed(t) if isinstance(e, TextDelta))
            ref.process(t)
            assert (delta or None) == ref.last_content_delta
        assert parser.messages == [from_oracle(m) for m in ref.messages] == reply


def test_parser_role_from_header_like_oracle(o200k_encoding, harmony_oracle):
    stream = ("<|start|>assistant<|channel|>final<|message|>hi<|end|>"
              "<|start|>functions.get_weather to=assistant"
              '<|channel|>commentary<|message|>{"t": 1}<|end|><|start|>user<|message|>thanks<|end|>')
    tokens = o200k_encoding.encode(stream, allowed_special="all")
    parser = StreamParser(o200k_encoding, role=None)
    feed_all(parser, tokens)
    ref = harmony_oracle.parse_messages_from_completion_tokens(tokens, None)
    assert parser.messages == [from_oracle(m) for m in ref]
    assert parser.messages[1] == result('{"t": 1}')
    with pytest.raises(ValueError):
        StreamParser(o200k_encoding, role="tool")


def test_parser_events_in_order(o200k_encoding):
    tokens = o200k_encoding.encode(REPLIES["analysis_final"], allowed_special="all")
    events = feed_all(StreamParser(o200k_encoding), tokens)
    kinds = [type(e).__name__ for e in events if not isinstance(e, TextDelta)]
    assert kinds == ["MessageStart", "MessageEnd", "MessageStart", "MessageEnd", "Stop"]
    assert events[0] == MessageStart("assistant", "analysis", None, None)
    assert events[-1] == Stop(200002, "return")
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert {d.channel for d in deltas} == {"analysis", "final"}
    assert "".join(d.text for d in deltas if d.channel == "final") == "2 + 2 = **4**."
    call = o200k_encoding.encode(REPLIES["call_recipient_after_channel"], allowed_special="all")
    call_events = feed_all(StreamParser(o200k_encoding), call)
    assert call_events[-1] == Stop(200012, "call")
    start = MessageStart("assistant", "commentary", "functions.get_weather", "<|constrain|>json")
    assert start in call_events


def test_deltas_never_split_a_character(o200k_encoding):
    text = "🎉👩\u200d👩\u200d👧𝔘𝔫𝔦𝔠𝔬𝔡𝔢🇫🇷 ∰ ꙮ 𓀀"
    body = o200k_encoding.encode(text)
    assert len(body) > len(text) // 2  # many characters take several tokens
    tokens = o200k_encoding.encode("<|channel|>final<|message|>", allowed_special="all") + body
    deltas = [e.text for e in feed_all(StreamParser(o200k_encoding), tokens) if isinstance(e, TextDelta)]
    assert "".join(deltas) == text and "\ufffd" not in "".join(deltas)
    assert len(deltas) < len(body)  # some tokens were held back until their character completed


# ---- malformed output: never raises, keeps the raw text visible -------------------------------


def parse_text(enc, text: str, role="assistant"):
    parser = StreamParser(enc, role=role)
    return parser, feed_all(parser, enc.encode(text, allowed_special="all"))


def malformed(events) -> list[Malformed]:
    return [e for e in events if isinstance(e, Malformed)]


def test_missing_channel(o200k_encoding, harmony_oracle):
    parser, events = parse_text(o200k_encoding, "<|message|>hello there<|end|>")
    assert parser.messages == [Message("assistant", "hello there")]
    assert malformed(events) == [Malformed("assistant message without a channel")]
    assert visible_text(events) == "hello there"
    assert {e.channel for e in events if isinstance(e, TextDelta)} == {None}
    tokens = o200k_encoding.encode("<|message|>hello there<|end|>", allowed_special="all")
    ref = harmony_oracle.parse_messages_from_completion_tokens(tokens, oh.Role.ASSISTANT)
    assert parser.messages == [from_oracle(m) for m in ref]


@pytest.mark.parametrize("special", ["<|reserved_200100|>", "<|start|>", "<|endoftext|>", "<|channel|>"])
def test_unknown_special_token_in_a_message(special, o200k_encoding, harmony_oracle):
    text = f"<|channel|>final<|message|>a{special}b<|return|>"
    parser, events = parse_text(o200k_encoding, text)
    assert parser.messages == [final(f"a{special}b")]  # kept as its text, as the reference keeps it
    ref = harmony_oracle.parse_messages_from_completion_tokens(
        o200k_encoding.encode(text, allowed_special="all"), oh.Role.ASSISTANT)
    assert parser.messages == [from_oracle(m) for m in ref]
    assert len(malformed(events)) == 1 and special in malformed(events)[0].reason


def test_text_after_the_stop(o200k_encoding):
    stream = "<|channel|>final<|message|>done<|return|>and more 🎉<|end|>"
    parser, events = parse_text(o200k_encoding, stream)
    assert parser.messages == [final("done")]
    assert [e for e in events if isinstance(e, Stop)] == [Stop(200002, "return")]
    assert "".join(m.text for m in malformed(events)) == "and more 🎉<|end|>"
    assert {m.reason for m in malformed(events)} == {"text after the stop"}


@pytest.mark.parametrize("stream, raw", [
    ("<|channel|>fin", "<|channel|>fin"),                                   # stream ends in a header
    ("<|channel|>final<|return|>", "<|channel|>final"),                    # a stop inside a header
    ("<|channel|>final<|end|><|start|>assistant<|channel|>final<|message|>ok<|end|>", "<|channel|>final"),
    ("<|channel|>analysis<|start|>assistant<|channel|>final<|message|>ok<|end|>", "<|channel|>analysis"),
])
def test_truncated_header(stream, raw, o200k_encoding):
    parser, events = parse_text(o200k_encoding, stream)
    assert [m.text for m in malformed(events)] == [raw]
    assert parser.messages == ([final("ok")] if stream.endswith("ok<|end|>") else [])


@pytest.mark.parametrize("stream, raw, message", [
    ("<|channel|><|message|>abc<|end|>", "<|channel|>", Message("assistant", "abc")),
    ("<|channel|>commentary a b c<|message|>x<|end|>", "<|channel|>commentary a b c",
     Message("assistant", "x")),
    ("<|start|>bogus<|message|>y<|end|>", "bogus", Message("assistant", "y")),
])
def test_unreadable_header(stream, raw, message, o200k_encoding):
    role = None if stream.startswith("<|start|>") else "assistant"
    parser, events = parse_text(o200k_encoding, stream, role=role)
    assert malformed(events)[0].text == raw and "header" in malformed(events)[0].reason
    assert parser.messages == [message]


def test_constrain_only_header_is_a_content_type(o200k_encoding, harmony_oracle):
    """Deliberately unlike the reference (StreamParser's docstring): a header whose only word
    after the channel is ``<|constrain|>json`` is read as the content type, which round-trips."""
    message = Message("assistant", '{"a": 1}', "final", content_type="<|constrain|>json")
    oracle_message = oh.Message(author=oh.Author(role=oh.Role.ASSISTANT), content=[oh.TextContent(text='{"a": 1}')],
                                channel="final", content_type="<|constrain|>json")
    tokens = render_message(message, o200k_encoding)
    assert tokens == harmony_oracle.render(oracle_message)  # both render the same header
    parser = StreamParser(o200k_encoding, role=None)
    events = feed_all(parser, tokens)
    assert parser.messages == [message] and not malformed(events)
    ref = harmony_oracle.parse_messages_from_completion_tokens(tokens, None)
    assert (ref[0].recipient, ref[0].content_type) == ("<|constrain|>json", None)


def test_an_unreadable_header_is_quoted_short(o200k_encoding):
    """The raw header is in Malformed.text; the reason quotes only its start."""
    words = " ".join(f"w{i}" for i in range(30))  # within MAX_HEADER_TOKENS
    parser, events = parse_text(o200k_encoding, f"<|channel|>final {words}<|message|>x<|end|>")
    bad = malformed(events)[0]
    assert bad.text == f"<|channel|>final {words}" and len(bad.reason) < 120 and "…" in bad.reason


def test_text_outside_a_message_and_bad_ids(o200k_encoding):
    stream = "stray words<|start|>assistant<|channel|>final<|message|>x<|return|>"
    parser, events = parse_text(o200k_encoding, stream, role=None)
    assert "".join(m.text for m in malformed(events)) == "stray words"  # as it streams, token by token
    assert {m.reason for m in malformed(events)} == {"text outside a message"}
    assert parser.messages == [final("x")]
    for bad in (201088, -1, 10**12):
        assert [type(e) for e in parser.feed(bad)] == [Malformed]


def test_endless_header_is_shown_as_text(o200k_encoding):
    words = " ".join(["word"] * 300)
    parser, events = parse_text(o200k_encoding, words + "<|end|>")  # no <|message|> ever comes
    assert visible_text(events) == words
    assert parser.messages and parser.messages[0].channel is None


def test_any_ids_never_raise(o200k_encoding):
    """Ids from the whole vocabulary (specials often), out of range, and not ints at all."""
    specials = list(range(199998, 201088))
    rng = random.Random(1)
    for _ in range(300):
        parser = StreamParser(o200k_encoding, role=rng.choice(["assistant", None, "user", "system", "developer"]))
        for _ in range(rng.randint(0, 60)):
            kind = rng.random()
            t = rng.choice(specials) if kind < 0.4 else rng.randrange(199998) if kind < 0.95 else rng.choice(
                [-5, 201088, 2 ** 40, None, "x", 3.5])
            events = parser.feed(t) if rng.random() > 0.03 else parser.finish()  # finish, then go on
            assert all(isinstance(e, (MessageStart, TextDelta, MessageEnd, Stop, Malformed)) for e in events)
        parser.finish()
        parser.finish()
        assert all(isinstance(m, Message) for m in parser.messages)


def test_random_token_soup_never_raises(o200k_encoding):
    enc = o200k_encoding
    pieces = [[t] for t in (200006, 200007, 200008, 200005, 200003, 200002, 200012, 200100, 199999)]
    words = ("assistant", "final", "analysis", " to=functions.f", " json", "user", "hi", " 🎉", "你好", "\n")
    pieces += [enc.encode(w) for w in words]
    pieces += [[enc.encode("🎉")[0]]]  # half a character
    rng = random.Random(0)
    for _ in range(400):
        parser = StreamParser(enc, role=rng.choice(["assistant", None]))
        tokens = [t for _ in range(rng.randint(0, 30)) for t in rng.choice(pieces)]
        events = feed_all(parser, tokens)
        assert [e.message for e in events if isinstance(e, MessageEnd)] == parser.messages
        current = None  # each message's text is exactly the deltas it streamed
        for e in events:
            if isinstance(e, MessageStart):
                current = []
            elif isinstance(e, TextDelta):
                current.append(e.text)
            elif isinstance(e, MessageEnd):
                assert "".join(current) == e.message.content
                current = None
