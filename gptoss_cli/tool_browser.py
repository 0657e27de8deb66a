"""The ``browser`` tool: ``search``, ``open`` and ``find`` over text pages with numbered lines.

It behaves as the simple browser of OpenAI's gpt-oss reference (``gpt_oss/tools/simple_browser``),
whose output the model was trained to read: every page the model sees gets a cursor (its index in
the session's page stack), is shown as ``[cursor] title (url)``, a ``**viewing lines [a - b] of
n**`` bar and lines ``L{i}: ...`` wrapped at 80 characters; links appear inline as
``【id†text】`` (``【id†text†domain】`` for another site) and are opened with ``open(id=...)``. The
model cites lines as ``【cursor†La-Lb】``; ``url_for_cursor`` turns those into links for the
terminal.

Search goes through a pluggable backend chosen by environment: Exa (``EXA_API_KEY``; the backend
OpenAI's reference uses) or a SearXNG instance's JSON API (``SEARXNG_URL``); ``GPTOSS_SEARCH``
picks one when both are set, or ``none``. Without a backend ``search`` tells the model so, and
``open`` still fetches any URL. HTML becomes text through ``html2text``; HTTP through ``httpx``.
"""

from __future__ import annotations

import json
import os
import re
import textwrap
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlparse

from .errors import GptossError

WRAP = 80                # characters a line, as the reference wraps pages
VIEW_CHARS = 4000        # about 1,000 tokens a view, the reference's view size
MAX_BYTES = 4 << 20      # a page larger than this is cut
FIND_CONTEXT = 4         # lines shown per find match
USER_AGENT = "gptoss-browser/0.1 (+https://github.com/openai/gpt-oss)"


class BrowserError(Exception):
    """A call the browser cannot do; its text goes back to the model."""


@dataclass
class Page:
    url: str
    title: str
    text: str
    links: dict[str, str] = field(default_factory=dict)   # link id -> URL
    listing: bool = False                                 # a search or find result page

    def lines(self) -> list[str]:
        out: list[str] = []
        for line in self.text.split("\n"):
            out += textwrap.wrap(line, width=WRAP, replace_whitespace=False, drop_whitespace=False) or [""]
        return out


@dataclass
class Result:
    title: str
    url: str
    snippet: str


def domain(url: str) -> str:
    return urlparse(url).netloc


# ---- search backends ------------------------------------------------------------------------------


class ExaBackend:
    """Exa's search API (https://docs.exa.ai): ``POST /search`` with an ``x-api-key`` header."""

    name = "exa"

    def __init__(self, api_key: str, base_url: str = "https://api.exa.ai"):
        self.api_key, self.base_url = api_key, base_url.rstrip("/")

    def search(self, client, query: str, topn: int) -> list[Result]:
        r = client.post(f"{self.base_url}/search", headers={"x-api-key": self.api_key},
                        json={"query": query, "numResults": topn, "contents": {"summary": True}})
        if r.status_code != 200:
            raise BrowserError(f"Exa API error {r.status_code}: {r.text[:300]}")
        return [Result(x.get("title") or x.get("url", ""), x["url"], x.get("summary") or x.get("text") or "")
                for x in _json(r).get("results", []) if x.get("url")]


class SearxngBackend:
    """A SearXNG instance's JSON API (``GET /search?q=...&format=json``; the instance must allow
    the json format in its ``settings.yml``)."""

    name = "searxng"

    def __init__(self, base_url: str):
        self.base_url = base_url.rstrip("/")

    def search(self, client, query: str, topn: int) -> list[Result]:
        r = client.get(f"{self.base_url}/search", params={"q": query, "format": "json"})
        if r.status_code == 403:
            raise BrowserError("the SearXNG instance refuses format=json (enable json under search.formats)")
        if r.status_code != 200:
            raise BrowserError(f"SearXNG error {r.status_code}: {r.text[:300]}")
        return [Result(x.get("title") or x["url"], x["url"], x.get("content") or "")
                for x in _json(r).get("results", [])[:topn] if x.get("url")]


def _json(response) -> dict:
    try:
        data = response.json()
    except ValueError:
        raise BrowserError("the search service answered with something that is not JSON") from None
    if not isinstance(data, dict):
        raise BrowserError("the search service answered with JSON of an unknown shape")
    return data


def backend_from_env(env=None):
    """The search backend configured in the environment, or None."""
    env = os.environ if env is None else env
    choice = env.get("GPTOSS_SEARCH", "").strip().lower()
    if choice not in ("", "exa", "searxng", "none"):
        raise GptossError(f"GPTOSS_SEARCH={choice!r} is not one of exa, searxng, none")
    if choice == "none":
        return None
    if choice == "exa" or (not choice and env.get("EXA_API_KEY")):
        if not env.get("EXA_API_KEY"):
            raise GptossError("GPTOSS_SEARCH=exa needs EXA_API_KEY", "get a key at https://exa.ai")
        return ExaBackend(env["EXA_API_KEY"], env.get("EXA_BASE_URL", "https://api.exa.ai"))
    if choice == "searxng" or (not choice and env.get("SEARXNG_URL")):
        if not env.get("SEARXNG_URL"):
            raise GptossError("GPTOSS_SEARCH=searxng needs SEARXNG_URL", "e.g. SEARXNG_URL=http://localhost:8888")
        return SearxngBackend(env["SEARXNG_URL"])
    return None


# ---- HTML to text ------------------------------------------------------------------------------------


def html_to_page(html: str, url: str) -> Page:
    """A page's text, links written inline as ``【id†text】`` (the reference's format)."""
    import html2text

    html = html.replace("【", "〖").replace("】", "〗")  # the model's link brackets are ours alone
    html = re.sub(r"(?<=\w)((<[^>]*>)+)(?=\w)", r" \1", html)  # words in adjacent cells stay apart
    links: dict[str, str] = {}
    ids: dict[str, str] = {}
    here = domain(url)
    stack: list[str | None] = []

    def on_tag(parser, tag, attrs, start):
        if tag != "a":
            return False
        if start:
            href = (attrs.get("href") or "").strip()
            target = urljoin(url, href) if href and not href.startswith(("#", "mailto:", "javascript:")) else ""
            if not urlparse(target).scheme.startswith("http"):
                stack.append(None)
                return True
            if target not in ids:
                ids[target] = str(len(links))
                links[ids[target]] = target
            parser.o(f"【{ids[target]}†")
            stack.append(target)
        elif stack:
            target = stack.pop()
            if target is not None:
                parser.o("】" if domain(target) == here else f"†{domain(target)}】")
        return True

    h = html2text.HTML2Text(baseurl=url)
    h.tag_callback = on_tag
    h.ignore_images = h.ignore_emphasis = h.ignore_tables = True
    h.unicode_snob = True
    h.body_width = 0
    text = h.handle(html)
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text).strip()
    m = re.search(r"<title[^>]*>(.*?)</title>", html, re.S | re.I)
    title = re.sub(r"\s+", " ", html2text.HTML2Text().handle(m.group(1))).strip() if m else ""
    return Page(url, title or here or url, f"URL: {url}\n{text}", links)


# ---- the browser ------------------------------------------------------------------------------------


class Browser:
    """One session's browser: the pages opened so far (their cursors) and the search backend."""

    def __init__(self, backend=None, client=None):
        import httpx

        self.backend = backend
        self.client = client or httpx.Client(timeout=20, follow_redirects=True,
                                             headers={"User-Agent": USER_AGENT})
        self.pages: list[Page] = []

    def url_for_cursor(self, cursor: int) -> str | None:
        if 0 <= cursor < len(self.pages) and not self.pages[cursor].listing:
            return self.pages[cursor].url
        return None

    def call(self, function: str, arguments: str) -> str:
        """Run ``browser.FUNCTION`` with its JSON ``arguments``; the text for the model."""
        try:
            args = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            return "Error: the arguments are not valid JSON"
        if not isinstance(args, dict):
            return "Error: the arguments must be a JSON object"
        try:
            if function == "search":
                if not isinstance(args.get("query"), str):
                    raise BrowserError("`search` needs a `query` string")
                return self.search(args["query"], args.get("topn", 10))
            if function == "open":
                return self.open(args.get("id", -1), args.get("cursor", -1), args.get("loc", -1),
                                 args.get("num_lines", -1), bool(args.get("view_source", False)))
            if function == "find":
                if not isinstance(args.get("pattern"), str):
                    raise BrowserError("`find` needs a `pattern` string")
                return self.find(args["pattern"], args.get("cursor", -1))
            return f"Error: unknown browser function `{function}` (search, open, find)"
        except BrowserError as e:
            return f"Error: {e}"

    def _page(self, cursor) -> Page:
        if not self.pages:
            raise BrowserError("no pages are open yet")
        if not isinstance(cursor, int) or cursor == -1:
            return self.pages[-1]
        if not 0 <= cursor < len(self.pages):
            raise BrowserError(f"cursor `{cursor}` is out of range; the cursors are 0 to {len(self.pages) - 1}")
        return self.pages[cursor]

    def search(self, query: str, topn=10) -> str:
        if self.backend is None:
            raise BrowserError("no search backend is configured, so `search` cannot run. `open` still works "
                               "with a full URL (the user can set EXA_API_KEY or SEARXNG_URL to enable search).")
        topn = topn if isinstance(topn, int) and 0 < topn <= 50 else 10
        import httpx

        try:
            results = self.backend.search(self.client, query, topn)
        except httpx.HTTPError as e:
            raise BrowserError(f"search for `{query}` failed: {e}") from None
        lines = ["# Search Results", ""]
        links = {}
        for i, r in enumerate(results):
            links[str(i)] = r.url
            snippet = re.sub(r"\s+", " ", r.snippet).strip()[:400]
            title = re.sub(r"\s+", " ", r.title).strip().replace("【", "〖").replace("】", "〗")
            lines.append(f"* 【{i}†{title}†{domain(r.url)}】" + (f" {snippet}" if snippet else ""))
        if not results:
            lines.append(f"No results for `{query}`.")
        return self._show(Page("", query, "\n".join(lines), links, listing=True))

    def open(self, id=-1, cursor=-1, loc=-1, num_lines=-1, view_source=False) -> str:
        if isinstance(id, str) and not id.lstrip("-").isdigit():
            return self._show(self._fetch(id, view_source), loc, num_lines)
        id = int(id) if isinstance(id, (int, str)) else -1
        page = self._page(cursor)
        if id >= 0:
            if str(id) not in page.links:
                raise BrowserError(f"no link `{id}` on page {self.pages.index(page)}")
            return self._show(self._fetch(page.links[str(id)], view_source), loc, num_lines)
        return self._show(page, loc, num_lines)     # scroll the page: a new cursor on it

    def find(self, pattern: str, cursor=-1) -> str:
        page = self._page(cursor)
        if page.listing:
            raise BrowserError("`find` cannot run on a search or find results page")
        lines, needle = page.lines(), pattern.lower()
        chunks, links, i = [], {}, 0
        while i < len(lines) and len(chunks) < 50:
            if needle in lines[i].lower():
                chunks.append(f"# 【{len(chunks)}†match at L{i}】\n" + "\n".join(lines[i:i + FIND_CONTEXT]))
                links[str(len(links))] = page.url
                i += FIND_CONTEXT
            else:
                i += 1
        text = "\n\n".join(chunks) if chunks else f"No `find` results for pattern: `{pattern}`"
        return self._show(Page(page.url, f"Find results for text: `{pattern}` in `{page.title}`", text, links,
                               listing=True))

    def _fetch(self, url: str, view_source: bool) -> Page:
        import httpx

        if urlparse(url).scheme not in ("http", "https"):
            url = "https://" + url if "://" not in url else url
            if urlparse(url).scheme not in ("http", "https"):
                raise BrowserError(f"only http and https URLs open, not `{url[:200]}`")
        try:
            with self.client.stream("GET", url) as r:
                body = b""
                for chunk in r.iter_bytes():
                    body += chunk
                    if len(body) > MAX_BYTES:
                        break
                status, ctype = r.status_code, r.headers.get("content-type", "")
                encoding = r.encoding or "utf-8"
                final = str(r.url)
        except httpx.HTTPError as e:
            raise BrowserError(f"error fetching `{url[:300]}`: {e}") from None
        if status >= 400:
            raise BrowserError(f"`{url[:300]}` answered HTTP {status}")
        text = body.decode(encoding, errors="replace")
        if view_source or not ("html" in ctype or (not ctype and "<html" in text[:1000].lower())):
            if not view_source and ctype and not ctype.startswith(("text/", "application/json", "application/xml")):
                raise BrowserError(f"`{final[:300]}` is {ctype.split(';')[0]}, not a page to read")
            return Page(final, final, f"URL: {final}\n{text}")
        return html_to_page(text, final)

    def _show(self, page: Page, loc=-1, num_lines=-1) -> str:
        lines = page.lines()
        loc = loc if isinstance(loc, int) and loc >= 0 else 0
        if loc >= len(lines):
            raise BrowserError(f"invalid location `{loc}`: the page's last line is {len(lines) - 1}")
        if isinstance(num_lines, int) and num_lines > 0:
            end = min(len(lines), loc + num_lines)
        else:
            end, size = loc, 0
            while end < len(lines) and (end == loc or size + len(lines[end]) + 8 <= VIEW_CHARS):
                size += len(lines[end]) + 8
                end += 1
        self.pages.append(page)
        cursor = len(self.pages) - 1
        head = page.title + (f" ({page.url})" if page.url else "")
        body = "\n".join(f"L{i}: {lines[i]}" for i in range(loc, end))
        return f"[{cursor}] {head}\n**viewing lines [{loc} - {end - 1}] of {len(lines) - 1}**\n\n{body}"
