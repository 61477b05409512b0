"""Outputs appear whole or not at all: every command writes into a temporary directory beside its
target and publishes it with one rename, after every file is written and fsynced."""

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from gemma4_onnx.errors import UsageError


def check_target(target: Path, force: bool) -> None:
    """Refuse, before any work, to replace a non-empty directory without ``force``."""
    if target.exists() and not target.is_dir():
        raise UsageError(f"output {target} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise UsageError(f"output directory {target} is not empty; pass --force to replace it")


def fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def publish_dir(target: Path, force: bool = False) -> Iterator[Path]:
    """Yield a fresh staging directory; on success it replaces ``target`` atomically, on failure it is
    removed and ``target`` is left as it was."""
    target = Path(target).absolute()
    check_target(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
    try:
        yield staging
        fsync_tree(staging)
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.rename(target, retired / target.name)
            os.rename(staging, target)
            shutil.rmtree(retired)
        else:
            os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
