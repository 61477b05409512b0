"""The promise every verb keeps on input it did not write, as one checker the hostile-input tests share:
exit 2, one line on stderr naming the problem, no traceback, nothing left at OUT (nor a staging folder
beside it), and nothing outside the input read or written.

"Nothing read" is checked without strace: a ``Sandbox`` lays sentinel files outside the input whose access
time is set before their modification time, so the filesystem's relatime rule updates the access time on the
first read; their contents and the folder's listing are compared too. Fuzz settings live here: a bounded,
derandomized number of examples in ``make test``, many random ones under ``@pytest.mark.slow``.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from gemma4_onnx.cli import main

FAST = settings(max_examples=20, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SLOW = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def no_output(path: Path) -> bool:
    """Neither the output nor a staging directory for it exists."""
    return not path.exists() and not list(path.parent.glob(f".{path.name}.*"))


@dataclass
class Sandbox:
    """Sentinel files in ``root`` (outside the input under test) that must stay unread and unchanged."""

    root: Path
    sentinels: dict[Path, bytes] = field(default_factory=dict)

    def add(self, name: str, content: bytes = b"SECRET-SENTINEL-do-not-read\n") -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        info = path.stat()
        os.utime(path, ns=(info.st_mtime_ns - 10**10, info.st_mtime_ns))  # atime < mtime: a read moves atime
        self.sentinels[path] = content
        return path

    def listing(self) -> set[str]:
        return {p.relative_to(self.root).as_posix() for p in self.root.rglob("*")}

    def untouched(self) -> list[str]:
        """What went wrong with the sentinels: read, changed or removed (empty when all is well)."""
        problems = []
        for path, content in self.sentinels.items():
            if not path.is_file():
                problems.append(f"{path} was removed")
                continue
            info = path.stat()
            if info.st_atime_ns >= info.st_mtime_ns:
                problems.append(f"{path} was read")
            if path.read_bytes() != content:
                problems.append(f"{path} was changed")
            os.utime(path, ns=(info.st_mtime_ns - 10**10, info.st_mtime_ns))
        return problems


def refused(argv: list[str], capsys: pytest.CaptureFixture[str], out: Path | None = None,
            sandbox: Sandbox | None = None) -> str:
    """Run the CLI; assert the promise; return the one-line error."""
    before = sandbox.listing() if sandbox else set()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, f"exit {code}, expected 2: {err}"
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"gemma4-onnx {argv[0]}: error: "), err
    assert "internal error" not in err, err
    if out is not None:
        assert no_output(out), f"{out} or its staging folder was left behind"
    if sandbox is not None:
        assert not sandbox.untouched(), sandbox.untouched()
        assert sandbox.listing() <= before, sorted(sandbox.listing() - before)
        assert "SECRET-SENTINEL" not in err, err
    return err
