"""The package's tokenizer: read only as the manifest lists it, and every call into its Rust code answered
in one line of ours.

A tokenizer.json someone else wrote can make the Rust code panic (a pre-tokenizer regex that exceeds
Oniguruma's retry limit on some text): pyo3 raises ``PanicException``, a ``BaseException``, after Rust's
panic hook has printed its own lines and a backtrace on file descriptor 2. Calls here hold fd 2 on
/dev/null meanwhile and turn the panic into a ``PackageError``."""

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from gemma4_onnx.errors import PackageError, UsageError
from gemma4_onnx.runtime.package_files import TOKENIZER, read_side_file

MAX_TOKENIZER_BYTES = 256 << 20  # Gemma's own tokenizer.json is ~33 MB


def read_tokenizer(directory: Path, manifest: dict[str, Any]) -> Tokenizer:
    """The tokenizer of a package that passed the gate (``open_package``)."""
    listed = manifest["files"].get(TOKENIZER)
    if listed is not None and listed["bytes"] > MAX_TOKENIZER_BYTES:
        raise PackageError(f"{directory}: {TOKENIZER} has {listed['bytes']} bytes (at most {MAX_TOKENIZER_BYTES})")
    data = read_side_file(directory, manifest, TOKENIZER)
    if data is None:
        raise UsageError(f"{directory}: no {TOKENIZER} in the package")
    try:
        with rust_calls(directory):
            tokenizer = Tokenizer.from_str(data.decode("utf-8"))
    except PackageError:
        raise
    except Exception as exc:  # UnicodeDecodeError, or the tokenizers library's plain Exception
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise PackageError(f"{directory}: {TOKENIZER} is not a readable tokenizer ({first})") from None
    return tokenizer


def encode(tokenizer: Tokenizer, text: str, where: Path | str = "the package") -> list[int]:
    """``text``'s ids, without special tokens."""
    with rust_calls(where):
        ids = tokenizer.encode(text, add_special_tokens=False).ids
    return list(ids)


def decode(tokenizer: Tokenizer, ids: Sequence[int], skip_special_tokens: bool,
           where: Path | str = "the package") -> str:
    with rust_calls(where):
        text = tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
    return str(text)


@contextmanager
def rust_calls(where: Path | str) -> Iterator[None]:
    """fd 2 on /dev/null while the tokenizer's Rust code runs; its panic as one ``PackageError``."""
    sys.stderr.flush()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    except BaseException as exc:
        if type(exc).__name__ != "PanicException":
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise PackageError(f"{where}: its {TOKENIZER} failed on this text ({first})") from None
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)
