"""The built-in tools in a chat, with a scripted model (no network, no weights): a python call is
run in a real Jupyter kernel and fed back token-equal to openai-harmony's tool message; limits,
isolation, consent, Ctrl-C; the browser against a loopback server with fixture pages and search
endpoints in Exa's and SearXNG's JSON shapes."""

from __future__ import annotations

import http.server
import io
import json
import os
import signal
import sys
import threading
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from gptoss_cli.chat_session import ChatSession, Settings, ToolResult
from gptoss_cli.chat_tools import DECLINED, ToolBox
from gptoss_cli.harmony import Conversation, Message
from gptoss_cli.tool_browser import Browser, ExaBackend, SearxngBackend, backend_from_env
from gptoss_cli.tool_python import PythonLimits, PythonTool, isolation

sys.path.insert(0, str(Path(__file__).parent))
from scripted_engine import ScriptedEngine  # noqa: E402

pytest.importorskip("jupyter_client")
pytest.importorskip("ipykernel")


def call(code: str, channel: str = "analysis") -> str:
    return f"<|channel|>{channel}<|message|>Let me compute.<|end|><|start|>assistant to=python<|channel|>{channel} code<|message|>{code}<|call|>"


def final(text: str) -> str:
    return f"<|channel|>final<|message|>{text}<|return|>"


@pytest.fixture(scope="module")
def python_tool(tmp_path_factory):
    """One kernel for the module's tests (a kernel starts in about half a second)."""
    tool = PythonTool(tmp_path_factory.mktemp("py") / "scratch", PythonLimits(wall_s=3, cpu_s=6, output_chars=2000))
    yield tool
    tool.shutdown()


def make_session(encoding, replies, tool, answers=("yes",), **kw):
    box = ToolBox({"python"}, **kw)
    box._python = tool
    asked = []
    box.ask = (lambda c, iso: asked.append((c.tool, iso)) or answers[min(len(asked), len(answers)) - 1])
    engine = ScriptedEngine(encoding, replies)
    session = ChatSession(engine, Conversation(current_date="2026-01-01"), Settings(), tools=box)
    return session, engine, asked


def test_a_python_call_runs_is_fed_back_like_openai_harmony_and_the_turn_goes_on(
        python_tool, o200k_encoding, harmony_oracle):
    import openai_harmony as oh

    session, engine, asked = make_session(o200k_encoding, [call("print(6 * 7)"), final("It is 42.")], python_tool)
    events = []
    turn = session.respond("what is 6*7?", events.append)
    assert turn.answer == "It is 42." and not turn.interrupted
    assert turn.reasoning == "Let me compute."                    # the call and its result are apart
    assert turn.tool_calls == [{"recipient": "python", "arguments": "print(6 * 7)", "content_type": "code",
                                "channel": "analysis", "result": "42\n"}]
    assert [e.result.content for e in events if isinstance(e, ToolResult)] == ["42\n"]
    assert asked == [("python", python_tool.isolation.words)]
    # the second prompt is the first plus the call and the tool's message, as openai-harmony renders it
    system = (oh.SystemContent.new().with_conversation_start_date("2026-01-01")
              .with_tools(oh.ToolNamespaceConfig(name="python", description=session.conv.builtin_tools[0].description, tools=[])))
    ref = oh.Conversation.from_messages([
        oh.Message.from_role_and_content(oh.Role.SYSTEM, system),
        oh.Message.from_role_and_content(oh.Role.USER, "what is 6*7?"),
        oh.Message.from_role_and_content(oh.Role.ASSISTANT, "Let me compute.").with_channel("analysis"),
        oh.Message.from_role_and_content(oh.Role.ASSISTANT, "print(6 * 7)").with_channel("analysis")
        .with_recipient("python").with_content_type("code"),
        oh.Message.from_author_and_content(oh.Author.new(oh.Role.TOOL, "python"), "42\n")
        .with_channel("analysis").with_recipient("assistant"),
    ])
    expected = harmony_oracle.render_conversation_for_completion(ref, oh.Role.ASSISTANT)
    assert o200k_encoding.decode(engine.prompts[1]) == harmony_oracle.decode(expected)
    assert engine.prompts[1] == expected
    # the next turn drops this turn's analysis: the call and its result with it
    assert [m.role for m in session.history()] == ["user", "assistant"]


def test_state_survives_between_calls_and_always_asks_once(python_tool, o200k_encoding):
    session, _, asked = make_session(
        o200k_encoding, [call("secret = 1234"), call("print(secret + 1)"), final("1235")], python_tool,
        answers=("always",))
    turn = session.respond("go")
    assert [c["result"] for c in turn.tool_calls] == ["[no output]", "1235\n"]
    assert len(asked) == 1 and "python" in session.tools.always


def test_the_time_limit_stops_runaway_code_and_keeps_the_kernel(python_tool):
    python_tool.run("kept = 'still here'")
    out = python_tool.run("while True:\n    pass")
    assert "timed out after 3 s" in out and "KeyboardInterrupt" in out
    assert python_tool.run("print(kept)") == "still here\n"


def test_output_is_cut_to_size(python_tool):
    out = python_tool.run("print('x' * 100000)")
    assert len(out) < 2200 and "characters cut" in out


@pytest.mark.skipif(not isolation().network_cut, reason="no isolation on this machine (root + unshare, or bwrap)")
def test_code_cannot_write_outside_its_folder(python_tool, tmp_path):
    outside = tmp_path / "outside.txt"
    out = python_tool.run(f"open({str(outside)!r}, 'w').write('x')")
    assert "Read-only file system" in out and not outside.exists()
    assert python_tool.run("open('inside.txt', 'w').write('ok')") == "2\n"
    assert (python_tool.folder / "inside.txt").read_text() == "ok"


@pytest.mark.skipif(not isolation().network_cut, reason="no isolation on this machine (root + unshare, or bwrap)")
def test_code_cannot_reach_the_network(python_tool, site):
    port = site.split(":")[-1]
    out = python_tool.run(f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/page.html', timeout=3).read()[:20]")
    assert "Network is unreachable" in out or "Connection refused" in out, out


def test_a_refusal_goes_back_as_a_tool_message(python_tool, o200k_encoding):
    marker = python_tool.folder / "ran.txt"
    session, engine, asked = make_session(
        o200k_encoding, [call(f"open({str(marker)!r}, 'w')"), final("OK, I will not.")], python_tool, answers=("no",))
    turn = session.respond("go")
    assert turn.tool_calls[0]["result"] == DECLINED and not marker.exists()
    assert turn.answer == "OK, I will not." and len(engine.prompts) == 2


def test_without_anyone_to_ask_nothing_runs(python_tool, o200k_encoding):
    session, _, _ = make_session(o200k_encoding, [call("print(1)"), final("no")], python_tool)
    session.tools.ask = None
    assert session.respond("go").tool_calls[0]["result"].startswith(DECLINED)
    session.tools.yes = True
    session.engine.replies = [call("print(1)"), final("yes")]
    assert session.respond("go").tool_calls[0]["result"] == "1\n"


def test_ctrl_c_stops_a_running_call_and_keeps_the_conversation(python_tool, o200k_encoding):
    session, engine, _ = make_session(o200k_encoding, [call("import time\nvalue = 5\ntime.sleep(20)"), final("never")],
                                      python_tool)
    timer = threading.Timer(1.5, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    try:
        turn = session.respond("sleep")
    finally:
        timer.cancel()
    assert turn.interrupted and turn.stop_reason == "interrupted" and len(engine.prompts) == 1
    assert "interrupted by the user" in turn.tool_calls[0]["result"]
    assert session.turns == [turn] and python_tool.run("print(value)") == "5\n"


def test_save_and_load_keep_calls_and_results_and_start_a_fresh_kernel(python_tool, o200k_encoding, tmp_path):
    session, _, _ = make_session(o200k_encoding, [call("z = 3\nprint(z)"), final("3")], python_tool)
    session.respond("go")
    session.save(tmp_path / "t.json")
    session.load(tmp_path / "t.json")
    assert session.turns[0].tool_calls[0]["result"] == "3\n"
    assert "Tool result" in session.to_markdown()
    assert "NameError" in python_tool.run("z")          # the kernel started fresh


def test_prompt_json_includes_calls_and_results(python_tool, o200k_encoding):
    jsonschema = pytest.importorskip("jsonschema")
    from rich.console import Console

    from gptoss_cli.chat import PROMPT_JSON_SCHEMA, answer_once

    session, _, _ = make_session(o200k_encoding, [call("print(2 ** 10)"), final("1024")], python_tool, yes=True)
    session.tools.ask = None
    buf = io.StringIO()
    with redirect_stdout(buf):
        answer_once(session, "2**10?", "scripted", True, Console(file=io.StringIO()))
    out = json.loads(buf.getvalue())
    jsonschema.validate(out, PROMPT_JSON_SCHEMA)
    assert out["answer"] == "1024" and out["tool_calls"][0]["result"] == "1024\n"


def test_an_unknown_tool_name_is_one_line(tmp_path):
    import subprocess

    r = subprocess.run([sys.executable, "-m", "gptoss_cli", "chat", "--tools", "python,shell", "--prompt", "x"],
                       capture_output=True, text=True, env={**os.environ, "GPTOSS_HOME": str(tmp_path)}, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "unknown tool 'shell'" in lines[0], r.stderr


# ---- the browser --------------------------------------------------------------------------------

PAGES = {
    "/page.html": ("text/html", "<html><head><title>Pelicans</title></head><body><h1>Pelicans</h1>"
                   "<p>The brown pelican dives for fish.</p>" + "<p>filler line</p>" * 300 +
                   "<p>Pelicans live on every continent except Antarctica.</p>"
                   "<p>See <a href='/other.html'>the other page</a> or <a href='https://example.org/x'>elsewhere</a>.</p>"
                   "</body></html>"),
    "/other.html": ("text/html", "<html><head><title>Other</title></head><body><p>Second page.</p></body></html>"),
    "/notes.txt": ("text/plain", "plain\ntext"),
    "/image.png": ("image/png", "\x89PNG"),
}


SEEN: list = []   # the search requests the loopback server got


@pytest.fixture(scope="module")
def site():
    """A loopback server: fixture pages, Exa's /search (POST) and SearXNG's /search (GET) in
    their real JSON shapes (recorded from the APIs' documentation)."""
    seen = SEEN

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _send(self, ctype, body, status=200):
            data = body.encode("utf-8", "surrogateescape") if isinstance(body, str) else body
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            base = f"http://127.0.0.1:{self.server.server_port}"
            if self.path.startswith("/searxng/search"):
                seen.append(("searxng", self.path))
                self._send("application/json", json.dumps({
                    "query": "pelican", "number_of_results": 0,
                    "results": [{"url": f"{base}/page.html", "title": "Pelicans", "content": "All about pelicans.",
                                 "engine": "duckduckgo", "parsed_url": ["http", "127.0.0.1", "/page.html", "", "", ""],
                                 "template": "default.html", "engines": ["duckduckgo"], "positions": [1],
                                 "score": 1.0, "category": "general"}],
                    "answers": [], "corrections": [], "infoboxes": [], "suggestions": [], "unresponsive_engines": []}))
            elif self.path in PAGES:
                self._send(*PAGES[self.path])
            else:
                self._send("text/html", "<p>not here</p>", 404)

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(("exa", self.headers.get("x-api-key"), body))
            base = f"http://127.0.0.1:{self.server.server_port}"
            self._send("application/json", json.dumps({
                "requestId": "b5947044c4b78efa9552a7c89b306d95", "resolvedSearchType": "neural",
                "results": [{"id": f"{base}/page.html", "title": "Pelicans", "url": f"{base}/page.html",
                             "publishedDate": "2024-01-01T00:00:00.000Z", "author": None,
                             "summary": "Pelicans are large water birds."},
                            {"id": f"{base}/other.html", "title": "Other", "url": f"{base}/other.html",
                             "publishedDate": None, "author": None, "summary": "Another page."}],
                "costDollars": {"total": 0.005}}))

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_exa_search_open_a_result_and_find(site):
    b = Browser(ExaBackend("k3y", base_url=site))
    out = b.call("search", json.dumps({"query": "pelican"}))
    assert out.startswith("[0] pelican\n**viewing lines [0 - 3] of 3**")
    assert "L2: * 【0†Pelicans†127.0.0.1:" in out and "Pelicans are large water birds." in out
    opened = b.call("open", json.dumps({"id": 0}))
    assert opened.startswith(f"[1] Pelicans ({site}/page.html)\n**viewing lines [0 - ")
    assert "L0: URL: " in opened and "The brown pelican dives for fish." in opened
    assert "Antarctica" not in opened                               # past the first view
    found = b.call("find", json.dumps({"pattern": "ANTARCTICA"}))
    assert found.startswith("[2] Find results for text: `ANTARCTICA` in `Pelicans`") and "【0†match at L" in found
    line = int(found.split("match at L")[1].split("】")[0])
    scrolled = b.call("open", json.dumps({"cursor": 1, "loc": line, "num_lines": 8}))
    assert scrolled.startswith(f"[3] Pelicans") and f"L{line}: Pelicans live on every continent" in scrolled
    assert "【0†the other page】" in scrolled and "【1†elsewhere†example.org】" in scrolled
    assert "Second page." in b.call("open", json.dumps({"id": 0}))      # a link of the current page
    assert b.url_for_cursor(1) == f"{site}/page.html" and b.url_for_cursor(0) is None


def test_exa_request_shape(site):
    SEEN.clear()
    Browser(ExaBackend("k3y", base_url=site)).call("search", json.dumps({"query": "birds", "topn": 3}))
    assert SEEN == [("exa", "k3y", {"query": "birds", "numResults": 3, "contents": {"summary": True}})]


def test_searxng_search_and_open_by_url(site):
    b = Browser(SearxngBackend(site + "/searxng"))
    SEEN.clear()
    out = b.call("search", json.dumps({"query": "pelican"}))
    assert SEEN == [("searxng", "/searxng/search?q=pelican&format=json")]
    assert "【0†Pelicans†127.0.0.1:" in out and "All about pelicans." in out
    assert "Second page." in b.call("open", json.dumps({"id": f"{site}/other.html"}))
    assert "L1: plain" in b.call("open", json.dumps({"id": f"{site}/notes.txt"}))
    assert "image/png, not a page" in b.call("open", json.dumps({"id": f"{site}/image.png"}))
    assert "HTTP 404" in b.call("open", json.dumps({"id": f"{site}/missing"}))
    assert "no link `9`" in b.call("open", json.dumps({"id": 9, "cursor": 0}))
    assert "not valid JSON" in b.call("open", "{nope")


def test_without_a_backend_search_says_so_and_open_works(site):
    b = Browser(None)
    assert "no search backend is configured" in b.call("search", json.dumps({"query": "x"}))
    assert "Second page." in b.call("open", json.dumps({"id": f"{site}/other.html"}))


def test_backend_from_env():
    assert backend_from_env({}) is None
    assert isinstance(backend_from_env({"EXA_API_KEY": "k"}), ExaBackend)
    assert isinstance(backend_from_env({"SEARXNG_URL": "http://s"}), SearxngBackend)
    assert isinstance(backend_from_env({"EXA_API_KEY": "k", "SEARXNG_URL": "http://s", "GPTOSS_SEARCH": "searxng"}),
                      SearxngBackend)
    assert backend_from_env({"EXA_API_KEY": "k", "GPTOSS_SEARCH": "none"}) is None
    from gptoss_cli.errors import GptossError
    with pytest.raises(GptossError, match="needs EXA_API_KEY"):
        backend_from_env({"GPTOSS_SEARCH": "exa"})


def test_a_browser_call_in_a_chat_and_its_citation_as_a_link(site, o200k_encoding):
    from rich.console import Console

    from gptoss_cli.chat_view import CitationLinker, ReplyView

    box = ToolBox({"browser"}, yes=True, browser_backend=SearxngBackend(site + "/searxng"))
    replies = ['<|channel|>analysis<|message|>Search.<|end|><|start|>assistant to=browser.search<|channel|>analysis'
               '<|message|>{"query": "pelican"}<|call|>',
               '<|channel|>analysis<|message|>Open.<|end|><|start|>assistant to=browser.open<|channel|>analysis'
               '<|message|>{"id": 0}<|call|>',
               final("Pelicans dive for fish 【1†L2】.")]
    session = ChatSession(ScriptedEngine(o200k_encoding, replies), Conversation(current_date="2026-01-01"),
                          Settings(), tools=box)
    console = Console(file=io.StringIO(), force_terminal=True, width=100)
    view = ReplyView(console, cite=box.url_for_cursor)
    turn = session.respond("pelicans?", view, view.on_token)
    view.close()
    assert [c["recipient"] for c in turn.tool_calls] == ["browser.search", "browser.open"]
    assert turn.tool_calls[1]["result"].startswith(f"[1] Pelicans ({site}/page.html)")
    shown = console.file.getvalue()
    assert "search: pelican" in shown and f"{site}/page.html" in shown    # the link's target (OSC 8)
    linker = CitationLinker(box.url_for_cursor)
    assert linker.feed("dives 【1†L") == "dives "
    assert linker.feed("2-L3】 yes") == f" [127.0.0.1:{site.rsplit(':', 1)[1]} L2-L3](<{site}/page.html>) yes"
    assert linker.feed("【0†L1】") == "【0†L1】"      # a search page is not a source


def test_tools_command_lists_and_switches(python_tool, o200k_encoding, capsys):
    from gptoss_cli.chat import Repl
    from gptoss_cli.errors import GptossError

    session, _, _ = make_session(o200k_encoding, [], python_tool)
    session.tools._backend = None
    repl = Repl(session, "scripted")
    repl.command("/tools")
    out = capsys.readouterr().out
    assert "python  on" in out and python_tool.isolation.words in out and "browser off" in out
    repl.command("/tools on browser")
    assert "no search backend" in capsys.readouterr().out
    assert [ns.name for ns in session.conv.builtin_tools] == ["browser", "python"]
    repl.command("/tools off python")
    assert [ns.name for ns in session.conv.builtin_tools] == ["browser"]
    assert "## browser" in session.system_message() and "## python" not in session.system_message()
    for bad, words in (("/tools maybe", "/tools on|off"), ("/tools on shell", "unknown tool 'shell'")):
        with pytest.raises(GptossError, match=words):
            repl.command(bad)


def test_an_off_tool_answers_that_it_is_off(python_tool, o200k_encoding):
    session, _, asked = make_session(o200k_encoding, [call("print(1)"), final("fine")], python_tool)
    session.set_tool("python", False)
    turn = session.respond("go")
    assert turn.tool_calls[0]["result"] == "The python tool is turned off in this chat." and not asked


def test_without_isolation_the_words_say_so(tmp_path):
    tool = PythonTool(tmp_path / "s", isolation_kind="none")
    assert tool.isolation.words.startswith("NOT isolated") and not tool.isolation.network_cut
    assert tool.description_words()["internet"].startswith("UNKNOWN")


def _available(kind: str) -> bool:
    from gptoss_cli.errors import GptossError

    try:
        return isolation(kind).kind == kind
    except GptossError:
        return False


@pytest.mark.skipif(not _available("bubblewrap"), reason="needs a working bubblewrap (bwrap)")
def test_bubblewrap_isolation(tmp_path, site):
    tool = PythonTool(tmp_path / "s", PythonLimits(wall_s=10), isolation_kind="bubblewrap")
    try:
        assert "Read-only file system" in tool.run(f"open({str(tmp_path / 'out.txt')!r}, 'w')")
        port = site.split(":")[-1]
        out = tool.run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), 3)")
        assert "Network is unreachable" in out or "Connection refused" in out
    finally:
        tool.shutdown()
