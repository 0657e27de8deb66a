"""Graders: turn one model reply into a grade, with no model and no network in the loop.

Each grader reads what the Harmony parser made of the reply (``Reply``: the final-channel answer,
the reasoning, the tool calls, the malformed raw text, why generation stopped) and the problem's
expected answer, and returns a ``Grade`` saying whether it is correct, what was extracted, what
was expected and, in words, why. Answers are read from the ``final`` channel only: a model that
puts its answer in the analysis and never writes a final message has not answered.

The graders (``GRADERS``), with examples of final answers and what they extract:

``exact``     the answer, normalised (case, spaces, surrounding quotes/markdown, a trailing full
              stop), equals the expected text or one of a list of them.
              ``"**Paris.**"`` -> ``paris`` (expected ``Paris``: correct)
``numeric``   the content of the last ``\\boxed{...}`` if there is one, else the last number in the
              answer; compared as numbers with ``rel_tol``/``abs_tol`` (``integer: true`` also
              requires a whole number, as AIME does).
              ``"so \\boxed{1,234}"`` -> ``1234``; ``"It is 3/4, or 0.75 m."`` -> ``0.75``;
              ``"\\boxed{\\frac{3}{4}}"`` -> ``0.75``; ``"no idea"`` -> nothing (incorrect)
``choice``    the letter of a multiple-choice answer (``letters``, default ``ABCD``), from the
              strongest declaration found: ``Answer: C`` / ``**Answer:** (C)`` / ``\\boxed{C}`` /
              a lone ``(C)`` / an answer that is only ``C``. The patterns follow the ones
              OpenAI's gpt-oss evals use (``abcd_grader.py``), written afresh.
              ``"The answer is (B)."`` -> ``B``; ``"A or B"`` -> nothing
``tool_call`` the reply calls ``functions.NAME`` (the expected function), its arguments parse as
              JSON and validate against the declared tool's JSON schema (``jsonschema``), and any
              ``expected_arguments`` hold those values (a string: contained, any case).
              ``to=functions.get_weather`` + ``{"city": "Paris"}`` -> correct
``final_channel``  the reply is well-formed Harmony (no text outside a message, no stray special
              token inside one), ends its turn with ``<|return|>`` and has a
              non-empty final-channel message; with ``expected`` set, the answer also contains
              that text (case-insensitive).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from fractions import Fraction

from .errors import GptossError


@dataclass
class Reply:
    """What the model produced for one prompt, as the Harmony parser read it."""

    answer: str = ""                 # final channel text
    reasoning: str = ""              # analysis channel text
    tool_calls: list[dict] = field(default_factory=list)  # {recipient, arguments, content_type}
    raw: str = ""                    # text that was not well-formed Harmony
    stop_reason: str = "stop"        # stop | length | context
    malformed: list[str] = field(default_factory=list)  # the parser's complaints, e.g. a stray special token


@dataclass
class Grade:
    correct: bool
    extracted: object = None         # what the grader read from the reply (None: nothing)
    expected: object = None
    reason: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


# ---- normalising and extracting ---------------------------------------------------------------

_WRAPPERS = "\"'`*_ "


def normalize_text(text: str) -> str:
    """Case-folded, spaces collapsed, surrounding quotes/markdown and a final full stop removed."""
    text = " ".join(str(text).split()).casefold()
    prev = None
    while prev != text:
        prev = text
        text = text.strip(_WRAPPERS).removesuffix(".").strip(_WRAPPERS)
    return text


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced; None if none."""
    found = None
    for m in re.finditer(r"\\(?:boxed|fbox|framebox)\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found = text[m.end():i - 1].strip()
    return found


_NUMBER = re.compile(r"[-−]?\d(?:[\d,]*\d)?(?:\.\d+)?(?:[eE][-+]?\d+)?(?:\s*/\s*\d+)?|[-−]?\.\d+")


def parse_number(text: str) -> Fraction | None:
    """A number written as the model might write it: ``1,234``, ``-0.5``, ``3/4``, ``\\frac{3}{4}``,
    ``2.5e3``, ``$12``, ``45%`` (read as 45). None when ``text`` holds no single number."""
    t = text.strip().replace("−", "-").replace("\\!", "").replace("\\,", "").replace("$", "")
    t = re.sub(r"\\(?:text|mathrm|textbf)\{([^{}]*)\}", r"\1", t)
    frac = re.fullmatch(r"(-?)\\d?frac\{([^{}]+)\}\{([^{}]+)\}", t)
    if frac:
        num, den = parse_number(frac.group(2)), parse_number(frac.group(3))
        if num is None or not den:
            return None
        return -num / den if frac.group(1) else num / den
    t = t.rstrip("%").strip()
    m = _NUMBER.fullmatch(t) or _NUMBER.fullmatch(t.split(" ")[0] if t else t)
    if not m:
        return None
    s = m.group(0).replace(",", "").replace(" ", "").replace("−", "-")
    try:
        if "/" in s:
            num, den = s.split("/")
            return Fraction(num) / Fraction(den) if Fraction(den) else None
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def last_number(text: str) -> str | None:
    """The last number written in ``text`` (as written), or None."""
    found = _NUMBER.findall(text)
    return found[-1] if found else None


def extract_numeric(text: str) -> tuple[Fraction | None, str | None]:
    """(value, where it came from): the last boxed answer if any, else the last number."""
    boxed = extract_boxed(text)
    if boxed is not None:
        value = parse_number(boxed)
        if value is None and (inner := last_number(boxed)) is not None:
            value = parse_number(inner)   # \boxed{x = 12}: the number inside
        return value, f"boxed {boxed!r}"
    num = last_number(text)
    return (parse_number(num), f"last number {num!r}") if num is not None else (None, None)


# Strongest first: an explicit "Answer: X", then LaTeX boxes, then bare (X), then a lone letter.
_CHOICE_PATTERNS = [
    r"(?:\*{1,2}|_{1,2})(?i:answers?)\s*[:\-–]?\s*(?:\*{1,2}|_{1,2})\s*\(?\s*([{L}])\s*\)?(?![A-Za-z0-9])",
    r"\b(?i:(?:final\s+)?answers?(?:\s+is)?)\s*[:\-–]?\s*(?:\*{1,2}|_{1,2})?\s*\(\s*([{L}])\s*\)",
    r"\b(?i:(?:final\s+)?answers?(?:\s+is)?)\s*[:\-–]?\s*(?:\*{1,2}|_{1,2})?\s*(?i:option\s+)?([{L}])(?![A-Za-z0-9])",
    r"\b(?i:option|choice)\s*[:\-–]?\s*\(?([{L}])(?![A-Za-z0-9])",
    r"\\boxed\{\s*(?:\\text(?:bf)?\{\s*)?\(?([{L}])\)?(?![A-Za-z0-9])",
    r"(?<![A-Za-z0-9])[\(\[]\s*([{L}])\s*[\)\]](?![A-Za-z0-9])",
    r"(?<![A-Za-z0-9])(?:\*{1,2}|_{1,2})([{L}])(?:\*{1,2}|_{1,2})(?![A-Za-z0-9])",
    r"(?m)^\s*(?:\*{1,2}|_{1,2})?([{L}])(?:\*{1,2}|_{1,2})?\s*(?:[.):\-–]\s*.*)?$",
]


def extract_choice(text: str, letters: str = "ABCD") -> str | None:
    """The chosen letter (upper case: a lone lower-case ``a`` is an article, not an option), from
    the strongest pattern that matches; its last match wins (a model that corrects itself means
    the later one). None when no pattern matches."""
    for pattern in _CHOICE_PATTERNS:
        found = re.findall(pattern.replace("{L}", re.escape(letters)), text)
        if found:
            return found[-1]
    return None


# ---- the graders -------------------------------------------------------------------------------


def _no_answer(reply: Reply, expected) -> Grade:
    why = "no final-channel answer"
    if reply.stop_reason == "length":
        why += " (ran out of --max-tokens)"
    elif reply.raw:
        why += " (the output was not well-formed Harmony)"
    return Grade(False, None, expected, why)


def grade_exact(reply: Reply, expected, options: dict) -> Grade:
    if not reply.answer.strip():
        return _no_answer(reply, expected)
    wanted = expected if isinstance(expected, list) else [expected]
    got = normalize_text(reply.answer)
    ok = any(got == normalize_text(w) for w in wanted)
    return Grade(ok, got, expected, "matches" if ok else "differs from the expected text")


def grade_numeric(reply: Reply, expected, options: dict) -> Grade:
    if not reply.answer.strip():
        return _no_answer(reply, expected)
    value, where = extract_numeric(reply.answer)
    if value is None:
        return Grade(False, None, expected, f"no number found ({where})" if where else "no number found")
    target = parse_number(str(expected))
    if target is None:
        raise GptossError(f"expected answer {expected!r} is not a number", "fix the suite's data file")
    shown = int(value) if value.denominator == 1 else float(value)
    if options.get("integer") and value.denominator != 1:
        return Grade(False, shown, expected, f"{where}: not a whole number")
    rel, ab = float(options.get("rel_tol", 0.0)), float(options.get("abs_tol", 0.0))
    ok = value == target or math.isclose(float(value), float(target), rel_tol=rel, abs_tol=ab)
    return Grade(ok, shown, expected, f"{where}: {'equal' if ok else 'not equal'}")


def grade_choice(reply: Reply, expected, options: dict) -> Grade:
    if not reply.answer.strip():
        return _no_answer(reply, expected)
    letter = extract_choice(reply.answer, options.get("letters", "ABCD"))
    if letter is None:
        return Grade(False, None, expected, "no option letter found")
    ok = letter == str(expected).upper()
    return Grade(ok, letter, expected, "right option" if ok else "wrong option")


def grade_tool_call(reply: Reply, expected, options: dict) -> Grade:
    """``expected`` is the function name; ``options['tools']`` the declared tools (their JSON
    schemas); ``options['expected_arguments']`` optional values the arguments must hold."""
    if not reply.tool_calls:
        why = "no tool call" + (" (the output was not well-formed Harmony)" if reply.raw else "")
        return Grade(False, None, expected, why)
    call = reply.tool_calls[0]
    name = (call.get("recipient") or "").removeprefix("functions.")
    if name != expected:
        return Grade(False, call.get("recipient"), expected, f"called {call.get('recipient')!r}")
    try:
        args = json.loads(call.get("arguments") or "")
    except json.JSONDecodeError as e:
        return Grade(False, call.get("arguments"), expected, f"arguments are not JSON ({e.msg})")
    if not isinstance(args, dict):
        return Grade(False, args, expected, "arguments are not a JSON object")
    schema = next((t.get("parameters") for t in options.get("tools", ()) if t.get("name") == name), None)
    if schema is not None:
        problem = schema_error(args, schema)
        if problem:
            return Grade(False, args, expected, f"arguments do not match the schema: {problem}")
    for key, value in options.get("expected_arguments", {}).items():
        got = args.get(key)
        # strings: the expected text within the argument ("Tokyo" in "Tokyo, Japan"), any case
        same = normalize_text(value) in normalize_text(got) if isinstance(value, str) and isinstance(got, str) else got == value
        if not same:
            return Grade(False, args, expected, f"argument {key!r} is {got!r}, expected {value!r}")
    return Grade(True, args, expected, "valid call")


def schema_error(instance, schema: dict) -> str | None:
    """The first JSON-schema violation of ``instance`` (one line), or None when it validates."""
    try:
        import jsonschema
    except ImportError:
        raise GptossError("the tool_call grader needs the jsonschema package", "pip install jsonschema") from None
    validator = jsonschema.Draft202012Validator(schema)
    error = next(iter(sorted(validator.iter_errors(instance), key=lambda e: list(e.path))), None)
    if error is None:
        return None
    where = "/".join(str(p) for p in error.path)
    return f"{where + ': ' if where else ''}{error.message}"


def grade_final_channel(reply: Reply, expected, options: dict) -> Grade:
    if reply.raw or reply.malformed:
        why = "; ".join(reply.malformed[:2]) or "text outside any message"
        return Grade(False, reply.raw[:200] or None, expected, f"output is not well-formed Harmony ({why})")
    if reply.stop_reason != "stop":
        return Grade(False, None, expected, f"the turn did not end with <|return|> ({reply.stop_reason})")
    if reply.tool_calls:
        return Grade(False, reply.tool_calls[0].get("recipient"), expected, "called a tool instead of answering")
    if not reply.answer.strip():
        return Grade(False, None, expected, "no final-channel answer")
    if expected and normalize_text(expected) not in normalize_text(reply.answer):
        return Grade(False, reply.answer, expected, "the final answer lacks the expected text")
    return Grade(True, reply.answer, expected, "answered in the final channel")


GRADERS = {
    "exact": grade_exact,
    "numeric": grade_numeric,
    "choice": grade_choice,
    "tool_call": grade_tool_call,
    "final_channel": grade_final_channel,
}


def grade(grader: str, reply: Reply, expected, options: dict | None = None) -> Grade:
    """Grade ``reply`` against ``expected`` with the grader named ``grader``."""
    if grader not in GRADERS:
        raise GptossError(f"unknown grader {grader!r}", f"one of {', '.join(GRADERS)}")
    return GRADERS[grader](reply, expected, options or {})
