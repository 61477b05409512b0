"""Full-size E2B on this machine: export, quantize and mobile packaging (wall time, peak RSS, sizes per
file), then resident memory while generating 128 tokens from the mobile package with the PLE rows
memory-mapped vs the table read into RAM (``mobile_rss``).

Random weights of the real E2B geometry (``export e2b``: 2.35 B-value PLE table, 9.4 GB in fp32).
Each step runs as its own process, measured by ``measured_run.py`` (peak RSS of that process alone). First
the built-in int4 recipe (GPTQ) in one streaming pass from a bf16 checkpoint directory
(``export --recipe``, goals ≤ 20 min and ≤ 4 GiB); then the float export, an int4 round-to-nearest
recipe written here on it, and the mobile package from that; decode ms/token and prefill tokens/s at 128
and 1024 tokens of the fp32 (alone), int8 and int4 (round-robin) packages against the bandwidth roofline, then
transformers eager on the same prompts (the text model in bf16, loaded lean). Everything is written under
a temporary directory that is removed at the end. ``--quick`` runs the same steps on tiny-e2b.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mobile_rss
import numpy as np
from bench_decode import (
    CONTEXTS,
    EagerRunner,
    OnnxRunner,
    Speeds,
    measure_runners,
    read_bandwidth_gbs,
    weight_bytes_per_token,
)
from measure import Section
from op_profile import decode_op_profile, matmul_nbits_finding, matmul_weight_bytes
from variant_cli import shallow as shallow_text
from variant_cli import variant_cli

RTN_RECIPE = """description = "int4 RTN (block 32, asym., int8 activations); int8 embeddings, PLE, towers; router float"
[default]
bits = 4
block_size = 32
symmetric = false
algorithm = "rtn"
activations = "int8"
[[rules]]
name = "router float"
match = 'router\\.proj\\.weight$'
optional = true
bits = "float"
[[rules]]
name = "embedding, PLE table, towers at int8"
match = 'embed_tokens|embed_tokens_per_layer|vision_tower|audio_tower|embed_vision|embed_audio'
bits = 8
"""
INT8_RTN_RECIPE = """description = "int8 RTN (block 16, asym.): the built-in int8 grid, no GPTQ pass; router float"
[default]
bits = 8
block_size = 16
symmetric = false
algorithm = "rtn"
[[rules]]
name = "router float"
match = 'router\\.proj\\.weight$'
optional = true
bits = "float"
"""
CLI = [sys.executable, "-m", "gemma4_onnx.cli"]
MEASURED_RUN = Path(__file__).resolve().parent / "measured_run.py"
SHALLOW_LAYERS = 8
CALIBRATION_TOKENS = 4096  # the default (16384) spends 4× the calibration time; this is what the goals are held to
STREAMED = f"export --recipe int4 --calibration-tokens {CALIBRATION_TOKENS} (one pass)"
STREAMED_GOAL_SECONDS = 20 * 60
STREAMED_GOAL_RSS = 4 << 30
EAGER = "transformers eager (bf16)"
RUNNER_GROUPS = (("fp32",), ("int8-rtn", "int4-rtn"))  # each measured round-robin within its group
EAGER_GOAL = 5.0  # int4 decode ≥ 5× transformers eager
PROFILED = ("int4-rtn", "int8-rtn")  # decode profiled per op type at the shorter context, after the timings
PROFILE_STEPS = 4


class Interrupted(KeyboardInterrupt):
    """A measured command stopped by an interruption: what it had spent by then (``run_measured``'s figures)."""

    def __init__(self, spent: dict[str, float]) -> None:
        super().__init__()
        self.spent = spent


def run_measured(arguments: list[str]) -> dict[str, float]:
    """Wall seconds and peak RSS (bytes) of one command, as its own process (``measured_run.py``: forked from
    a small process, so the figure is the command's, not this one's). Interrupted, the command is stopped
    too (an export keeps what it can resume from) and ``Interrupted`` carries its figures so far."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gemma4-bench-measured-") as folder:
        report = Path(folder) / "figures.json"
        process = subprocess.Popen([sys.executable, str(MEASURED_RUN), str(report), *arguments],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _, error = process.communicate()
        except KeyboardInterrupt:
            process.terminate()
            process.wait()
            spent = json.loads(report.read_text()) if report.exists() else {  # stopped before it could report
                "seconds": time.monotonic() - start, "peak_rss_bytes": 0}
            raise Interrupted(spent) from None
        if process.returncode != 0 or not report.exists():
            raise RuntimeError(f"{' '.join(arguments)} failed: {error.decode()[-2000:]}")
        figures: dict[str, float] = json.loads(report.read_text())
    return figures


def package_sizes(package: Path) -> dict[str, int]:
    return {p.relative_to(package).as_posix(): p.stat().st_size for p in sorted(package.rglob("*")) if p.is_file()}


def section(quick: bool) -> Section:
    variant = "tiny-e2b" if quick else "e2b"
    root = Path(os.environ.get("GEMMA4_BENCH_TMP") or tempfile.gettempdir()) / "gemma4-bench-full-size"
    shutil.rmtree(root, ignore_errors=True)  # left by a run that was killed (40 GB at full size)
    root.mkdir(parents=True)
    try:
        fp32, int8, int4, mobile = root / "fp32", root / "int8-rtn", root / "int4-rtn", root / "mobile"
        checkpoint, streamed = root / "checkpoint-bf16", root / "int4-streamed"
        recipe, recipe8 = root / "int4-rtn.toml", root / "int8-rtn.toml"
        recipe.write_text(RTN_RECIPE)
        recipe8.write_text(INT8_RTN_RECIPE)
        steps = {
            "init-checkpoint (bf16)": run_measured([*CLI, "init-checkpoint", variant, str(checkpoint), "--quiet"]),
            STREAMED: run_measured([*CLI, "export", str(checkpoint), str(streamed), "--recipe", "int4",
                                    "--calibration-tokens", str(CALIBRATION_TOKENS), "--quiet"]),
        }
        streamed_sizes = package_sizes(streamed)
        shutil.rmtree(streamed)
        shallow = root / "fp32-shallow"
        steps[f"export fp32, first {SHALLOW_LAYERS} layers"] = run_measured(
            [*variant_cli(variant, "shallow", shallow_text(variant, SHALLOW_LAYERS)), "export", "shallow", str(shallow),
             "--quiet"])
        shutil.rmtree(shallow)
        steps |= {
            "export fp32": run_measured([*CLI, "export", variant, str(fp32), "--quiet"]),
            "quantize int4 (RTN)": run_measured([*CLI, "quantize", str(fp32), str(int4), "--recipe", str(recipe),
                                                 "--quiet"]),
            "quantize int8 (RTN)": run_measured([*CLI, "quantize", str(fp32), str(int8), "--recipe", str(recipe8),
                                                 "--quiet"]),
            "mobile (.ort)": run_measured([*CLI, "mobile", str(int4), str(mobile), "--quiet"]),
        }
        sizes = {"fp32": package_sizes(fp32), "int8-rtn": package_sizes(int8), "int4-rtn": package_sizes(int4),
                 "int4 (export --recipe)": streamed_sizes}
        packages = {"fp32": fp32, "int8-rtn": int8, "int4-rtn": int4}
        weights = {name: weight_bytes_per_token(package) for name, package in packages.items()}
        contexts = (16, 64) if quick else CONTEXTS
        tokens = [int(t) for t in np.random.default_rng(0).integers(10, 200, size=max(contexts))]
        speeds: Speeds = {}
        for group in RUNNER_GROUPS:  # one group's sessions open at a time: all three at once exceed 24 GB
            speeds |= measure_runners({name: OnnxRunner(packages[name]) for name in group}, tokens, contexts,
                                      2 if quick else 3)
        profiles = {name: decode_op_profile(packages[name], tokens[:contexts[0]], PROFILE_STEPS)
                    for name in PROFILED}
        matmul_bytes = {name: matmul_weight_bytes(packages[name] / "decoder.onnx") for name in PROFILED}
        for package in packages.values():
            shutil.rmtree(package)
        # after the packages are closed: the bf16 text model takes 10 GB of RAM
        eager_runner = EagerRunner(checkpoint, lean=True)
        weights[EAGER] = eager_runner.weight_bytes_per_token()
        speeds |= measure_runners({EAGER: eager_runner}, tokens, contexts, 2 if quick else 3)
        del eager_runner
        shutil.rmtree(checkpoint)
        rss = mobile_rss.measure(mobile, steps=8 if quick else 128)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    title = f"{variant} (random weights, real geometry): export, quantize, mobile, RSS while generating"
    section = Section("full_size", title,
                      {"variant": variant, "weights": "random (real geometry)", "cpus": len(os.sched_getaffinity(0))})
    gib = 1 << 30
    section.columns = ["step", "wall", "peak RSS"]
    for name, figures in steps.items():
        section.figure(f"{name} seconds", "s", [figures["seconds"]])
        section.figure(f"{name} peak RSS", "bytes", [figures["peak_rss_bytes"]])
        rss_gib = figures["peak_rss_bytes"] / gib
        section.rows.append([name, f"{figures['seconds'] / 60:.1f} min", f"{rss_gib:.2f} GiB"])
    mib = 1 << 20
    for mode in ("mapped", "in_ram"):
        f = rss[mode]
        section.figure(f"{mode} RSS after load", "bytes", [f["rss_after_load"]])
        section.figure(f"{mode} RSS peak generating", "bytes", [f["rss_peak_generating"]])
    one_pass = steps[STREAMED]
    within = one_pass["peak_rss_bytes"] <= STREAMED_GOAL_RSS and one_pass["seconds"] <= STREAMED_GOAL_SECONDS
    section.findings.append(
        f"{STREAMED} from the bf16 checkpoint: {one_pass['seconds'] / 60:.1f} min at "
        f"{one_pass['peak_rss_bytes'] / gib:.2f} GiB peak RSS (goal ≤ {STREAMED_GOAL_SECONDS // 60} min and "
        f"≤ {STREAMED_GOAL_RSS // gib} GiB: {'met' if within else 'not met'}).")
    shallow_peak = steps[f"export fp32, first {SHALLOW_LAYERS} layers"]["peak_rss_bytes"]
    deep_peak = steps["export fp32"]["peak_rss_bytes"]
    section.findings.append(
        f"Export memory along depth: {SHALLOW_LAYERS} layers {shallow_peak / gib:.2f} GiB, all layers "
        f"{deep_peak / gib:.2f} GiB peak RSS, ratio {deep_peak / shallow_peak:.2f} (goal: flat, within 10 %: "
        f"{'met' if deep_peak <= 1.1 * shallow_peak else 'not met'}).")
    bandwidth = section.figure("read bandwidth", "GB/s", read_bandwidth_gbs())
    section.findings.append(
        f"Decode and prefill through plain onnxruntime sessions, medians; fp32 measured alone, int8 and int4 "
        f"round-robin (the three packages' sessions together, with their 1024-token prefill arenas, do not fit "
        f"in 24 GB); read bandwidth "
        f"{bandwidth.median:.1f} GB/s; roofline = weights read per token (decoder files, PLE rows excluded) / "
        f"bandwidth. {EAGER}: the text model alone in the checkpoint's bf16 (this CPU has AVX512-BF16), "
        f"measured after the packages are closed (fp32 would be 19 GB in torch on a 24 GB machine), same "
        f"prompts and steps.")
    decodes = {key: section.figure(f"{key[0]} decode ms/token @{key[1]}", "ms", measured["decode_ms"])
               for key, measured in speeds.items()}
    for context in contexts:
        eager_prefill = section.figure(f"{EAGER} prefill ms @{context}", "ms", speeds[EAGER, context]["prefill_ms"])
        eager = decodes[EAGER, context]
        versus = []
        for name in packages:
            ratio = section.ratio(f"{name} decode vs eager @{context}", eager, decodes[name, context])
            goal = f" (goal ≥ {EAGER_GOAL:.0f}×: {'met' if ratio.value >= EAGER_GOAL else 'not met'})" \
                if name == "int4-rtn" else ""
            versus.append(f"{name} {ratio.value:.1f}×{goal}")
        eager_roofline_ms = weights[EAGER] / (bandwidth.median * 1e9) * 1e3
        section.findings.append(
            f"{EAGER} @{context}: prefill {context / eager_prefill.median * 1e3:.0f} tokens/s, decode "
            f"{eager.median:.0f} ms/token, reading {weights[EAGER] / 1e9:.2f} GB of weights per token "
            f"= {eager_roofline_ms / eager.median:.0%} of its roofline; decode speed against it: {', '.join(versus)}.")
    for (name, context), measured in speeds.items():
        if name == EAGER:
            continue
        prefill = section.figure(f"{name} prefill ms @{context}", "ms", measured["prefill_ms"])
        decode = decodes[name, context]
        roofline_ms = weights[name] / (bandwidth.median * 1e9) * 1e3
        share = roofline_ms / decode.median
        goal = f"; goal ≥ 50 %: {'met' if share >= 0.5 else 'not met'}" if name == "int4-rtn" else ""
        section.findings.append(
            f"{name} @{context}: prefill {context / prefill.median * 1e3:.0f} tokens/s, decode "
            f"{decode.median:.1f} ms/token; weights read per token {weights[name] / 1e9:.2f} GB → roofline "
            f"{roofline_ms:.1f} ms/token, measured = {share:.0%} of it{goal}.")
    section.findings += [matmul_nbits_finding(f"{name} decode @{contexts[0]}", profiles[name], matmul_bytes[name],
                                              bandwidth.median) for name in PROFILED]
    eager_share = weights[EAGER] / (bandwidth.median * 1e9) / (decodes[EAGER, contexts[0]].median * 1e-3)
    fewer = weights[EAGER] / weights["int4-rtn"]
    section.findings.append(
        f"int4-rtn reads {fewer:.1f}× fewer weight bytes per token than {EAGER}, which decodes at {eager_share:.0%} "
        f"of the read bandwidth @{contexts[0]}: {EAGER_GOAL:.0f}× its speed needs int4 decode at "
        f"{EAGER_GOAL / fewer * eager_share:.0%} of the bandwidth.")
    mapped, in_ram = rss["mapped"], rss["in_ram"]
    total = {kind: sum(files.values()) / gib for kind, files in sizes.items()}
    ple = {kind: files.get("ple.data", 0) / gib for kind, files in sizes.items()}
    streamed_total, streamed_ple = total["int4 (export --recipe)"], ple["int4 (export --recipe)"]
    graphs = sum(rss["graph_file_bytes"].values()) / mib
    section.findings += [
        f"Package sizes: fp32 {total['fp32']:.2f} GiB (ple.data {ple['fp32']:.2f}), "
        f"int8-rtn {total['int8-rtn']:.2f} GiB (ple.data {ple['int8-rtn']:.2f}), "
        f"int4-rtn {total['int4-rtn']:.2f} GiB (ple.data {ple['int4-rtn']:.2f}), "
        f"int4 (GPTQ, export --recipe) {streamed_total:.2f} GiB (ple.data {streamed_ple:.2f}).",
        f"Generating {rss['steps']} tokens from the mobile package with the PLE rows memory-mapped: RSS "
        f"{mapped['rss_before_load'] / mib:.0f} MiB before load, {mapped['rss_after_load'] / mib:.0f} after, "
        f"{mapped['rss_peak_generating'] / mib:.0f} peak; with the PLE table read into RAM: "
        f"{in_ram['rss_after_load'] / mib:.0f} after load, {in_ram['rss_peak_generating'] / mib:.0f} peak. "
        f"PLE file {rss['ple_file_bytes'] / mib:.0f} MiB, graphs {graphs:.0f} MiB, "
        f"caches {mapped['cache_bytes'] / mib:.1f} MiB.",
    ]
    section.extra = {"sizes": sizes, "mobile_rss": rss,
                     "decode_profiles": {name: profile.to_json() for name, profile in profiles.items()}}
    return section
