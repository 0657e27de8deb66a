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
import json
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


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _default_text(schema, value, quote_enum_strings: bool = False) -> str:
    """A default as the reference writes it: strings quoted, except enum strings (bare)."""
    if isinstance(value, str) and not _is_enum(schema):
        return f'"{value}"'
    if isinstance(value, str) and not quote_enum_strings:
        return value
    return _json(value)


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
    """Rust's ``str::lines``: split on newlines, drop one trailing empty line and trailing CRs."""
    parts = text.split("\n") if text else []
    if parts and parts[-1] == "":
        parts.pop()
    return [p[:-1] if p.endswith("\r") else p for p in parts]


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
