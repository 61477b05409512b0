"""Our int4 graphs against the onnxruntime-genai model builder's, decode ms/token on the same layer shapes.

The builder (``onnxruntime_genai.models.builder``) cannot build E2B as it ships: it has no per-layer
embeddings and no KV sharing. What it builds with E2B's layer widths is a Gemma 3 dense stack, so that is
what both sides get here, with random weights:

* the builder: a ``Gemma3ForCausalLM`` checkpoint (bf16) with hidden 1536, 8 query heads and 1 KV head of
  256, MLP 6144, sliding window 512 and the first ``LAYERS`` layer types of E2B, built with ``-p int4 -e cpu``
  (its own int4 settings, read back from its graph);
* ours: the Gemma 4 text config of E2B cut to the same ``LAYERS`` layers with per-layer embeddings, KV
  sharing and the double-wide MLP turned off (``e2b-dense``, registered in the export subprocess),
  exported with the int4 round-to-nearest recipe of ``bench_full_size``, ``--target portable`` and
  ``--target ort``.

Both use a ``VOCAB``-token vocabulary so the LM head does not dominate a short stack. What still differs,
and is stated in the table: Gemma 4's full layers have heads of 512 (Gemma 3's: 256), Gemma 4 adds the
value norm and layer scalar, and each side uses its own int4 kernels' settings. Decode is timed round-robin
after a ``CONTEXT``-token prompt: the builder's folder through onnxruntime-genai (the runtime it targets), ours
through ``runtime.text_model`` (numpy + onnxruntime sessions).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench_decode import OnnxRunner, decode_call, decode_token, read_bandwidth_gbs
from bench_full_size import RTN_RECIPE, run_measured
from measure import Section, interleaved_ms
from op_profile import (
    OpProfile,
    decode_op_profile,
    matmul_nbits,
    matmul_nbits_finding,
    matmul_weight_bytes,
    profile_from_files,
)
from variant_cli import shallow, variant_cli

LAYERS = 8
VOCAB = 16384
CONTEXT = 128
DECODE_STEPS = 16
GOAL = 1.1  # ours at least 1.1× the builder's decode speed
NO_MEDIA = {"vision_config": None, "audio_config": None}

# onnxruntime-genai 0.18's builder reads Gemma 3's RoPE as transformers 4 wrote it (a flat ``rope_parameters`` and
# ``rope_local_base_freq``); transformers 5.23 nests it per layer type. The builder runs unchanged, its config
# read through this adapter.
BUILDER_CLI = [sys.executable, "-c", """
import runpy, sys
import transformers
load = transformers.AutoConfig.from_pretrained
def flat_rope(*args, **kwargs):
    config = load(*args, **kwargs)
    nested = getattr(config, "rope_parameters", None) or {}
    if "full_attention" in nested:
        config.rope_local_base_freq = nested["sliding_attention"]["rope_theta"]
        config.rope_parameters = dict(nested["full_attention"])
    return config
transformers.AutoConfig.from_pretrained = flat_rope
sys.argv[0] = "builder"
runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")
"""]


def gemma3_checkpoint(directory: Path, layers: int, quick: bool) -> Path:
    """A random bf16 Gemma3ForCausalLM with E2B's layer widths (tiny widths with ``quick``)."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from gemma4_onnx.exporter.variants import variant_config

    text = variant_config("tiny-e2b" if quick else "e2b")["text_config"]
    config = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=text["hidden_size"], intermediate_size=text["intermediate_size"],
        num_hidden_layers=layers, num_attention_heads=text["num_attention_heads"],
        num_key_value_heads=text["num_key_value_heads"], head_dim=text["head_dim"],
        sliding_window=text["sliding_window"], layer_types=text["layer_types"][:layers],
        max_position_embeddings=4096, dtype="bfloat16")
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).to(torch.bfloat16)  # type: ignore[arg-type]  # transformers' decorated .to
    model.save_pretrained(directory)
    return directory


class GenaiRunner:
    """The builder's folder run by onnxruntime-genai, the runtime it is built for (its sliding layers keep
    ring-buffer caches that runtime manages): a prompt appended, then one ``generate_next_token`` per step."""

    def __init__(self, folder: Path, window: int) -> None:
        import onnxruntime_genai as og

        self.og = og
        self.model = og.Model(str(folder))
        self.window = window  # its sliding layers' cache buffers must hold a window: max_length ≥ W

    def prefill(self, ids: list[int]) -> Any:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=max(len(ids) + 4 * DECODE_STEPS, self.window))
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(ids)
        return generator

    def step(self, generator: Any, token: int) -> None:
        generator.generate_next_token()


def builder_op_profile(folder: Path, prompt: list[int], steps: int, capacity: int) -> OpProfile:
    """The builder's graph profiled through a plain onnxruntime session, as ``decode_op_profile`` profiles ours:
    its attention keeps fixed ``capacity``-token caches (onnxruntime-genai's shared past/present buffers)."""
    import numpy as np
    import onnxruntime as ort

    from gemma4_onnx.runtime.text_model import session_options

    with tempfile.TemporaryDirectory(prefix="gemma4-profile-") as directory:
        session = ort.InferenceSession(str(folder / "model.onnx"),
                                       session_options(profile_prefix=str(Path(directory) / "builder-")),
                                       providers=["CPUExecutionProvider"])
        config = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
        cache = {i.name: np.zeros((1, config["num_key_value_heads"], capacity, config["head_size"]), np.float32)
                 for i in session.get_inputs() if i.name.startswith("past_key_values.")}
        names = [o.name for o in session.get_outputs()]
        length = 0
        for step in range(-1, steps):
            ids = np.array([prompt] if step < 0 else [[decode_token(step)]])
            length += ids.shape[1]
            outputs = session.run(names, {"input_ids": ids, "attention_mask": np.ones((1, length), np.int64), **cache})
            cache = {name.replace("present.", "past_key_values."): value
                     for name, value in zip(names, outputs, strict=True) if name.startswith("present.")}
        files = [session.end_profiling()]
        del session
        return profile_from_files(files, steps)


def _int4_settings(model: Path) -> str:
    settings = {f"bits {a.get('bits')}, block {a.get('block_size')}, accuracy_level {a.get('accuracy_level', 0)}"
                for a in matmul_nbits(model)}
    return "; ".join(sorted(settings)) or "no MatMulNBits"


def section(quick: bool) -> Section:
    layers = 4 if quick else LAYERS
    title = (f"Decode vs the onnxruntime-genai model builder: int4, a dense stack of {layers} "
             f"{'tiny' if quick else 'E2B-width'} layers")
    root = Path(tempfile.mkdtemp(prefix="gemma4-bench-builder-", dir=os.environ.get("GEMMA4_BENCH_TMP")))
    try:
        checkpoint = gemma3_checkpoint(root / "gemma3", layers, quick)
        builder = root / "builder-int4"
        build = run_measured([*BUILDER_CLI, "-i", str(checkpoint), "-o", str(builder), "-p", "int4", "-e", "cpu",
                              "-c", str(root / "cache")])
        recipe = root / "int4-rtn.toml"
        recipe.write_text(RTN_RECIPE)
        base = "tiny-e2b" if quick else "e2b"
        dense = {**shallow(base, layers), "num_kv_shared_layers": 0, "hidden_size_per_layer_input": 0,
                 "use_double_wide_mlp": False, "vocab_size": VOCAB, "vocab_size_per_layer_input": VOCAB}
        ours = {}
        for target in ("portable", "ort"):
            ours[target] = root / f"ours-{target}"
            run_measured([*variant_cli(base, "e2b-dense", dense, NO_MEDIA), "export",
                          "e2b-dense", str(ours[target]), "--recipe", str(recipe), "--target", target, "--quiet"])
        window = json.loads((checkpoint / "config.json").read_text())["sliding_window"]
        runners: dict[str, Any] = {"builder int4": GenaiRunner(builder, window),
                                   "ours int4 portable": OnnxRunner(ours["portable"]),
                                   "ours int4 ort": OnnxRunner(ours["ort"])}
        prompt = list(range(10, 10 + (16 if quick else CONTEXT)))
        caches = {name: runner.prefill(prompt) for name, runner in runners.items()}
        samples = interleaved_ms({name: decode_call(runner, caches[name]) for name, runner in runners.items()},
                                 4 if quick else DECODE_STEPS, 2)
        weight_bytes = {"builder int4": matmul_weight_bytes(builder / "model.onnx"),
                        "ours int4 portable": matmul_weight_bytes(ours["portable"] / "decoder.onnx"),
                        "ours int4 ort": matmul_weight_bytes(ours["ort"] / "decoder.onnx")}
        bandwidth = read_bandwidth_gbs()
        del runners, caches
        steps = 4 if quick else DECODE_STEPS
        profiles = {"builder int4": builder_op_profile(builder, prompt, steps, max(window, len(prompt) + steps + 1)),
                    "ours int4 ort": decode_op_profile(ours["ort"], prompt, steps)}
        builder_settings = _int4_settings(builder / "model.onnx")
        our_settings = _int4_settings(ours["portable"] / "blocks" / "layer_00.onnx")
        builder_config = json.loads((builder / "genai_config.json").read_text())["model"]["type"]
    finally:
        shutil.rmtree(root, ignore_errors=True)

    section = Section("builder", title, {
        "layers": layers, "vocabulary": VOCAB, "context": 16 if quick else CONTEXT,
        "builder model type": builder_config, "builder int4": builder_settings, "ours int4": our_settings})
    figures = {name: section.figure(f"{name} decode ms/token", "ms", values) for name, values in samples.items()}
    section.columns = ["graphs", "decode ms/token", "builder / this"]
    reference = figures["builder int4"]
    for name, figure in figures.items():
        ratio = section.ratio(f"builder / {name}", reference, figure)
        section.rows.append([name, f"{figure.median:.2f}", f"{ratio.value:.2f}×"])
    best = max(("ours int4 portable", "ours int4 ort"), key=lambda n: reference.median / figures[n].median)
    speedup = reference.median / figures[best].median
    section.findings += [
        f"Compared: a Gemma 3 dense stack built by the builder (`{builder_config}`) against our Gemma 4 text "
        f"graphs of the same widths with PLE, KV sharing and the double-wide MLP off; {layers} layers, "
        f"{VOCAB}-token vocabulary. Differences kept: our full layers have 512-wide heads (Gemma 4), "
        "the value norm and layer scalar. The builder (onnxruntime-genai 0.18) reads the checkpoint's RoPE "
        "settings through an adapter: it expects transformers 4's flat layout, transformers 5.23 nests them.",
        f"Builder graph build: {build['seconds']:.0f} s, {build['peak_rss_bytes'] / (1 << 30):.2f} GiB peak RSS.",
        f"Ours ({best}) decodes {speedup:.2f}× the builder's speed (goal ≥ {GOAL}×: "
        f"{'met' if speedup >= GOAL else 'not met'}).",
    ]
    read = section.figure("read bandwidth", "GB/s", bandwidth)
    shares = {name: weight_bytes[name] / (figures[name].median * 1e-3) / (read.median * 1e9) for name in figures}
    section.findings.append(
        "Weights read per token: " + ", ".join(f"{name} {weight_bytes[name] / 1e6:.0f} MB" for name in figures)
        + " (ours: the int8 LM head and Gemma 4's 512-wide full-layer heads). "
        f"At {read.median:.1f} GB/s read bandwidth that is " + ", ".join(f"{name} {share:.0%}" for name, share
                                                                          in shares.items())
        + f" of the roofline: on equal bytes, {GOAL}× the builder would need "
        f"{GOAL * shares['builder int4']:.0%} of it.")
    section.findings += [matmul_nbits_finding(name, profile, weight_bytes[name], read.median)
                         for name, profile in profiles.items()]
    matmul = {name: profile.kernel_ms.get("MatMulNBits", 0.0) for name, profile in profiles.items()}
    rest = {name: profile.kernel_total_ms - matmul[name] for name, profile in profiles.items()}
    section.findings.append(
        f"Per token, MatMulNBits: builder {matmul['builder int4']:.1f} ms, ours {matmul['ours int4 ort']:.1f} ms; "
        f"every other kernel: builder {rest['builder int4']:.1f} ms, ours {rest['ours int4 ort']:.1f} ms (profiled "
        "through plain onnxruntime sessions, the builder's with onnxruntime-genai's fixed-size caches).")
    section.extra = {"weight_bytes_per_token": weight_bytes,
                     "decode_profiles": {name: profile.to_json() for name, profile in profiles.items()}}
    return section
