"""Resident memory of a mobile package while generating, PLE rows memory-mapped vs the table in RAM.

Each mode runs in a fresh process (RSS of this one would include torch and earlier sections):
``mapped`` gathers PLE rows from ``ple.data`` through a read-only memory map, as a device app does;
``in_ram`` reads the whole table first, as a runtime that kept it as an initializer would. RSS comes from
/proc/self/status (file-backed pages of the map count once touched, so only the rows used show up).

    .venv/bin/python bench/mobile_rss.py MOBILE_DIR [--steps 128]

The lead calls ``measure(mobile_dir, steps)`` from bench/run.py; it returns the figures as a dict.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

CHILD = r"""
import json, sys
import numpy as np
from gemma4_onnx.mobile.example import MobilePackage

def rss():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(fields["VmRSS"].split()[0]) * 1024

directory, mode, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
before = rss()
package = MobilePackage(directory, threads=1)
if mode == "in_ram":
    package.tables = {name: np.array(table) for name, table in package.tables.items()}
after_load = rss()
cache = package.empty_cache()
prompt = list(range(3, 35))
peak = 0
logits = package.step(np.array([prompt], dtype=np.int64), cache, 0)
position = len(prompt)
for _ in range(steps):
    token = int(np.argmax(logits[0, -1]))
    logits = package.step(np.array([[token]], dtype=np.int64), cache, position)
    position += 1
    peak = max(peak, rss())
cache_bytes = sum(t.nbytes for t in cache.values())
print(json.dumps({"rss_before_load": before, "rss_after_load": after_load, "rss_peak_generating": peak,
                  "cache_bytes": cache_bytes}))
"""


def _run(directory: Path, mode: str, steps: int) -> dict[str, Any]:
    result = subprocess.run([sys.executable, "-c", CHILD, str(directory), mode, str(steps)], capture_output=True,
                            text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure(mobile_dir: Path, steps: int = 128) -> dict[str, Any]:
    mobile_dir = Path(mobile_dir)
    manifest = json.loads((mobile_dir / "manifest.json").read_text())
    ple = manifest.get("ple") or {}
    graphs = {g["file"]: (mobile_dir / g["file"]).stat().st_size for g in manifest["graphs"].values()}
    return {
        "package": str(mobile_dir),
        "steps": steps,
        "ple_file_bytes": (mobile_dir / ple["file"]).stat().st_size if ple else 0,
        "graph_file_bytes": graphs,
        "mapped": _run(mobile_dir, "mapped", steps),
        "in_ram": _run(mobile_dir, "in_ram", steps),
    }


def render(figures: dict[str, Any]) -> str:
    mib = 1 << 20
    rows = ["| PLE rows | RSS before load | after load | peak generating | caches | PLE file | graphs |",
            "|---|---|---|---|---|---|---|"]
    graphs = sum(figures["graph_file_bytes"].values())
    for mode in ("mapped", "in_ram"):
        f = figures[mode]
        rows.append(f"| {mode} | {f['rss_before_load'] / mib:.1f} MiB | {f['rss_after_load'] / mib:.1f} MiB | "
                    f"{f['rss_peak_generating'] / mib:.1f} MiB | {f['cache_bytes'] / mib:.2f} MiB | "
                    f"{figures['ple_file_bytes'] / mib:.2f} MiB | {graphs / mib:.1f} MiB |")
    return "\n".join(rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mobile_dir")
    parser.add_argument("--steps", type=int, default=128)
    args = parser.parse_args()
    figures = measure(Path(args.mobile_dir), args.steps)
    print(json.dumps(figures, indent=1))
    print(render(figures))
