"""``make bench``: run the benchmark sections, write bench/results.json and bench/results.md.

Each section is one ``bench_*.py`` module with a ``section(quick: bool) -> measure.Section``
function, listed in ``SECTIONS`` below; every section runs in this one process, one after another,
and reports medians of repeated runs (all samples are kept in the JSON). Adding a section (package
speed, memory, sizes): write ``bench/bench_<name>.py`` with ``section()`` and add it to
``SECTIONS``. Benchmarks are never part of ``make test`` and never pass or fail on a time.

    .venv/bin/python bench/run.py [--only topk_moe,...] [--quick] [--out DIR]

``--quick`` runs every section on small shapes (a check that the harness works, not a measurement).
Each finished section is saved to results.partial.json at once: a run that was interrupted (the full
suite exports 31B, hours on two cores) is resumed by running it again on the same code and kind of
machine, and says which sections it kept and when they were measured; ``--fresh`` measures everything.
``--only`` measures some sections and keeps the others' earlier results: results.json then lists the
sections not measured yet under "missing", and results.partial.json stays until the suite is whole.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import signal
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
from measure import Section, git_state

from gemma4_onnx.cli import interrupt_on_sigterm

HERE = Path(__file__).resolve().parent
SECTIONS: dict[str, Callable[[bool], Section]] = {
    "topk_moe": bench_topk_moe.section,
    "decode": bench_decode.section,
    "builder": bench_builder.section,
    "full_size": bench_full_size.section,
    **bench_export_variants.SECTIONS,
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
        "git": git_state(),
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


def markdown(results: dict[str, Any]) -> str:
    info = results["machine"]
    libraries = ", ".join(f"{k} {v}" for k, v in info["libraries"].items() if v)
    git = info["git"] or {}
    commit = f"{git.get('commit', '?')[:10]}{' (modified)' if git.get('modified') else ''}"
    resumed = results.get("resumed")
    lines = [
        "# gemma4-onnx benchmarks",
        "",
        f"{results['started']} · {results['seconds']:.0f} s · commit {commit}"
        + (" · QUICK (small shapes, not a measurement)" if results["quick"] else ""),
        "",
        *([f"Resumed: {', '.join(f'{name} (measured {_measured(results, name)})' for name in resumed)}, "
           "kept from earlier runs of the same code on this kind of machine.", ""] if resumed else []),
        *([f"Not measured yet: {', '.join(results['missing'])} (`bench/run.py --only` ran a part of the suite, "
           "or they failed); run `make bench` again to measure them.", ""] if results.get("missing") else []),
        f"Machine: {info['cpu']}, {info['usable_cpus']} usable CPUs, {info['memory_gib']} GiB, {info['platform']}, "
        f"Python {info['python']}.",
        "",
        f"Libraries: {libraries}.",
        "",
    ]
    for name, entry in results["sections"].items():
        lines += [entry["markdown"]] if "markdown" in entry else [f"## {name}", "", f"FAILED: {entry['error']}", ""]
    return "\n".join(lines).rstrip() + "\n"


def _measured(results: dict[str, Any], name: str) -> str:
    measured = results["sections"][name].get("measured") or {}
    return f"{measured.get('started', '?')} at {(measured.get('commit') or {}).get('commit', '?')[:10]}"


def resumable(partial: Path, results: dict[str, Any]) -> dict[str, Any]:
    """Sections an interrupted run finished, to keep when it measured the same code (tree unmodified), in the
    same mode, on the same kind of machine: the full suite runs for hours, and like an export it goes on from
    where it stopped, in a later session too (the code hash leaves the results out). Each kept section says
    when it was measured."""
    git = results["machine"]["git"]
    if not partial.exists() or not git or git["modified"]:
        return {}
    try:
        earlier = json.loads(partial.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    if earlier.get("quick") != results["quick"] or (earlier["machine"].get("git") or {}).get("code") != git["code"] \
            or _identity(earlier["machine"]) != _identity(results["machine"]):
        return {}
    return {name: entry for name, entry in earlier["sections"].items() if name in SECTIONS and "markdown" in entry}


def _identity(info: dict[str, Any]) -> tuple[Any, ...]:
    return info["cpu"], info["usable_cpus"], info["memory_gib"], info["libraries"]


def _release_memory() -> None:
    """Hand what a finished section freed back to the system: the next one (full-size E2B's sessions and
    its eager model) needs every GB of the machine, and glibc keeps freed heap otherwise."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--only", help=f"comma-separated sections (of {', '.join(SECTIONS)})")
    parser.add_argument("--quick", action="store_true", help="small shapes: check the harness, measure nothing")
    parser.add_argument("--out", type=Path, default=HERE, help="where results.json and results.md go")
    parser.add_argument("--fresh", action="store_true", help="measure every section, keep nothing of an earlier run")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, interrupt_on_sigterm)  # finished sections stay in results.partial.json
    chosen = args.only.split(",") if args.only else list(SECTIONS)
    unknown = [name for name in chosen if name not in SECTIONS]
    if unknown:
        parser.error(f"unknown sections {unknown}; known: {list(SECTIONS)}")

    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    results: dict[str, Any] = {
        "started": started,
        "quick": args.quick,
        "machine": machine(),
        "sections": {},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    partial = args.out / "results.partial.json"
    kept = {} if args.fresh else resumable(partial, results)
    if kept:
        results["resumed"] = list(kept)
        print(f"resuming: {', '.join(kept)} finished by an earlier run of this code", flush=True)
    failed = False
    for name in SECTIONS:
        if name in kept:
            results["sections"][name] = kept[name]
            continue
        if name not in chosen:
            continue
        print(f"== {name}", flush=True)
        section_start = time.monotonic()
        try:
            section = SECTIONS[name](args.quick)
        except Exception:  # a failing section is reported, the others still run
            failed = True
            results["sections"][name] = {"error": traceback.format_exc(limit=5)}
            print(results["sections"][name]["error"], file=sys.stderr)
            continue
        results["sections"][name] = {**section.to_json(), "markdown": section.to_markdown(),
                                     "seconds": time.monotonic() - section_start,
                                     "measured": {"started": started, "commit": results["machine"]["git"]}}
        partial.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
        _release_memory()
    results["seconds"] = sum(entry.get("seconds", 0.0) for entry in results["sections"].values())
    results["missing"] = [name for name in SECTIONS if "markdown" not in results["sections"].get(name, {})]
    (args.out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    report = markdown(results)
    (args.out / "results.md").write_text(report)
    if not results["missing"]:  # the suite is whole: nothing left to resume
        partial.unlink(missing_ok=True)
    print()
    print(report)
    print(f"wrote {args.out / 'results.json'} and {args.out / 'results.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (``interrupt_on_sigterm``)
        print("bench: interrupted; the finished sections are kept: run it again to resume",
              file=sys.stderr)
        sys.exit(130)
