"""One-pass int4 export (``export SOURCE OUT --recipe int4``) of the other full-size variants: wall time, peak
RSS and package size per file, each export its own process (``run_measured``).

E4B from a bf16 checkpoint directory written first (``init-checkpoint``; goals ≤ 20 min and ≤ 4 GiB, as E2B's
in ``full_size``); 26B-A4B and 31B from random weights, the variant name as SOURCE (their bf16 checkpoints
would not fit this disk next to the output; goal ≤ 8 GiB). Each package is removed once measured.
``--quick`` runs the same on the tiny variants.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from bench_full_size import CALIBRATION_TOKENS, CLI, package_sizes, run_measured
from measure import Section

GIB = 1 << 30
# variant → (from a bf16 checkpoint, goal seconds or None, goal peak RSS)
VARIANTS = {"e4b": (True, 20 * 60, 4 * GIB), "26b-a4b": (False, None, 8 * GIB), "31b": (False, None, 8 * GIB)}


def section(quick: bool) -> Section:
    root = Path(tempfile.mkdtemp(prefix="gemma4-bench-variants-", dir=os.environ.get("GEMMA4_BENCH_TMP")))
    measured: dict[str, dict[str, float]] = {}
    sizes: dict[str, dict[str, int]] = {}
    try:
        for variant, (from_checkpoint, _, _) in VARIANTS.items():
            name = f"tiny-{variant}" if quick else variant
            source = name
            if from_checkpoint:
                source = str(root / f"{name}-bf16")
                run_measured([*CLI, "init-checkpoint", name, source, "--quiet"])
            package = root / f"{name}-int4"
            measured[variant] = run_measured([*CLI, "export", source, str(package), "--recipe", "int4",
                                              "--calibration-tokens", str(CALIBRATION_TOKENS), "--quiet"])
            sizes[variant] = package_sizes(package)
            shutil.rmtree(package)
            if from_checkpoint:
                shutil.rmtree(source)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    section = Section("export_variants", "One-pass int4 export of E4B, 26B-A4B and 31B (random weights, real geometry)",
                      {"recipe": "int4", "calibration tokens": CALIBRATION_TOKENS, "cpus": len(os.sched_getaffinity(0)),
                       "variants": "tiny" if quick else "full size"})
    section.columns = ["variant", "source", "wall", "peak RSS", "package", "ple.data", "goal"]
    for variant, (from_checkpoint, goal_seconds, goal_rss) in VARIANTS.items():
        figures = measured[variant]
        section.figure(f"{variant} export seconds", "s", [figures["seconds"]])
        section.figure(f"{variant} export peak RSS", "bytes", [figures["peak_rss_bytes"]])
        met = figures["peak_rss_bytes"] <= goal_rss and (goal_seconds is None or figures["seconds"] <= goal_seconds)
        goal = (f"≤ {goal_seconds // 60} min, " if goal_seconds else "") + f"≤ {goal_rss // GIB} GiB"
        total, ple = sum(sizes[variant].values()), sizes[variant].get("ple.data", 0)
        section.rows.append([variant, "bf16 checkpoint" if from_checkpoint else "random (variant name)",
                             f"{figures['seconds'] / 60:.1f} min", f"{figures['peak_rss_bytes'] / GIB:.2f} GiB",
                             f"{total / GIB:.2f} GiB", f"{ple / GIB:.2f} GiB" if ple else "—",
                             f"{goal}: {'met' if met else 'not met'}"])
    section.extra = {"sizes": sizes}
    return section
