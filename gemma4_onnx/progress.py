"""One progress bar for every long job; ``--quiet`` silences all of them."""

from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")

_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """Iterate ``items`` with a bar on stderr, unless quiet."""
    yield from tqdm(items, desc=desc, total=total, unit=unit, disable=_quiet, leave=False, dynamic_ncols=True)


def say(message: str) -> None:
    """A line for the user (where an artifact went, what was skipped), silenced by ``--quiet``."""
    if not _quiet:
        print(message, flush=True)
