"""``make bench``: run the benchmark sections, write bench/results.json and bench/results.md.

Each section is one ``bench_*.py`` module with a ``section(quick: bool) -> measure.Section``
function, listed in ``SECTIONS`` below; every section runs in this one process, one after another,
and reports medians of repeated runs (all samples are kept in the JSON). Adding a section (package
speed, memory, sizes): write ``bench/bench_<name>.py`` with ``section()`` and add it to
``SECTIONS``. Benchmarks are never part of ``make test`` and never pass or fail on a time.

    .venv/bin/python bench/run.py [--only topk_moe,...] [--quick] [--out DIR]

``--quick`` runs every section on small shapes (a check that the harness works, not a measurement).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bench_builder
import bench_decode
import bench_export_variants
import bench_full_size
import bench_topk_moe
from measure import Section

HERE = Path(__file__).resolve().parent
SECTIONS: dict[str, Callable[[bool], Section]] = {
    "topk_moe": bench_topk_moe.section,
    "decode": bench_decode.section,
    "builder": bench_builder.section,
    "full_size": bench_full_size.section,
    "export_variants": bench_export_variants.section,
}
LIBRARIES = ("gemma4-onnx", "onnxruntime", "onnx", "onnxscript", "onnx-ir", "numpy", "torch", "transformers")


def machine() -> dict[str, Any]:
    """Where the figures were measured."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": _memory_gib(),
        "libraries": {},
        "git": _git(),
    }
    for name in LIBRARIES:
        try:
            info["libraries"][name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info["libraries"][name] = None
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _git() -> dict[str, Any] | None:
    """The commit measured, and whether the tree had changes (read-only git calls)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True, check=True)
        status = subprocess.run(
            ["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"],
            cwd=HERE, capture_output=True, text=True, check=True,
        )  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"commit": commit.stdout.strip(), "modified": bool(status.stdout.strip())}


def markdown(results: dict[str, Any], sections: dict[str, Section]) -> str:
    info = results["machine"]
    libraries = ", ".join(f"{k} {v}" for k, v in info["libraries"].items() if v)
    git = info["git"] or {}
    commit = f"{git.get('commit', '?')[:10]}{' (modified)' if git.get('modified') else ''}"
    lines = [
        "# gemma4-onnx benchmarks",
        "",
        f"{results['started']} · {results['seconds']:.0f} s · commit {commit}"
        + (" · QUICK (small shapes, not a measurement)" if results["quick"] else ""),
        "",
        f"Machine: {info['cpu']}, {info['usable_cpus']} usable CPUs, {info['memory_gib']} GiB, {info['platform']}, "
        f"Python {info['python']}.",
        "",
        f"Libraries: {libraries}.",
        "",
    ]
    for name, entry in results["sections"].items():
        if name in sections:
            lines.append(sections[name].to_markdown())
        else:
            lines += [f"## {name}", "", f"FAILED: {entry['error']}", ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--only", help=f"comma-separated sections (of {', '.join(SECTIONS)})")
    parser.add_argument("--quick", action="store_true", help="small shapes: check the harness, measure nothing")
    parser.add_argument("--out", type=Path, default=HERE, help="where results.json and results.md go")
    args = parser.parse_args(argv)
    chosen = args.only.split(",") if args.only else list(SECTIONS)
    unknown = [name for name in chosen if name not in SECTIONS]
    if unknown:
        parser.error(f"unknown sections {unknown}; known: {list(SECTIONS)}")

    started = time.monotonic()
    results: dict[str, Any] = {
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "machine": machine(),
        "sections": {},
    }
    done: dict[str, Section] = {}
    failed = False
    for name in chosen:
        print(f"== {name}", flush=True)
        section_start = time.monotonic()
        try:
            done[name] = SECTIONS[name](args.quick)
        except Exception:  # a failing section is reported, the others still run
            failed = True
            results["sections"][name] = {"error": traceback.format_exc(limit=5)}
            print(results["sections"][name]["error"], file=sys.stderr)
            continue
        results["sections"][name] = {**done[name].to_json(), "seconds": time.monotonic() - section_start}
    results["seconds"] = time.monotonic() - started

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    report = markdown(results, done)
    (args.out / "results.md").write_text(report)
    print()
    print(report)
    print(f"wrote {args.out / 'results.json'} and {args.out / 'results.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
