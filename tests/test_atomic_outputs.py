"""Outputs whole or not at all: atomic replacement, SIGKILL at random points during export and quantize,
a full disk, stale staging directories, deterministic rewrites.

Commands run in children forked from one server process that imported the toolchain once, so a kill
costs only the work up to the kill. A full disk is simulated with RLIMIT_FSIZE in the child (writes
past the limit fail with EFBIG, as writes to a full filesystem fail with ENOSPC); no tmpfs is mounted.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gemma4_onnx import atomic
from gemma4_onnx.errors import DiskFullError
from gemma4_onnx.graphs.manifest import MANIFEST
from gemma4_onnx.verify import verify_package

RTN = '[default]\nbits = 4\nblock_size = 16\nalgorithm = "rtn"\n'
SEED = int(os.environ.get("GEMMA4_ONNX_KILL_SEED", time.time_ns() % 100_000))

SERVER = """
import json, os, resource, sys
from gemma4_onnx.cli import main
import gemma4_onnx.exporter.package, gemma4_onnx.quantize.job  # imported once, before any fork
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            if job["fsize"]:
                resource.setrlimit(resource.RLIMIT_FSIZE, (job["fsize"], job["fsize"]))
            code = main(job["argv"])
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(pid, flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class Server:
    """One forking command server; ``run`` waits, ``start`` + ``finish`` leave room for a kill."""

    def __init__(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)

    def start(self, argv: list[str], log: Path, fsize: int | None = None) -> int:
        assert self.process.stdin and self.process.stdout
        self.process.stdin.write(json.dumps({"argv": [*argv, "--quiet"], "log": str(log), "fsize": fsize}) + "\n")
        self.process.stdin.flush()
        return int(self.process.stdout.readline())

    def finish(self) -> int:
        assert self.process.stdout
        return int(json.loads(self.process.stdout.readline())["rc"])

    def run(self, argv: list[str], log: Path, fsize: int | None = None) -> int:
        self.start(argv, log, fsize)
        return self.finish()

    def close(self) -> None:
        assert self.process.stdin
        self.process.stdin.close()
        self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.close()


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def staging_files(target: Path, pid: int) -> int:
    return sum(1 for d in target.parent.glob(f".{target.name}.tmp-{pid}-*") for p in d.rglob("*") if p.is_file())


def kill_at(server: Server, argv: list[str], target: Path, log: Path, files: int, rng: random.Random) -> int:
    """Start a command and SIGKILL it once its staging directory holds ``files`` files, plus a random few ms."""
    pid = server.start(argv, log)
    deadline = time.monotonic() + 600
    while running(pid) and staging_files(target, pid) < files and time.monotonic() < deadline:
        time.sleep(0.002)
    time.sleep(rng.uniform(0, 0.03))
    if running(pid):
        os.kill(pid, signal.SIGKILL)
    return server.finish()


def manifest_of(directory: Path) -> dict:
    return json.loads((directory / MANIFEST).read_text())


def assert_whole(target: Path, allowed: list[dict | None], context: str) -> None:
    """``target`` is absent or one of the allowed complete packages, and verify accepts it; leftovers are
    not packages that verify accepts."""
    files = manifest_of(target)["files"] if (target / MANIFEST).exists() else None
    assert files in [a["files"] if a else None for a in allowed], context
    if files is not None:
        assert verify_package(target)["passed"], context
    else:
        assert not target.exists(), context
    for leftover in target.parent.glob(f".{target.name}.*"):
        assert not verify_package(leftover)["passed"] or manifest_of(leftover)["files"] in [
            a["files"] for a in allowed if a], context


def kill_campaign(server: Server, make_argv, work: Path, kills: int, total_files: int, previous: Path,
                  complete: dict) -> None:
    """``kills`` runs, each killed at a random point; every other one starts from ``previous``, the rest
    from nothing."""
    rng = random.Random(SEED)
    target = work / "out"
    for i in range(kills):
        if target.exists():
            shutil.rmtree(target)
        if i % 2 == 0:
            shutil.copytree(previous, target)
        before = manifest_of(target) if i % 2 == 0 else None
        files = rng.randint(0, total_files + 1)
        rc = kill_at(server, make_argv(target), target, work / f"kill-{i}.log", files, rng)
        context = f"seed {SEED}, kill {i} after {files} files, rc {rc}"
        assert_whole(target, [before, complete], context)
        if rc == 0:
            assert manifest_of(target)["files"] == complete["files"], context  # deterministic and not appended
    atomic.remove_stale_staging(target)
    assert not list(work.glob(".out.*")), "staging of killed commands is removed by the next writer"


@pytest.fixture(scope="module")
def fp32(exported) -> Path:
    return exported("tiny-e2b")[1]


def quantize_argv(fp32: Path, recipe: Path):
    return lambda target: ["quantize", str(fp32), str(target), "--recipe", str(recipe), "--force"]


@pytest.mark.long
def test_kill_quantize_at_random_points(server, fp32, tmp_path) -> None:
    recipe = tmp_path / "rtn.toml"
    recipe.write_text(RTN)
    assert server.run(quantize_argv(fp32, recipe)(tmp_path / "complete"), tmp_path / "complete.log") == 0
    complete = manifest_of(tmp_path / "complete")
    kill_campaign(server, quantize_argv(fp32, recipe), tmp_path, kills=2, total_files=len(complete["files"]),
                  previous=tmp_path / "complete", complete=complete)


def test_kill_export_at_a_random_point(server, exported, tmp_path) -> None:
    """One kill early in the export (make test); test_kill_export_torture covers the whole run."""
    checkpoint, fp32 = exported("tiny-e2b")
    complete = manifest_of(fp32)
    rng = random.Random(SEED)
    target = tmp_path / "out"
    shutil.copytree(fp32, target)
    files = rng.randint(0, 4)
    rc = kill_at(server, ["export", str(checkpoint), str(target), "--force"], target, tmp_path / "kill.log", files, rng)
    assert_whole(target, [complete], f"seed {SEED}, kill after {files} files, rc {rc}")


@pytest.mark.long
@pytest.mark.parametrize("resumable", [False, True], ids=["export", "export --recipe"])
def test_sigterm_ends_an_export_through_its_cleanups(resumable, exported, tmp_path) -> None:
    """``kill`` (SIGTERM) mid-export: exit status 143 and the scratch folders gone at once (SIGKILL leaves
    them to the next writer, ``remove_stale_staging``); a resumable export keeps its partial package."""
    checkpoint, _ = exported("tiny-e2b")
    target, recipe = tmp_path / "out", tmp_path / "rtn.toml"
    recipe.write_text(RTN)
    extra = ["--recipe", str(recipe)] if resumable else []
    process = subprocess.Popen([sys.executable, "-m", "gemma4_onnx.cli", "export", str(checkpoint), str(target),
                                *extra, "--quiet"], stderr=subprocess.DEVNULL)
    partial = atomic.partial_dir(target)
    deadline = time.monotonic() + 600
    while process.poll() is None and time.monotonic() < deadline and (
            not partial.is_dir() if resumable else staging_files(target, process.pid) < 2):
        time.sleep(0.002)
    assert process.poll() is None, "the export ended before it could be interrupted"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM
    assert not target.exists() and list(tmp_path.glob(".out.tmp-*")) == []
    assert partial.is_dir() == resumable


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["tiny-e2b", "tiny-26b-a4b"])
def test_kill_export_torture(variant, server, exported, tmp_path) -> None:
    checkpoint, fp32 = exported(variant)
    complete = manifest_of(fp32)
    kill_campaign(server, lambda t: ["export", str(checkpoint), str(t), "--force"], tmp_path, kills=12,
                  total_files=len(complete["files"]), previous=fp32, complete=complete)


@pytest.mark.slow
def test_kill_quantize_torture(server, fp32, tmp_path) -> None:
    recipe = tmp_path / "rtn.toml"
    recipe.write_text(RTN)
    assert server.run(quantize_argv(fp32, recipe)(tmp_path / "complete"), tmp_path / "complete.log") == 0
    complete = manifest_of(tmp_path / "complete")
    kill_campaign(server, quantize_argv(fp32, recipe), tmp_path, kills=24, total_files=len(complete["files"]),
                  previous=tmp_path / "complete", complete=complete)


def assert_disk_full(rc: int, log: Path, target: Path) -> None:
    err = log.read_text()
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "error: out of space writing" in err and "the output needs about" in err and "bytes" in err, err
    assert not target.exists() and not list(target.parent.glob(f".{target.name}.*")), "nothing left behind"


@pytest.mark.parametrize("limit", [16_384])
def test_disk_full_during_quantize_fails_cleanly(limit, server, fp32, tmp_path) -> None:
    recipe = tmp_path / "rtn.toml"
    recipe.write_text(RTN)
    target = tmp_path / "out"
    rc = server.run(quantize_argv(fp32, recipe)(target), tmp_path / "log", fsize=limit)
    assert_disk_full(rc, tmp_path / "log", target)


def test_disk_full_during_export_fails_cleanly(server, exported, tmp_path) -> None:
    checkpoint, _ = exported("tiny-e2b")
    target = tmp_path / "out"
    rc = server.run(["export", str(checkpoint), str(target)], tmp_path / "log", fsize=16_384)
    assert_disk_full(rc, tmp_path / "log", target)


@pytest.mark.slow
@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_disk_full_during_export_at_several_sizes(fraction, server, exported, tmp_path) -> None:
    checkpoint, package = exported("tiny-26b-a4b")
    largest = max(p.stat().st_size for p in package.rglob("*") if p.is_file())  # RLIMIT_FSIZE is per file
    target = tmp_path / "out"
    rc = server.run(["export", str(checkpoint), str(target)], tmp_path / "log", fsize=int(largest * fraction))
    assert_disk_full(rc, tmp_path / "log", target)


def test_not_enough_free_space_is_refused_before_writing(tmp_path) -> None:
    needed = 1 << 62
    with pytest.raises(DiskFullError, match=f"needs about {needed} bytes") as raised, \
            atomic.publish_dir(tmp_path / "out", needed_bytes=needed):
        pass
    assert "free" in str(raised.value)
    assert list(tmp_path.iterdir()) == []


def write_package(directory: Path, tag: str) -> None:
    (directory / "a.data").write_text(tag * 1000)
    (directory / MANIFEST).write_text(tag)


def test_replacing_an_existing_output_swaps_it_in_one_step(tmp_path) -> None:
    target = tmp_path / "out"
    with atomic.publish_dir(target) as staging:
        write_package(staging, "0")
    seen_missing = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            if not (target / MANIFEST).exists():
                seen_missing.append(time.monotonic())

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for i in range(1, 30):
            with atomic.publish_dir(target, force=True) as staging:
                write_package(staging, str(i % 10))
    finally:
        stop.set()
        watcher.join()
    if atomic._renameat2() is not None:
        assert seen_missing == [], "the target vanished during a replace"
    assert (target / MANIFEST).read_text() == "9"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_exchange_swaps_two_directories(tmp_path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x").write_text("a")
    (tmp_path / "b" / "x").write_text("b")
    if not atomic.exchange(tmp_path / "a", tmp_path / "b"):
        pytest.skip("renameat2 RENAME_EXCHANGE is not available here (the two-rename fallback is tested)")
    assert (tmp_path / "a" / "x").read_text() == "b" and (tmp_path / "b" / "x").read_text() == "a"


def test_replace_falls_back_to_two_renames(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)
    target = tmp_path / "out"
    for tag in "12":
        with atomic.publish_dir(target, force=True) as staging:
            write_package(staging, tag)
    assert (target / MANIFEST).read_text() == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_failure_leaves_the_previous_output(tmp_path) -> None:
    target = tmp_path / "out"
    with atomic.publish_dir(target) as staging:
        write_package(staging, "1")
    with pytest.raises(RuntimeError), atomic.publish_dir(target, force=True) as staging:
        write_package(staging, "2")
        raise RuntimeError("stop")
    assert (target / MANIFEST).read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_stale_staging_of_a_dead_writer_is_removed(tmp_path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.tmp-{dead.pid}-abc"
    stale.mkdir()
    (stale / "half.data").write_bytes(b"\0" * 100)
    alive = tmp_path / f".out.tmp-{os.getpid()}-abc"  # a concurrent writer's: kept
    alive.mkdir()
    other = tmp_path / ".unrelated.tmp-1-x"
    other.mkdir()
    with atomic.publish_dir(tmp_path / "out") as staging:
        write_package(staging, "1")
    assert not stale.exists() and alive.is_dir() and other.is_dir()


def test_quantize_twice_gives_byte_identical_files(server, fp32, tmp_path) -> None:
    """The same source and options give the same sha256 for every file, also when rewriting with --force."""
    recipe = tmp_path / "rtn.toml"
    recipe.write_text(RTN)
    argv = quantize_argv(fp32, recipe)
    for name in ("a", "b", "b"):
        assert server.run(argv(tmp_path / name), tmp_path / f"{name}.log") == 0
    assert manifest_of(tmp_path / "a")["files"] == manifest_of(tmp_path / "b")["files"]


def test_export_and_quantize_check_the_space_they_need_first(fp32, tmp_path, monkeypatch) -> None:
    from gemma4_onnx.exporter.package import export_package
    from gemma4_onnx.quantize.job import quantize_package

    free = {}

    def tight(directory: Path) -> int:
        return free["bytes"]

    monkeypatch.setattr(atomic, "free_bytes", tight)
    free["bytes"] = 1000
    with pytest.raises(DiskFullError, match="not enough space"):
        export_package("tiny-e2b", tmp_path / "export")
    with pytest.raises(DiskFullError, match="not enough space"):
        quantize_package(fp32, tmp_path / "deeper" / "int4", "int4")
    assert [p.name for p in tmp_path.iterdir()] == []
    package_bytes = sum(p.stat().st_size for p in fp32.rglob("*") if p.is_file())
    free["bytes"] = package_bytes  # a quantized package is smaller than its float source: it fits
    quantize_package(fp32, tmp_path / "int8", "int8")
    written = sum(p.stat().st_size for p in (tmp_path / "int8").rglob("*") if p.is_file())
    assert written < package_bytes
