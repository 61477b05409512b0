"""Declarative type-and-range checks for the JSON and TOML documents the tool reads from outside
(manifests, configs, recipes): a schema is a function ``check(value, where)`` that raises ``SchemaError``
naming the field's path and the problem, built from the few constructors below."""

import json
import re
from collections.abc import Callable, Mapping
from typing import Any

Check = Callable[[Any, str], None]
MAX_INT_DIGITS = 32  # no field of any document here needs more; Python refuses to parse ints past 4300


def _bounded_int(text: str) -> int:
    if len(text) > MAX_INT_DIGITS + 1:
        raise ValueError(f"an integer of {len(text)} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def loads_json(data: str | bytes, **options: Any) -> Any:
    """``json.loads`` for a document from outside: integers of at most ``MAX_INT_DIGITS`` digits, and every
    failure (bad UTF-8, bad JSON, a huge integer, too deep a nesting) a ``ValueError``."""
    try:
        return json.loads(data, parse_int=_bounded_int, **options)
    except RecursionError:
        raise ValueError("nested too deeply") from None


class SchemaError(ValueError):
    """``where``: the field's dotted path; ``problem``: what is wrong with it."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where or 'the document'}: {problem}")
        self.where, self.problem = where, problem


def field(where: str, name: str) -> str:
    """The dotted path of field ``name`` under ``where`` ("" at the document's top)."""
    return f"{where}.{name}" if where else name


def describe_value(value: Any) -> str:
    """A value as an error names it: its type and at most 40 characters of its repr."""
    text = repr(value)
    return f"{type(value).__name__} {text[:40] + '…' if len(text) > 40 else text}"


def integer(low: int | None = 0, high: int | None = None) -> Check:
    def check(value: Any, where: str) -> None:
        if not isinstance(value, int) or isinstance(value, bool):
            raise SchemaError(where, f"must be an integer, got {describe_value(value)}")
        if (low is not None and value < low) or (high is not None and value > high):
            raise SchemaError(where, f"must be in [{low}, {high if high is not None else '∞'}], got {value}")
    return check


def number(low: float | None = None, high: float | None = None, low_open: bool = False) -> Check:
    def check(value: Any, where: str) -> None:
        if not isinstance(value, int | float) or isinstance(value, bool) or value != value:
            raise SchemaError(where, f"must be a number, got {describe_value(value)}")
        if (low is not None and (value <= low if low_open else value < low)) or (high is not None and value > high):
            raise SchemaError(where, f"must be in {'(' if low_open else '['}{low}, {high}], got {value}")
    return check


def boolean(value: Any, where: str) -> None:
    if not isinstance(value, bool):
        raise SchemaError(where, f"must be true or false, got {describe_value(value)}")


def string(pattern: str | None = None, max_length: int = 4096, choices: tuple[str, ...] | None = None) -> Check:
    def check(value: Any, where: str) -> None:
        if not isinstance(value, str):
            raise SchemaError(where, f"must be a string, got {describe_value(value)}")
        if len(value) > max_length:
            raise SchemaError(where, f"is longer than {max_length} characters")
        if choices is not None and value not in choices:
            raise SchemaError(where, f"must be one of {', '.join(choices)}, got {value!r}")
        if pattern is not None and not re.fullmatch(pattern, value):
            raise SchemaError(where, f"{value[:60]!r} is not of the form {pattern}")
    return check


def nullable(inner: Check) -> Check:
    def check(value: Any, where: str) -> None:
        if value is not None:
            inner(value, where)
    return check


def either(*options: Check) -> Check:
    """The first option's complaint where none accepts the value."""
    def check(value: Any, where: str) -> None:
        first: SchemaError | None = None
        for option in options:
            try:
                option(value, where)
                return
            except SchemaError as exc:
                first = first or exc
        assert first is not None
        raise first
    return check


def list_of(item: Check, min_length: int = 0, max_length: int = 1 << 20) -> Check:
    def check(value: Any, where: str) -> None:
        if not isinstance(value, list):
            raise SchemaError(where, f"must be a list, got {describe_value(value)}")
        if not min_length <= len(value) <= max_length:
            raise SchemaError(where, f"must have {min_length} to {max_length} entries, has {len(value)}")
        for i, element in enumerate(value):
            item(element, f"{where}[{i}]")
    return check


def mapping_of(value_check: Check, key_pattern: str | None = None, max_length: int = 1 << 20) -> Check:
    def check(value: Any, where: str) -> None:
        if not isinstance(value, dict):
            raise SchemaError(where, f"must be an object, got {describe_value(value)}")
        if len(value) > max_length:
            raise SchemaError(where, f"has more than {max_length} entries")
        for key, element in value.items():
            if key_pattern is not None and not re.fullmatch(key_pattern, key):
                raise SchemaError(where, f"key {key[:60]!r} is not of the form {key_pattern}")
            value_check(element, field(where, key))
    return check


def record(required: Mapping[str, Check] | None = None, optional: Mapping[str, Check] | None = None,
           closed: bool = False) -> Check:
    """An object with ``required`` fields and typed ``optional`` ones; other fields are allowed unless
    ``closed``."""
    required, optional = dict(required or {}), dict(optional or {})

    def check(value: Any, where: str) -> None:
        if not isinstance(value, dict):
            raise SchemaError(where, f"must be an object, got {describe_value(value)}")
        for name, field_check in required.items():
            if name not in value:
                raise SchemaError(field(where, name), "is missing")
            field_check(value[name], field(where, name))
        for name, field_check in optional.items():
            if name in value:
                field_check(value[name], field(where, name))
        if closed and (unknown := sorted(set(value) - set(required) - set(optional))):
            raise SchemaError(field(where, unknown[0]), "is not a known field")
    return check
