"""Output safety (issue 22): an output is published only in place of what was checked at the start (never over
something that appeared meanwhile; of two writers of one target exactly one publishes); every folder and file
output is written atomically, never through a link; an output that is, lies in or contains an input is
refused before any work; a place the filesystem refuses is one line naming it, with nothing left behind."""

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gemma4_onnx import atomic
from gemma4_onnx.cli import main
from gemma4_onnx.errors import UsageError
from gemma4_onnx.parity_run import write_report as write_parity
from gemma4_onnx.verify import verify_package

from hostile import FAST, Sandbox, refused

RTN = '[default]\nbits = 4\nblock_size = 16\nalgorithm = "rtn"\n'
PARITY = {"precision": "float32", "checkpoint": "tiny", "text": None, "size": {}, "checks": [],
          "blocks": [{"name": "decoder_layer.0", "cosine": 0.999999}]}


def tree_digest(root: Path) -> dict[str, str]:
    """Every path under ``root`` (and ``root`` itself): sha256 of a file, target of a link, or "dir"."""
    digest = {}
    for path in [root, *sorted(root.rglob("*"))]:
        key = path.relative_to(root).as_posix()
        if path.is_symlink():
            digest[key] = "-> " + os.readlink(path)
        elif path.is_file():
            digest[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            digest[key] = "dir"
    return digest


def nothing_beside(out: Path) -> bool:
    """No staging, retired or partial folder of ``out`` is left beside it."""
    return not list(out.parent.glob(f".{out.name}.*"))


def parity_dir(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "parity.json").write_text(json.dumps(PARITY))
    return folder


def write_package(directory: Path, tag: str) -> None:
    (directory / "a.data").write_text(tag * 100)
    (directory / "manifest.json").write_text(tag)


@pytest.fixture(scope="module")
def sources(exported, tmp_path_factory) -> dict[str, Path]:
    """Copies of a float package, its checkpoint, a recipe file and a parity folder: the inputs whose bytes
    the tests compare before and after."""
    checkpoint, package = exported("tiny-e2b")
    root = tmp_path_factory.mktemp("inputs")
    shutil.copytree(package, root / "package")
    shutil.copytree(checkpoint, root / "checkpoint")
    (root / "rtn.toml").write_text(RTN)
    parity_dir(root / "parity")
    return {"package": root / "package", "checkpoint": root / "checkpoint", "recipe": root / "rtn.toml",
            "parity": root / "parity"}


@pytest.fixture(params=["renameat2", "fallback"])
def mechanism(request, monkeypatch) -> str:
    """Publishing with renameat2 (RENAME_NOREPLACE / RENAME_EXCHANGE), or with the fallback used where the
    OS or filesystem lacks it (mkdir claims the name; two renames with the identity checked between)."""
    if request.param == "renameat2":
        probe = Path(tempfile.mkdtemp())
        try:
            (probe / "a").mkdir()
            if not atomic._rename2(probe / "a", probe / "b", atomic.RENAME_NOREPLACE):
                pytest.skip("renameat2 RENAME_NOREPLACE is not supported here (the fallback is tested)")
        finally:
            shutil.rmtree(probe)
    else:
        monkeypatch.setattr(atomic, "_renameat2", lambda: None)
    return request.param


# 1. The target is checked again when the output is published.

@pytest.mark.parametrize("appeared", ["a folder with a file", "an empty folder", "a file"])
def test_what_appears_at_out_during_the_run_is_kept(appeared, mechanism, tmp_path) -> None:
    out = tmp_path / "out"
    with pytest.raises(UsageError, match="changed while this command ran"), atomic.publish_dir(out) as staging:
        write_package(staging, "1")
        if appeared == "a file":
            out.write_text("mine")
        else:
            out.mkdir()
            if appeared == "a folder with a file":
                (out / "mine.txt").write_text("mine")
    assert (out.read_text() == "mine" if appeared == "a file" else
            [p.name for p in out.iterdir()] == (["mine.txt"] if "file" in appeared else []))
    assert nothing_beside(out)


def test_an_empty_folder_checked_at_the_start_is_replaced(mechanism, tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with atomic.publish_dir(out) as staging:
        write_package(staging, "1")
    assert (out / "manifest.json").read_text() == "1" and nothing_beside(out)


@pytest.mark.parametrize("now", ["another folder", "a file", "nothing"])
def test_force_replaces_only_the_folder_checked_at_the_start(now, mechanism, tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    write_package(out, "old")
    fails = pytest.raises(UsageError, match="changed while") if now != "nothing" else contextlib.nullcontext()
    with fails, atomic.publish_dir(out, force=True) as staging:
        write_package(staging, "new")
        out.rename(tmp_path / "moved")  # the checked folder goes away; something else may take its place
        if now == "another folder":
            out.mkdir()
            (out / "mine.txt").write_text("mine")
        elif now == "a file":
            out.write_text("mine")
    assert (tmp_path / "moved" / "manifest.json").read_text() == "old"
    if now == "nothing":
        assert (out / "manifest.json").read_text() == "new"
    else:
        assert (out / "mine.txt" if now == "another folder" else out).read_text() == "mine"
    assert nothing_beside(out)


@pytest.mark.parametrize("force", [False, True], ids=["new", "--force"])
def test_of_two_writers_of_one_target_exactly_one_publishes(force, mechanism, tmp_path) -> None:
    out = tmp_path / "out"
    if force:
        out.mkdir()
        write_package(out, "0")
    with pytest.raises(UsageError, match="changed while"), atomic.publish_dir(out, force=force) as first:
        write_package(first, "1")
        with atomic.publish_dir(out, force=force) as second:  # starts after the first, publishes before it
            write_package(second, "2")
    assert (out / "manifest.json").read_text() == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_second_resumable_writer_of_one_target_is_refused(tmp_path) -> None:
    out = tmp_path / "out"
    with atomic.publish_resumable(out, "key") as staging:
        with pytest.raises(UsageError, match=f"being written by another process \\(pid {os.getpid()}\\)"), \
                atomic.publish_resumable(out, "key"):
            pass
        shutil.rmtree(staging / atomic.RESUME_STATE)
        write_package(staging, "1")
    assert (out / "manifest.json").read_text() == "1" and nothing_beside(out)


RACER = """
import os, sys, time
from pathlib import Path
from gemma4_onnx import atomic
from gemma4_onnx.cli import main

barrier, argv = Path(sys.argv[1]), sys.argv[2:]
publish = atomic.publish

def publish_together(staging, checked):
    (barrier / str(os.getpid())).touch()
    deadline = time.monotonic() + 120
    while len(list(barrier.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.002)
    publish(staging, checked)

atomic.publish = publish_together
sys.exit(main(argv))
"""


@pytest.mark.parametrize("force", [False, True], ids=["new", "--force"])
def test_two_concurrent_processes_writing_one_out_one_publishes(force, sources, tmp_path) -> None:
    """Two real ``report`` processes, both past their start checks, publish at the same moment."""
    out, barrier = tmp_path / "out", tmp_path / "barrier"
    barrier.mkdir()
    if force:
        out.mkdir()
        (out / "previous.txt").write_text("previous")
    argv = ["report", str(sources["parity"]), "--out", str(out), "--quiet", *(["--force"] if force else [])]
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(barrier), *argv], stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    results = sorted((r.wait(timeout=300), r.stderr.read() if r.stderr else "") for r in racers)
    assert [code for code, _ in results] == [0, 2], results
    loser = results[1][1]
    assert loser.count("\n") == 1 and "changed while this command ran" in loser and "Traceback" not in loser, loser
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.md"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["barrier", "out"]


@pytest.mark.parametrize("force", [True, False], ids=["--force", "new"])
def test_two_quantize_runs_to_one_out_one_publishes(force, sources, tmp_path, capsys, monkeypatch) -> None:
    """The issue's race, made deterministic: a second quantize run starts and publishes while the first is
    about to publish; the first then exits 2 and the second's package stays."""
    out = tmp_path / "out"
    if force:
        out.mkdir()
        (out / "previous.txt").write_text("previous")
    argv = ["quantize", str(sources["package"]), str(out), "--recipe", str(sources["recipe"]), "--quiet",
            *(["--force"] if force else [])]
    publish, other = atomic.publish, []

    def other_run_publishes_first(staging: Path, checked: atomic.Checked) -> None:
        if not other:
            other.append("started")
            other.append(main(argv))  # its own publish goes straight through
        publish(staging, checked)

    monkeypatch.setattr(atomic, "publish", other_run_publishes_first)
    code = main(argv)
    err = capsys.readouterr().err
    assert other == ["started", 0] and code == 2, err
    assert err.count("\n") == 1 and "changed while this command ran" in err, err
    assert verify_package(out)["passed"] and not (out / "previous.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# 2. report writes atomically and honours --force; file outputs never follow a link.

def test_report_into_a_non_empty_folder_needs_force(sources, tmp_path, capsys) -> None:
    out = tmp_path / "report"
    out.mkdir()
    (out / "mine.txt").write_text("mine")
    err = refused(["report", str(sources["parity"]), "--out", str(out)], capsys)
    assert "not empty; pass --force" in err and str(out) in err
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert main(["report", str(sources["parity"]), "--out", str(out), "--force", "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.md"]
    assert [p.name for p in tmp_path.iterdir()] == ["report"]


def test_parity_json_is_never_written_through_a_link(tmp_path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    out = tmp_path / "parity"
    out.mkdir()
    (out / "parity.json.tmp").symlink_to(victim)  # the temporary name the writer once used
    write_parity(PARITY, out)
    assert json.loads((out / "parity.json").read_text()) == PARITY and victim.read_text() == "mine"
    (out / "parity.json").unlink()
    (out / "parity.json").symlink_to(victim)
    with pytest.raises(UsageError, match="exists and is not a regular file"):
        write_parity(PARITY, out)
    assert victim.read_text() == "mine" and (out / "parity.json").is_symlink()
    assert sorted(p.name for p in out.iterdir()) == ["parity.json", "parity.json.tmp"]


def test_write_file_replaces_the_name_not_the_file_behind_it(tmp_path) -> None:
    path, other_name = tmp_path / "report.json", tmp_path / "hard-link.json"
    path.write_text("old")
    os.link(path, other_name)
    atomic.write_file(path, "new")
    assert path.read_text() == "new" and other_name.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hard-link.json", "report.json"]


@pytest.mark.parametrize("shape", ["a link to a file", "a link to nowhere", "a folder"])
def test_verify_out_refuses_what_is_not_a_regular_file(shape, sources, tmp_path, capsys) -> None:
    victim, out = tmp_path / "victim.txt", tmp_path / "report.json"
    victim.write_text("mine")
    if shape == "a folder":
        out.mkdir()
    else:
        out.symlink_to(victim if shape == "a link to a file" else tmp_path / "nowhere")
    before = tree_digest(tmp_path)
    err = refused(["verify", str(sources["package"]), "--out", str(out)], capsys)
    assert "is not a regular file" in err
    assert tree_digest(tmp_path) == before


# 3. An output that is, lies in or contains an input: refused before any work.

def mark_unread(root: Path) -> None:
    """Access times before modification times, so that the filesystem's relatime rule moves them on a read."""
    for path in (root.rglob("*") if root.is_dir() else [root]):
        if path.is_file() and not path.is_symlink():
            info = path.stat()
            os.utime(path, ns=(info.st_mtime_ns - 10**10, info.st_mtime_ns))


def files_read(root: Path) -> list[str]:
    return [str(p) for p in (root.rglob("*") if root.is_dir() else [root])
            if p.is_file() and not p.is_symlink() and p.stat().st_atime_ns >= p.stat().st_mtime_ns]


DISJOINT = {
    "quantize OUT=MODEL_DIR": (["quantize", "{package}", "{package}", "--recipe", "{recipe}", "--force"],
                               "is the input"),
    "quantize OUT in MODEL_DIR": (["quantize", "{package}", "{package}/int4", "--recipe", "{recipe}"],
                                  "lies inside the input"),
    "quantize --force OUT holds MODEL_DIR": (["quantize", "{package}", "{inputs}", "--recipe", "{recipe}",
                                              "--force"], "lies inside the output"),
    "quantize --force OUT holds the recipe": (["quantize", "{package}", "{own}", "--recipe", "{own}/r.toml",
                                               "--force"], "lies inside the output"),
    "mobile OUT in MODEL_DIR": (["mobile", "{package}", "{package}/mobile"], "lies inside the input"),
    "mobile --genai --force OUT holds MODEL_DIR": (["mobile", "{package}", "{inputs}", "--genai", "--force"],
                                                   "lies inside the output"),
    "export OUT=SOURCE": (["export", "{checkpoint}", "{checkpoint}", "--force"], "is the input"),
    "export --recipe OUT in SOURCE": (["export", "{checkpoint}", "{checkpoint}/onnx", "--recipe", "{recipe}"],
                                      "lies inside the input"),
    "export --force OUT holds the recipe": (["export", "tiny-e2b", "{inputs}", "--recipe", "{recipe}", "--force"],
                                            "lies inside the output"),
    "report OUT=REPORT_DIR": (["report", "{parity}", "--out", "{parity}"], "is the input"),
    "report OUT in REPORT_DIR": (["report", "{parity}", "--out", "{parity}/report"], "lies inside the input"),
    "report --force OUT holds REPORT_DIR": (["report", "{parity}", "--out", "{inputs}", "--force"],
                                            "lies inside the output"),
    "parity --out in MODEL_DIR": (["parity", "{package}", "--checkpoint", "{checkpoint}", "--out",
                                   "{package}/parity"], "lies inside the input"),
    "parity --out=CHECKPOINT": (["parity", "{package}", "--checkpoint", "{checkpoint}", "--out", "{checkpoint}"],
                                "is the input"),
    "verify --out a package file": (["verify", "{package}", "--out", "{package}/manifest.json"],
                                    "lies inside the input"),
    "verify --out in MODEL_DIR": (["verify", "{package}", "--out", "{package}/verify.json"],
                                  "lies inside the input"),
}


@pytest.mark.parametrize("case", DISJOINT)
def test_an_output_touching_an_input_is_refused_before_any_work(case, sources, tmp_path, capsys) -> None:
    (tmp_path / "r.toml").write_text(RTN)
    template, message = DISJOINT[case]
    names = {**{k: str(v) for k, v in sources.items()}, "inputs": str(sources["package"].parent),
             "own": str(tmp_path)}
    argv = [a.format(**names) for a in template]
    roots = [sources["package"].parent, tmp_path]
    before = {p: tree_digest(p) for p in roots}
    for root in roots:
        mark_unread(root)
    err = refused(argv, capsys)
    assert message in err, err
    assert [f for root in roots for f in files_read(root)] == [], "an input was read before the refusal"
    assert {p: tree_digest(p) for p in roots} == before


def test_an_input_behind_a_link_is_recognised(sources, tmp_path, capsys) -> None:
    link = tmp_path / "link"
    link.symlink_to(sources["package"])
    before = tree_digest(sources["package"])
    err = refused(["quantize", str(link), str(sources["package"] / "q"), "--recipe", str(sources["recipe"])], capsys)
    assert "lies inside the input" in err
    assert tree_digest(sources["package"]) == before


# 4. A place the filesystem refuses: one line naming it, nothing left behind.

@pytest.fixture
def read_only(tmp_path) -> Path:
    """A read-only tmpfs mounted in ``tmp_path`` (skipped where mounting is not permitted)."""
    mount = tmp_path / "read-only"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a read-only tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.fixture
def not_permitted(tmp_path) -> Path:
    """A folder this process may not write into: immutable (chattr +i) as root, where permissions do not
    apply, else without write permission."""
    folder = tmp_path / "not-permitted"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    chattr = shutil.which("chattr")
    done = subprocess.run([chattr, "+i", str(folder)], capture_output=True, text=True) if chattr else None
    if done is None or done.returncode:
        pytest.skip(f"root ignores permissions and chattr +i is not available: {done.stderr.strip() if done else ''}")
    yield folder
    subprocess.run([chattr, "-i", str(folder)], check=True)


def place(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> tuple[Path, str]:
    """An output path the filesystem refuses, and the words the error names it with."""
    if kind == "under a file":
        (tmp_path / "a-file").write_text("x")
        return tmp_path / "a-file" / "sub" / "out", "is not a directory"
    if kind == "read-only":
        return request.getfixturevalue("read_only") / "out", "read-only"
    if kind == "not permitted":
        return request.getfixturevalue("not_permitted") / "out", "not writable|not permitted|Permission denied"
    params = request.node.callspec.params
    parity_folder = params.get("verb") == "parity --out" or params.get("writer") == "parity.json"
    # 250 bytes fit a folder, not the staging names beside it; parity's output is a folder holding parity.json
    return tmp_path / ("o" * (256 if parity_folder else 250)), "too long"


PLACES = ["under a file", "read-only", "not permitted", "name too long"]


def verb_argv(verb: str, s: dict[str, Path], out: Path) -> list[str]:
    return {
        "quantize": ["quantize", str(s["package"]), str(out), "--recipe", str(s["recipe"])],
        "mobile": ["mobile", str(s["package"]), str(out)],
        "export": ["export", str(s["checkpoint"]), str(out)],
        "report": ["report", str(s["parity"]), "--out", str(out)],
        "verify --out": ["verify", str(s["package"]), "--out", str(out)],
        "parity --out": ["parity", str(s["package"]), "--checkpoint", str(s["checkpoint"]), "--out", str(out)],
    }[verb]


@pytest.mark.parametrize("kind", PLACES)
@pytest.mark.parametrize("verb", ["quantize", "report", "verify --out", "parity --out"])
def test_a_place_the_filesystem_refuses_is_one_line(verb, kind, sources, tmp_path, capsys, request) -> None:
    out, words = place(kind, tmp_path, request)
    listing = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    err = refused(verb_argv(verb, sources, out), capsys, out=out if len(out.name) < 256 else None)
    assert str(out) in err
    assert any(w in err for w in words.split("|")), err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == listing


@pytest.mark.parametrize("kind", PLACES)
@pytest.mark.parametrize("writer", ["report", "parity.json"])
def test_the_filesystems_own_refusal_is_one_line_too(writer, kind, sources, tmp_path, capsys, request,
                                                     monkeypatch) -> None:
    """Without the check before work (as when the place changes during the run), the errors of the writes
    themselves are mapped the same way: a folder output (``publish_dir``) and a file output (``write_file``,
    which ``parity`` and ``verify --out`` use)."""
    monkeypatch.setattr(atomic, "check_place", lambda target: None)
    out, _ = place(kind, tmp_path, request)
    listing = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    if writer == "report":
        err = refused(verb_argv("report", sources, out), capsys, out=out)
    else:
        with pytest.raises(UsageError) as raised:
            write_parity(PARITY, out)
        err = str(raised.value)
    assert f"cannot write {out}" in err and "\n" not in err.strip()
    assert any(w in err for w in ("Not a directory", "Read-only", "not permitted", "too long")), err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == listing


# 5. Property: output path shapes, each refused with the promise, the input's bytes unchanged.

SHAPES = ["the source", "inside the source", "the source's parent", "a file", "a link to a folder",
          "a link to the source", "under a file", "a non-empty folder"]


def shaped_out(shape: str, source: Path, root: Path) -> Path:
    return {
        "the source": source,
        "inside the source": source / "out",
        "the source's parent": source.parent,
        "a file": root / "a-file",
        "a link to a folder": root / "link",
        "a link to the source": root / "link-to-source",
        "under a file": root / "a-file" / "out",
        "a non-empty folder": root / "full",
    }[shape]


def example_root(tmp_path: Path, source: Path) -> Path:
    root = Path(tempfile.mkdtemp(dir=tmp_path))
    (root / "a-file").write_text("mine")
    (root / "full").mkdir()
    (root / "full" / "mine.txt").write_text("mine")
    (root / "folder").mkdir()
    (root / "folder" / "mine.txt").write_text("mine")
    (root / "link").symlink_to(root / "folder")
    (root / "link-to-source").symlink_to(source)
    return root


@FAST
@given(verb=st.sampled_from(["quantize", "mobile", "export", "report"]), shape=st.sampled_from(SHAPES),
       force=st.booleans(), relative=st.booleans())
def test_output_path_shapes_are_refused_with_the_promise(verb, shape, force, relative, sources, tmp_path, capsys,
                                                         monkeypatch) -> None:
    source = sources[{"quantize": "package", "mobile": "package", "export": "checkpoint", "report": "parity"}[verb]]
    root = example_root(tmp_path, source)
    force = force and shape != "a non-empty folder"
    out = shaped_out(shape, source, root)
    before = {p: tree_digest(p) for p in (source, root)}
    sandbox = Sandbox(root)
    sandbox.add("sentinel.txt")
    with monkeypatch.context() as patch:
        if relative:
            patch.chdir(root)
            out = Path(os.path.relpath(out, root))
        argv = [*verb_argv(verb, sources, out), *(["--force"] if force else [])]
        refused(argv, capsys, sandbox=sandbox)
        assert nothing_beside(out.absolute())
    (root / "sentinel.txt").unlink()
    assert {p: tree_digest(p) for p in (source, root)} == before
