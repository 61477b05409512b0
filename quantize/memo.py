"""Calibration results reused within one process: recipes quantizing the same float package over the same
text (``make report``, the test suite) share its Hessians and sensitivities instead of recomputing them.
A package is identified by its manifest, which holds the size and sha256 of every file."""

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any, TypeVar

from gemma4_onnx.graphs.manifest import MANIFEST

T = TypeVar("T")
KEEP = 4
_results: "OrderedDict[tuple[Any, ...], Any]" = OrderedDict()


def _key(kind: str, package: Path, text: str, detail: Hashable) -> tuple[Any, ...]:
    return (kind, str(Path(package).resolve()), hashlib.sha256((Path(package) / MANIFEST).read_bytes()).hexdigest(),
            hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest(), detail)


def recall(kind: str, package: Path, text: str, detail: Hashable) -> Any:
    """A result kept for the same package, text and ``detail``, or None."""
    key = _key(kind, package, text, detail)
    if key in _results:
        _results.move_to_end(key)
    return _results.get(key)


def remember_result(kind: str, package: Path, text: str, detail: Hashable, result: Any) -> None:
    """Keep a complete result (callers must not mutate it); the oldest go beyond ``KEEP``."""
    _results[_key(kind, package, text, detail)] = result
    while len(_results) > KEEP:
        _results.popitem(last=False)


def remembered(kind: str, package: Path, text: str, detail: Hashable, compute: Callable[[], T]) -> T:
    """``compute()``, or its result for the same package, text and ``detail``."""
    result: T | None = recall(kind, package, text, detail)
    if result is None:
        result = compute()
        remember_result(kind, package, text, detail, result)
    return result
