"""Plain data in and out: JSONL, YAML files and strict dataclasses built from mappings.

Used by every layer, so errors name the file (and line) or the key, and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from collections.abc import Iterable
from pathlib import Path

import yaml


class KeelInputError(ValueError):
    """Input keel cannot use (a file, a key, a value); the message names it and says what to change."""


def read_jsonl(path: str | Path, allow_empty: bool = False) -> list[dict]:
    """Rows of a JSONL file (blank lines skipped), with the file and line number in any parse error."""
    rows = []
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise KeelInputError(f"{path}: no such file.") from None
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise KeelInputError(f"{path}:{lineno}: not valid JSON ({err.msg}).") from None
    if not rows and not allow_empty:
        raise KeelInputError(f"{path} holds no records.")
    return rows


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """Write rows atomically: a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def load_yaml(path: str | Path):
    """A YAML file's content; a syntax error names the file, line and column."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KeelInputError(f"{path}: no such file.") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err)
        raise KeelInputError(f"{where}: not valid YAML ({problem}).") from None


def from_dict(cls, data, what: str | None = None, base=None, error: type[Exception] = KeelInputError):
    """Build dataclass ``cls`` from mapping ``data``, recursing into nested dataclasses; unknown keys fail.

    A nested mapping overrides the field's own default (``finetune: {steps: 5}`` keeps the fine-tune's
    other defaults, not those of a bare nested config). ``what`` names the thing in error messages.
    """
    what = what or cls.__name__
    if not isinstance(data, dict):
        raise error(f"{what}: expected a mapping, got {type(data).__name__}: {data!r}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise error(f"Unknown key(s) {unknown} in {what}; allowed keys: {', '.join(sorted(fields))}.")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        target = _dataclass_in(hints[key])
        if target is not None and isinstance(value, dict):
            current = getattr(base, key) if base is not None else _default(fields[key])
            current = current if isinstance(current, target) else None
            value = from_dict(target, value, f"{what}.{key}", current, error)
        kwargs[key] = value
    if base is not None:
        return dataclasses.replace(base, **kwargs)
    return cls(**kwargs)


def _default(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _dataclass_in(hint):
    if dataclasses.is_dataclass(hint):
        return hint
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        for arg in typing.get_args(hint):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def read_config_value(
    value, what: str, key: str | None = None, error: type[Exception] = KeelInputError, sole_key: bool = False
):
    """A config value given as data or as a string (the command line): an inline YAML/JSON document, or
    the path of a YAML/JSON file holding one, optionally under ``key`` (``sole_key``: only when it is the
    mapping's one key, for values that are mappings themselves). Returns ``(where, value)``, where
    ``where`` names the file when the value came from one (for error messages)."""
    if not isinstance(value, (str, Path)):
        return what, value
    text = str(value)
    inline = text.lstrip().startswith(("[", "{", "-")) or "\n" in text
    if not inline and (Path(text).suffix in (".yaml", ".yml", ".json") or Path(text).is_file()):
        what, value = text, load_yaml(text)
    else:
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise error(f"{what}: cannot read {text!r} as inline YAML/JSON or as a file ({err}).") from None
    if key is not None and isinstance(value, dict) and key in value and (len(value) == 1 or not sole_key):
        value = value[key]
    return what, value
