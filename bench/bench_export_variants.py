"""One-pass int4 export (``export SOURCE OUT --recipe int4``) of the other full-size variants: wall time, peak
RSS and package size per file, each export its own process (``run_measured``).

E4B from a bf16 checkpoint directory written first (``init-checkpoint``; goals ≤ 20 min and ≤ 4 GiB, as E2B's
in ``full_size``); 26B-A4B and 31B from random weights, the variant name as SOURCE (their bf16 checkpoints
would not fit this disk next to the output; goal ≤ 8 GiB). Each package is removed once measured.
``--quick`` runs the same on the tiny variants.

Each variant is its own section (``export_e4b``, ``export_26b_a4b``, ``export_31b``): together they take
hours on two cores (31B alone over two), so ``run.py`` keeps each finished one, and an interrupted one
resumes: its work folder (under ``GEMMA4_BENCH_TMP`` or the system's temporary folder) keeps the export in
progress, which the next run continues (``export`` resumes from its last completed block). A resumed
variant's wall time is the sum of its runs and its peak RSS the highest of them; the table says how many
runs it took. A work folder of other code, or of a modified tree, is started over.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_full_size import CALIBRATION_TOKENS, CLI, Interrupted, package_sizes, run_measured
from measure import Section, git_state

GIB = 1 << 30
STATE = "state.json"  # in the work folder: the code, the mode and the runs
# variant → (from a bf16 checkpoint, goal seconds or None, goal peak RSS)
VARIANTS = {"e4b": (True, 20 * 60, 4 * GIB), "26b-a4b": (False, None, 8 * GIB), "31b": (False, None, 8 * GIB)}


def section(variant: str) -> Callable[[bool], Section]:
    def measure(quick: bool) -> Section:
        root = Path(os.environ.get("GEMMA4_BENCH_TMP") or tempfile.gettempdir()) / f"gemma4-bench-export-{variant}"
        state = _state(root, quick)
        if state["sizes"] is None:
            _measure(root, f"tiny-{variant}" if quick else variant, VARIANTS[variant][0], state)
        shutil.rmtree(root)
        return _section(variant, state, quick)
    return measure


def section_name(variant: str) -> str:
    return f"export_{variant.replace('-', '_')}"


SECTIONS = {section_name(variant): section(variant) for variant in VARIANTS}


def _state(root: Path, quick: bool) -> dict[str, Any]:
    """The work folder's record, or a new one (and an empty folder) when it is of other code or mode."""
    git = git_state()
    key = {"code": git["code"] if git and not git["modified"] else None, "quick": quick}
    record = root / STATE
    if key["code"] and record.exists():
        state: dict[str, Any] = json.loads(record.read_text())
        if {k: state.get(k) for k in key} == key:
            return state
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    return {**key, "runs": [], "sizes": None}


def _measure(root: Path, name: str, from_checkpoint: bool, state: dict[str, Any]) -> None:
    source, package = name, root / f"{name}-int4"
    if from_checkpoint:
        source = str(root / f"{name}-bf16")
        if not Path(source).is_dir():
            run_measured([*CLI, "init-checkpoint", name, source, "--quiet"])
    try:
        state["runs"].append(run_measured([*CLI, "export", source, str(package), "--recipe", "int4",
                                          "--calibration-tokens", str(CALIBRATION_TOKENS), "--quiet"]))
    except Interrupted as stopped:
        state["runs"].append(stopped.spent)
        raise
    finally:
        _save(root, state)
    state["sizes"] = package_sizes(package)
    _save(root, state)
    shutil.rmtree(package)
    if from_checkpoint:
        shutil.rmtree(source)


def _save(root: Path, state: dict[str, Any]) -> None:
    (root / STATE).write_text(json.dumps(state, indent=1))


def _section(variant: str, state: dict[str, Any], quick: bool) -> Section:
    from_checkpoint, goal_seconds, goal_rss = VARIANTS[variant]
    source = "bf16 checkpoint" if from_checkpoint else "random weights"
    section = Section(section_name(variant),
                      f"One-pass int4 export of {variant.upper()} ({source}, real geometry)",
                      {"recipe": "int4", "calibration tokens": CALIBRATION_TOKENS, "cpus": len(os.sched_getaffinity(0)),
                       "variant": f"tiny-{variant}" if quick else f"{variant} (full size)"})
    section.columns = ["variant", "source", "runs", "wall", "peak RSS", "package", "ple.data", "goal"]
    runs, sizes = state["runs"], state["sizes"]
    seconds = sum(r["seconds"] for r in runs)
    peak = max(r["peak_rss_bytes"] for r in runs)
    section.figure(f"{variant} export seconds", "s", [seconds], runs=len(runs))
    section.figure(f"{variant} export peak RSS", "bytes", [peak], runs=len(runs))
    met = peak <= goal_rss and (goal_seconds is None or seconds <= goal_seconds)
    goal = (f"≤ {goal_seconds // 60} min, " if goal_seconds else "") + f"≤ {goal_rss // GIB} GiB"
    total, ple = sum(sizes.values()), sizes.get("ple.data", 0)
    section.rows.append([variant, source,
                         str(len(runs)) + (" (resumed)" if len(runs) > 1 else ""),
                         f"{seconds / 60:.1f} min", f"{peak / GIB:.2f} GiB", f"{total / GIB:.2f} GiB",
                         f"{ple / GIB:.2f} GiB" if ple else "—", f"{goal}: {'met' if met else 'not met'}"])
    section.extra = {"sizes": sizes, "runs": runs}
    return section
