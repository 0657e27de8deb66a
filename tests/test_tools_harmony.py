"""The built-in tools in Harmony, token for token against openai-harmony: their declaration in the
system message, and a python or browser call with its result in the conversation."""

from __future__ import annotations

import pytest

from gptoss_cli.harmony import Conversation, Message, render_completion
from gptoss_cli.harmony_tools import browser_namespace, python_description, python_namespace

from test_harmony import WEATHER, to_oracle

oh = pytest.importorskip("openai_harmony")


def oracle_tokens(conv: Conversation, oracle, namespaces) -> list[int]:
    """openai-harmony's rendering of ``conv`` with ``namespaces`` (its own builders) declared."""
    ref = to_oracle(conv)
    system = ref.messages[0].content[0]
    for ns in namespaces:
        system = ns(system)
    ref.messages[0].content[0] = system
    return oracle.render_conversation_for_completion(ref, oh.Role.ASSISTANT)


def test_default_declarations_are_openai_harmonys(o200k_encoding, harmony_oracle):
    conv = Conversation([Message("user", "hi")], current_date="2026-01-01",
                        builtin_tools=[browser_namespace(), python_namespace()])
    ref = oracle_tokens(conv, harmony_oracle, [lambda s: s.with_browser_tool(), lambda s: s.with_python_tool()])
    ours = render_completion(conv, o200k_encoding)
    assert o200k_encoding.decode(ours) == harmony_oracle.decode(ref)
    assert ours == ref


@pytest.mark.parametrize("which", ["python", "browser"])
def test_one_tool_alone_with_function_tools(which, o200k_encoding, harmony_oracle):
    ns = python_namespace() if which == "python" else browser_namespace()
    conv = Conversation([Message("user", "hi")], current_date="2026-01-01", tools=[WEATHER],
                        developer_instructions="Be brief.", builtin_tools=[ns])
    builder = (lambda s: s.with_python_tool()) if which == "python" else (lambda s: s.with_browser_tool())
    assert render_completion(conv, o200k_encoding) == oracle_tokens(conv, harmony_oracle, [builder])


def test_the_chats_python_text_renders_as_openai_harmony_renders_it(o200k_encoding, harmony_oracle):
    """The chat tells the model its real time limit, folder and network; the namespace around
    those words is rendered exactly as openai-harmony renders a python namespace."""
    text = python_description(30, "/home/me/.local/share/gptoss/python/abc", "disabled")
    assert "time out after 30.0 seconds" in text and "/mnt/data" not in text
    conv = Conversation([Message("user", "hi")], current_date="2026-01-01",
                        builtin_tools=[browser_namespace(), python_namespace(timeout_s=30, drive="/home/me/.local/share/gptoss/python/abc", internet="disabled")])
    config = oh.ToolNamespaceConfig(name="python", description=text, tools=[])
    ref = oracle_tokens(conv, harmony_oracle, [lambda s: s.with_browser_tool(), lambda s: s.with_tools(config)])
    assert render_completion(conv, o200k_encoding) == ref


def test_calls_and_results_render_like_openai_harmony(o200k_encoding, harmony_oracle):
    msgs = [
        Message("user", "what is 2**100? and search it"),
        Message("assistant", "Compute.", channel="analysis"),
        Message("assistant", "print(2**100)", channel="analysis", recipient="python", content_type="code"),
        Message("tool", "1267650600228229401496703205376\n", channel="analysis", recipient="assistant", name="python"),
        Message("assistant", '{"query": "2**100"}', channel="analysis", recipient="browser.search"),
        Message("tool", "[0] 2**100\n**viewing lines [0 - 1] of 1**\n\nL0: x\nL1: y", channel="analysis",
                recipient="assistant", name="browser.search"),
    ]
    conv = Conversation(msgs, current_date="2026-01-01", builtin_tools=[browser_namespace(), python_namespace()])
    ref = oracle_tokens(conv, harmony_oracle, [lambda s: s.with_browser_tool(), lambda s: s.with_python_tool()])
    ours = render_completion(conv, o200k_encoding)
    assert o200k_encoding.decode(ours) == harmony_oracle.decode(ref)
    assert ours == ref


def test_saved_conversation_keeps_its_tools():
    conv = Conversation(builtin_tools=[browser_namespace(), python_namespace(timeout_s=5)])
    back = Conversation.from_dict(conv.to_dict())
    assert back.builtin_tools == conv.builtin_tools
