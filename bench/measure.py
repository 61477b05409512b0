"""What every benchmark section produces, and the one way to time a call.

A section (one ``bench_*.py`` module, listed in ``run.py``'s ``SECTIONS``) returns a ``Section``:
figures (every sample kept, the median reported), ratios between figures (computed from the
medians, never measured on their own), one Markdown table that puts figures and ratios side by side,
and findings (sentences computed from the figures). ``run.py`` writes them to bench/results.json
and bench/results.md. Benchmarks are measurements, never pass/fail.
"""

from __future__ import annotations

import hashlib
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

K = TypeVar("K")


@dataclass
class Figure:
    """One measured quantity: all samples, in ``unit``; ``params`` say what was measured."""

    name: str
    unit: str
    samples: list[float]
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def to_json(self) -> dict[str, Any]:
        return {"median": self.median, "unit": self.unit, "samples": self.samples, "params": self.params}


@dataclass
class Ratio:
    """median(numerator) / median(denominator), two figures of the same section."""

    name: str
    numerator: Figure
    denominator: Figure

    @property
    def value(self) -> float:
        return self.numerator.median / self.denominator.median

    def to_json(self) -> dict[str, Any]:
        return {"value": self.value, "numerator": self.numerator.name, "denominator": self.denominator.name}


@dataclass
class Section:
    """A section's results: ``table`` rows are already formatted strings, one per column."""

    name: str
    title: str
    setup: dict[str, Any]
    figures: list[Figure] = field(default_factory=list)
    ratios: list[Ratio] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # section-specific computed values (JSON-ready)

    def figure(self, name: str, unit: str, samples: list[float], **params: Any) -> Figure:
        figure = Figure(name, unit, samples, params)
        self.figures.append(figure)
        return figure

    def ratio(self, name: str, numerator: Figure, denominator: Figure) -> Ratio:
        ratio = Ratio(name, numerator, denominator)
        self.ratios.append(ratio)
        return ratio

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "setup": self.setup,
            "figures": {f.name: f.to_json() for f in self.figures},
            "ratios": {r.name: r.to_json() for r in self.ratios},
            "table": {"columns": self.columns, "rows": self.rows},
            "findings": self.findings,
            **self.extra,
        }

    def to_markdown(self) -> str:
        lines = [f"## {self.title}", ""]
        setup = ", ".join(f"{k} {v}" for k, v in self.setup.items())
        lines += [f"Setup: {setup}.", ""]
        if self.columns:
            lines.append("| " + " | ".join(self.columns) + " |")
            lines.append("|" + "|".join("---:" for _ in self.columns) + "|")
            lines += ["| " + " | ".join(row) + " |" for row in self.rows]
            lines.append("")
        lines += [f"- {finding}" for finding in self.findings]
        return "\n".join(lines).rstrip() + "\n"


def time_ms(call: Callable[[], Any], runs: int, warmup: int = 3) -> list[float]:
    """Wall-clock milliseconds of ``runs`` calls of ``call`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def interleaved_ms(calls: Mapping[K, Callable[[int], Any]], runs: int, warmup: int = 3) -> dict[K, list[float]]:
    """Wall-clock milliseconds per call, measured round-robin: each of ``runs`` rounds (after
    ``warmup`` untimed ones) calls every entry once, with the round number. A change of machine load
    during the run (another process starting) then hits every figure alike instead of the ones that
    happened to be measured last, which is what keeps their ratios meaningful on a shared machine."""
    samples: dict[K, list[float]] = {key: [] for key in calls}
    for round_index in range(warmup + runs):
        for key, call in calls.items():
            start = time.perf_counter()
            call(round_index)
            if round_index >= warmup:
                samples[key].append((time.perf_counter() - start) * 1e3)
    return samples


RESULTS = ("bench/results.json", "bench/results.md", "bench/results.partial.json")  # measured, not measuring


def git_state() -> dict[str, Any] | None:
    """The commit measured, the code it measured (a hash of every tracked file but the bench results and the
    Markdown docs: a commit that only records results or edits prose measures the same code) and whether that
    code had uncommitted changes (read-only git calls)."""
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", "--no-optional-locks", *args], cwd=here, capture_output=True, text=True,
                              check=True).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        files = git("ls-tree", "-r", "--full-tree", "HEAD").splitlines()
        changed = git("status", "--porcelain", "--untracked-files=no").splitlines()
    except (OSError, subprocess.CalledProcessError):
        return None
    code = [line for line in files if _measures(line.split("\t", 1)[1])]
    return {"commit": commit, "code": hashlib.sha256("\n".join(code).encode()).hexdigest()[:16],
            "modified": any(_measures(line[3:]) for line in changed)}


def _measures(path: str) -> bool:
    return path not in RESULTS and not path.endswith(".md")
