"""Function tools in Harmony: their spec, and their declaration in the developer message.

Harmony declares the functions a model may call in a TypeScript-like ``namespace functions { ... }``
block: one ``type NAME = (_: {...}) => any;`` per tool, its JSON-schema parameters turned into an
object type with comments. gpt-oss learned exactly the text that openai-harmony's reference
renderer writes (``json_schema_to_typescript`` and ``template_tools_section`` of its
``src/encoding.rs``), so this module follows it rule for rule, quirks included (a nested object's
closing brace is indented like its properties, not like its key; enum defaults are bare).
"""

from __future__ import annotations

import dataclasses
import decimal
import json
import math
from dataclasses import dataclass

from .errors import GptossError


@dataclass(frozen=True)
class FunctionTool:
    """A function the model may call: rendered in the developer message's ``functions`` namespace."""

    name: str
    description: str = ""
    parameters: dict | None = None  # JSON schema of the single argument object; None: no arguments

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, raw: dict) -> "FunctionTool":
        try:
            return cls(raw["name"], raw.get("description", ""), raw.get("parameters"))
        except (KeyError, TypeError) as e:
            raise GptossError(f"not a function tool: {e}") from None


# ---- JSON schema -> TypeScript-like type --------------------------------------------------------


def _get(schema, key):
    return schema.get(key) if isinstance(schema, dict) else None


def _has(schema, key) -> bool:
    return isinstance(schema, dict) and key in schema


def _str(schema, key) -> str | None:
    value = _get(schema, key)
    return value if isinstance(value, str) else None


def _is_enum(schema) -> bool:
    values = _get(schema, "enum")
    return isinstance(values, list) and len(values) > 0


# ---- JSON as Rust's serde_json reads and writes it ------------------------------------------
# openai-harmony's Python binding hands a tool's schema to Rust as ``json.dumps`` text; serde_json
# parses it into a ``Value`` and the renderer prints a default with ``to_string``. A number's text
# thus goes Python repr -> serde_json's parser -> serde_json's printer, and both Rust steps differ
# from Python's: the printer lays digits out the ``ryu`` way (``1e-6``, ``1e20``, ``1e16`` where
# Python writes ``1e-06``, ``1e+20``, ``1e+16``), and the parser (without serde_json's
# ``float_roundtrip`` feature) is not correctly rounded: it multiplies or divides the significand by
# a power of ten in f64 arithmetic, so some floats come back one ulp off and print other digits.

_U64_MAX = 2 ** 64 - 1
_POW10 = [float(f"1e{i}") for i in range(309)]  # serde_json's POW10 table: correctly rounded literals


def _serde_f64_from_parts(significand: int, exponent: int) -> float:
    """serde_json's ``f64_from_parts``: ``significand`` x 10^``exponent``, rounded twice or more."""
    f = float(significand)
    while True:
        if abs(exponent) < len(_POW10):
            return f * _POW10[exponent] if exponent >= 0 else f / _POW10[-exponent]
        if f == 0.0 or exponent >= 0:
            return f if f == 0.0 else math.inf  # serde_json errors on the latter: out of range
        f /= 1e308
        exponent += 308


def _serde_parse_number(text: str) -> int | float:
    """A JSON number's text as serde_json's parser reads it: an int when it is an integer that
    fits in u64 (or i64 when negative), else an f64 from the digits that fit in a u64."""
    negative, text = text.startswith("-"), text.lstrip("-")
    mantissa, _, exp_text = text.replace("E", "e").partition("e")
    whole, _, frac = mantissa.partition(".")
    significand, exponent, overflowed = 0, 0, False
    for i, c in enumerate(whole + frac):
        in_fraction = i >= len(whole)
        if overflowed or significand * 10 + int(c) > _U64_MAX:
            overflowed = True  # digits past u64 are dropped: whole ones still scale the value
            exponent += 0 if in_fraction else 1
            continue
        significand = significand * 10 + int(c)
        exponent -= 1 if in_fraction else 0
    if not frac and not exp_text and not overflowed:
        if not negative:
            return significand
        if significand <= 2 ** 63:
            return -significand
    value = _serde_f64_from_parts(significand, exponent + int(exp_text or 0))
    return -value if negative else value


def _rust_float(x: float) -> str:
    """``x`` as serde_json prints an f64 (the ``ryu`` crate's ``format64``): the shortest digits
    that round-trip (Python's ``repr`` finds the same ones), laid out the ryu way."""
    if not math.isfinite(x):
        return "null"  # serde_json's Value holds no NaN or infinity
    sign = "-" if math.copysign(1.0, x) < 0 else ""
    if x == 0:
        return sign + "0.0"
    shortest = decimal.Decimal(repr(abs(x))).normalize().as_tuple()  # DIGITS x 10^exponent
    digits = "".join(map(str, shortest.digits))
    length = len(digits)
    point = length + shortest.exponent  # the value is 0.DIGITS x 10^point
    if length <= point <= 16:                     # 1234e7 -> 12340000000.0
        return f"{sign}{digits}{'0' * (point - length)}.0"
    if 0 < point <= 16:                           # 1234e-2 -> 12.34
        return f"{sign}{digits[:point]}.{digits[point:]}"
    if -5 < point <= 0:                           # 1234e-6 -> 0.001234
        return f"{sign}0.{'0' * -point}{digits}"
    rest = f".{digits[1:]}" if length > 1 else ""  # 1e30, 1234e30 -> 1.234e33
    return f"{sign}{digits[0]}{rest}e{point - 1}"


def rust_json(value) -> str:
    """``value`` as openai-harmony's renderer writes it: compact JSON, after the round trip
    through serde_json described above. Objects keep their key order (serde_json's
    ``preserve_order``); strings are escaped as Python's ``json`` does with ``ensure_ascii=False``."""
    if value is None or isinstance(value, bool) or isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            return "null"
        number = _serde_parse_number(json.dumps(value))
        return str(number) if isinstance(number, int) else _rust_float(number)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(rust_json(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{rust_json(str(k))}:{rust_json(v)}" for k, v in value.items()) + "}"
    return json.dumps(str(value), ensure_ascii=False)


def _default_text(schema, value, quote_enum_strings: bool = False) -> str:
    """A default as the reference writes it: strings quoted, except enum strings (bare)."""
    if isinstance(value, str) and not _is_enum(schema):
        return f'"{value}"'
    if isinstance(value, str) and not quote_enum_strings:
        return value
    return rust_json(value)


def _with_null(schema, type_str: str) -> str:
    nullable = _get(schema, "nullable") is True
    return f"{type_str} | null" if nullable and "null" not in type_str else type_str


def schema_to_typescript(schema, indent: str = "") -> str:
    """A JSON schema as the TypeScript-like type of Harmony's tool declarations
    (``json_schema_to_typescript`` of openai-harmony's ``encoding.rs``, rule for rule)."""
    variants = _get(schema, "oneOf")
    if isinstance(variants, list):
        out = ""
        for variant in variants:
            out += f"\n{indent} | " + _with_null(variant, schema_to_typescript(variant, indent + "   "))
            notes = [d] if (d := _str(variant, "description")) is not None else []
            if _has(variant, "default"):
                notes.append("default: " + _default_text(variant, variant["default"], True))
            out += f" // {' '.join(notes)}" if notes else ""
        return out
    types = _get(schema, "type")
    if isinstance(types, list):
        names = ["number" if t == "integer" else t for t in types if isinstance(t, str)]
        if names:
            return " | ".join(names)
    if not isinstance(types, str):
        return "any"
    if types == "object":
        return _object_to_typescript(schema, indent)
    if types == "string":
        values = _get(schema, "enum")
        names = [f'"{v}"' for v in values if isinstance(v, str)] if isinstance(values, list) else []
        return " | ".join(names) if names else "string"
    if types == "array":
        return f"{schema_to_typescript(schema['items'], indent)}[]" if "items" in schema else "Array<any>"
    return {"number": "number", "integer": "number", "boolean": "boolean"}.get(types, "any")


def _object_to_typescript(schema: dict, indent: str) -> str:
    out = f"{indent}// {d}\n" if (d := _str(schema, "description")) is not None else ""
    out += "{\n"
    properties = schema.get("properties")
    required = schema.get("required")
    required = {r for r in required if isinstance(r, str)} if isinstance(required, list) else set()
    for key, prop in properties.items() if isinstance(properties, dict) else ():
        optional = "" if key in required else "?"
        if (title := _str(prop, "title")) is not None:
            out += f"{indent}// {title}\n{indent}//\n"
        if not _has(prop, "oneOf") and (d := _str(prop, "description")) is not None:
            out += f"{indent}// {d}\n"
        examples = _get(prop, "examples")
        if isinstance(examples, list) and examples:
            out += f"{indent}// Examples:\n"
            out += "".join(f'{indent}// - "{e}"\n' for e in examples if isinstance(e, str))
        if isinstance(_get(prop, "oneOf"), list):
            out += _one_of_property(key, optional, prop, indent)
            continue
        out += f"{indent}{key}{optional}: "
        out += _with_null(prop, schema_to_typescript(prop, indent + "    ")) + ","
        if not _has(prop, "oneOf") and _has(prop, "default"):
            out += " // default: " + _default_text(prop, prop["default"])
        out += "\n"
    return out + f"{indent}}}"


def _one_of_property(key: str, optional: str, prop: dict, indent: str) -> str:
    """A property whose schema is a ``oneOf``: one ``|`` line per variant."""
    variants = prop["oneOf"]
    desc = _str(prop, "description")
    first_desc = _str(variants[0], "description") if variants else None
    desc_above = desc is not None and desc != first_desc
    out = f"{indent}// {desc}\n" if desc_above else ""
    if "default" in prop:
        out += f"{indent}// default: {_default_text(prop, prop['default'])}\n"
    out += f"{indent}{key}{optional}:\n"
    for i, variant in enumerate(variants):
        out += f"{indent} | " + _with_null(variant, schema_to_typescript(variant, indent + "   "))
        notes = []
        variant_desc = _str(variant, "description")
        if not (i == 0 and desc_above) and variant_desc is not None and variant_desc != desc:
            notes.append(variant_desc)
        if _has(variant, "default"):
            notes.append("default: " + _default_text(variant, variant["default"]))
        out += (f" // {' '.join(notes)}" if notes else "") + "\n"
    return out + f"{indent},\n"


def _lines(text: str) -> list[str]:
    """Rust's ``str::lines``: lines end at ``\n`` or ``\r\n``; the last one needs no ending.
    A ``\r`` with no ``\n`` after it, at the very end too, is kept (Rust 1.77 on)."""
    *ended, last = text.split("\n")
    return [p.removesuffix("\r") for p in ended] + ([last] if last else [])


def tools_section(tools: list[FunctionTool]) -> str:
    """The ``# Tools`` section declaring ``tools`` in the ``functions`` namespace."""
    lines = ["## functions\n", "namespace functions {\n"]
    for tool in tools:
        lines += [f"// {line}" for line in _lines(tool.description)]
        if tool.parameters is not None:
            lines.append(f"type {tool.name} = (_: {schema_to_typescript(tool.parameters)}) => any;\n")
        else:
            lines.append(f"type {tool.name} = () => any;\n")
    lines.append("} // namespace functions")
    return "# Tools\n\n" + "\n".join(lines)


# ---- built-in tool namespaces (the system message's ``# Tools``) ------------------------------
# gpt-oss was trained with two built-in tools, declared in the system message rather than the
# developer message: ``browser`` (a namespace of three functions) and ``python`` (a namespace with
# a description and no functions: the model sends it code). The texts below are openai-harmony's
# ``ToolNamespaceConfig.browser()`` and ``.python()`` (``src/chat.rs``), word for word.


@dataclass(frozen=True)
class ToolNamespace:
    """A namespace of tools declared in the system message (``## NAME`` under ``# Tools``)."""

    name: str
    description: str | None = None
    tools: tuple[FunctionTool, ...] = ()

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "tools": [t.to_dict() for t in self.tools]}

    @classmethod
    def from_dict(cls, raw: dict) -> "ToolNamespace":
        try:
            return cls(raw["name"], raw.get("description"), tuple(FunctionTool.from_dict(t) for t in raw.get("tools", ())))
        except (KeyError, TypeError) as e:
            raise GptossError(f"not a tool namespace: {e}") from None


BROWSER_DESCRIPTION = """Tool for browsing.
The `cursor` appears in brackets before each browsing display: `[{cursor}]`.
Cite information from the tool using the following format:
`【{cursor}†L{line_start}(-L{line_end})?】`, for example: `【6†L9-L11】` or `【8†L3】`.
Do not quote more than 10 words directly from the tool output.
sources=web (default: web)"""

BROWSER_FUNCTIONS = (
    FunctionTool("search", "Searches for information related to `query` and displays `topn` results.", {
        "type": "object",
        "properties": {"query": {"type": "string"}, "topn": {"type": "number", "default": 10},
                       "source": {"type": "string"}},
        "required": ["query"]}),
    FunctionTool("open", "Opens the link `id` from the page indicated by `cursor` starting at line number `loc`, showing `num_lines` lines.\n"
                 "Valid link ids are displayed with the formatting: `【{id}†.*】`.\n"
                 "If `cursor` is not provided, the most recent page is implied.\n"
                 "If `id` is a string, it is treated as a fully qualified URL associated with `source`.\n"
                 "If `loc` is not provided, the viewport will be positioned at the beginning of the document or centered on the most relevant passage, if available.\n"
                 "Use this function without `id` to scroll to a new location of an opened page.", {
        "type": "object",
        "properties": {"id": {"type": ["number", "string"], "default": -1}, "cursor": {"type": "number", "default": -1},
                       "loc": {"type": "number", "default": -1}, "num_lines": {"type": "number", "default": -1},
                       "view_source": {"type": "boolean", "default": False}, "source": {"type": "string"}}}),
    FunctionTool("find", "Finds exact matches of `pattern` in the current page, or the page given by `cursor`.", {
        "type": "object",
        "properties": {"pattern": {"type": "string"}, "cursor": {"type": "number", "default": -1}},
        "required": ["pattern"]}),
)

PYTHON_DRIVE = "/mnt/data"
PYTHON_INTERNET = "UNKNOWN. Depends on the cluster"


def python_description(timeout_s: float = 120.0, drive: str = PYTHON_DRIVE, internet: str = PYTHON_INTERNET) -> str:
    """openai-harmony's python tool text; its defaults give that text exactly. The chat fills in
    what is true here (its time limit, its folder, whether the network is cut), since the model
    acts on these words."""
    return ("Use this tool to execute Python code in your chain of thought. The code will not be shown to the user. "
            "This tool should be used for internal reasoning, but not for code that is intended to be visible to the "
            "user (e.g. when creating plots, tables, or files).\n\n"
            "When you send a message containing Python code to python, it will be executed in a stateful Jupyter "
            f"notebook environment. python will respond with the output of the execution or time out after "
            f"{float(timeout_s):.1f} seconds. The drive at '{drive}' can be used to save and persist user files. "
            f"Internet access for this session is {internet}.")


def browser_namespace() -> ToolNamespace:
    return ToolNamespace("browser", BROWSER_DESCRIPTION, BROWSER_FUNCTIONS)


def python_namespace(**kw) -> ToolNamespace:
    return ToolNamespace("python", python_description(**kw))


def namespace_section(ns: ToolNamespace) -> str:
    """One ``## NAME`` section, as openai-harmony's ``template_tools_section`` writes it: a namespace
    without functions is its description; one with functions is a ``namespace NAME { ... }``."""
    lines = [f"## {ns.name}\n"]
    if not ns.tools:
        return "\n".join(lines + [ns.description or ""])
    lines += [f"// {line}" for line in _lines(ns.description or "")]
    lines.append(f"namespace {ns.name} {{\n")
    for tool in ns.tools:
        lines += [f"// {line}" for line in _lines(tool.description)]
        if tool.parameters is not None:
            lines.append(f"type {tool.name} = (_: {schema_to_typescript(tool.parameters)}) => any;\n")
        else:
            lines.append(f"type {tool.name} = () => any;\n")
    lines.append(f"}} // namespace {ns.name}")
    return "\n".join(lines)


def builtin_tools_section(namespaces) -> str:
    return "# Tools\n\n" + "\n\n".join(namespace_section(ns) for ns in namespaces)
