"""Friendlier config errors and `--set KEY=VALUE` overrides, both driven by the Config schema.

msgspec says "unknown field" or "Invalid enum value" with a path; a newcomer wants to hear
which key was meant, which section holds it, and which values are allowed. Overrides edit
the decoded TOML before it is checked, so `--set` is validated exactly like the file.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

import msgspec

__all__ = ["apply_overrides", "explain_enum", "explain_unknown"]

_SECTION_ALIASES = {
    "judge": "rater",
    "generator": "generators",
    "models": "generators",
    "dataset": "source",
    "input": "source",
    "prompts": "source",
}
"""Section names a user may reach for (the README and the paper call the rater the judge)."""

_PART = re.compile(r"[^.\[\]]+|\[\d+\]")
_KEY = re.compile(r"[A-Za-z_][\w-]*(?:\.[\w-]+|\[\d+\])*")


def _unwrap(node: Any) -> Any:
    """The useful type inside `X | None` and `list[X]`."""
    while True:
        if isinstance(node, msgspec.inspect.UnionType):
            rest = [t for t in node.types if not isinstance(t, msgspec.inspect.NoneType)]
            if len(rest) != 1:
                return node
            node = rest[0]
        elif isinstance(node, msgspec.inspect.ListType):
            node = node.item_type
        else:
            return node


def _walk(root: type, path: str) -> Any:
    """The schema node at a msgspec error path like `rater.aspects[0]`, or None."""
    node: Any = msgspec.inspect.type_info(root)
    for part in _PART.findall(path):
        node = _unwrap(node)
        if part.startswith("[") or part.isdigit():
            continue
        if not isinstance(node, msgspec.inspect.StructType):
            return None
        field = next((f for f in node.fields if f.name == part), None)
        if field is None:
            return None
        node = field.type
    return node


def _fields(node: Any) -> list[str]:
    node = _unwrap(node)
    return [f.name for f in node.fields] if isinstance(node, msgspec.inspect.StructType) else []


def explain_unknown(root: type, section: str, field: str) -> str:
    """The message for an unknown key: the section it belongs in, or the nearest key."""
    if not section and field in _SECTION_ALIASES:
        return f"unknown section [{field}]: the section is [{_SECTION_ALIASES[field]}]"
    here = _fields(_walk(root, section))
    close = difflib.get_close_matches(field, here, n=1, cutoff=0.75)
    if close:
        return f"unknown key {field!r}; did you mean {close[0]!r}?"
    top = _fields(msgspec.inspect.type_info(root))
    homes = [name for name in top if name != section and field in _fields(_walk(root, name))]
    if homes:
        return f"unknown key {field!r}: it belongs in {' or '.join(f'[{h}]' for h in homes)}"
    close = difflib.get_close_matches(field, here, n=1, cutoff=0.6)
    if close:
        return f"unknown key {field!r}; did you mean {close[0]!r}?"
    return f"unknown key {field!r}"


def explain_enum(root: type, path: str, value: str) -> str | None:
    """The message for a value outside a fixed set: the values there are."""
    node = _unwrap(_walk(root, path))
    if not isinstance(node, msgspec.inspect.LiteralType):
        return None
    allowed = ", ".join(str(v) for v in node.values)
    return f"{value} is not one of: {allowed}"


def apply_overrides(
    raw: dict[str, Any], overrides: list[str], root: type | None = None
) -> dict[str, Any]:
    """Set each `KEY=VALUE` in the decoded TOML; VALUE is read as a TOML value (`3`, `true`,
    `["a"]`), or as a string where it is not one or where `root` says the key holds text
    (`rater.model=2024`). `generators.0.model` (or `generators[0]`) picks one table of an
    array.

    :raises ValueError: naming the override that is not `KEY=VALUE` or points nowhere.
    """
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not _KEY.fullmatch(key):
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. rater.model=gpt-4o")
        parts = _PART.findall(key)
        value = _value(text.strip())
        if root is not None and not isinstance(value, str) and _is_text(_walk(root, key)):
            value = text.strip()
        node: Any = raw
        for i, part in enumerate(parts[:-1]):
            index = part.strip("[]")
            if isinstance(node, list):
                if not index.isdigit() or int(index) >= len(node):
                    raise ValueError(f"--set {item!r}: {'.'.join(parts[:i])} has no table {index}")
                node = node[int(index)]
            else:
                node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise ValueError(f"--set {item!r}: {part} is not a section")
        last = parts[-1].strip("[]")
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ValueError(f"--set {item!r}: no such item {last}")
            node[int(last)] = value
        else:
            node[last] = value
    return raw


def _is_text(node: Any) -> bool:
    if isinstance(node, msgspec.inspect.UnionType):
        return any(isinstance(t, msgspec.inspect.StrType) for t in node.types)
    return isinstance(node, msgspec.inspect.StrType)


def _value(text: str) -> Any:
    try:
        return msgspec.toml.decode(f"v = {text}".encode())["v"]
    except msgspec.DecodeError:
        return text
