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


def remembered(kind: str, package: Path, text: str, detail: Hashable, compute: Callable[[], T]) -> T:
    """``compute()``, or its result for the same package, text and ``detail`` (callers must not mutate it)."""
    key = (kind, str(Path(package).resolve()), hashlib.sha256((Path(package) / MANIFEST).read_bytes()).hexdigest(),
           hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest(), detail)
    if key not in _results:
        _results[key] = compute()
        while len(_results) > KEEP:
            _results.popitem(last=False)
    _results.move_to_end(key)
    result: T = _results[key]
    return result
