"""A float model quantized by a recipe into a new package: ``quantize`` on an exported package, and
``export --recipe`` on an export in progress, whose float weights are never written. Both run the same
steps on the same values, so they give identical bytes:

    plan (recipe rules on checkpoint names) → sensitivities and bit budget (``budget_bits``) →
    per block, in layer order: calibration statistics (``calibration.HessianWalk``), then the block's
    graph rewritten (``apply.Quantizer``) → the decoder (the LM head's statistics) → the other graphs
"""

import functools
import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import Any

import onnx

from gemma4_onnx import __version__
from gemma4_onnx.atomic import Checked, check_free_space, check_target, publish_dir, publish_resumable
from gemma4_onnx.builtin_text import calibration_text
from gemma4_onnx.errors import UsageError
from gemma4_onnx.exporter.geometry import text_geometry
from gemma4_onnx.graphs.manifest import MANIFEST, graph_signature, read_manifest, write_manifest
from gemma4_onnx.progress import progress, say
from gemma4_onnx.quantize.apply import PLAN_KEY, Quantizer
from gemma4_onnx.quantize.blockwise import average_bits, bits_per_weight
from gemma4_onnx.quantize.budget import spend, upgradable
from gemma4_onnx.quantize.calibration import (
    Hessians,
    HessianWalk,
    calibration_file_text,
    check_calibration_file,
    token_limit,
    walk_key,
)
from gemma4_onnx.quantize.float_tensors import FloatTensors, PackageTensors
from gemma4_onnx.quantize.memo import recall, remember_result, remembered
from gemma4_onnx.quantize.plan import Entry, resolve
from gemma4_onnx.quantize.recipe import Recipe, load_recipe
from gemma4_onnx.quantize.resume import ResumeState
from gemma4_onnx.quantize.sensitivity import TOKENS as SENSITIVITY_TOKENS
from gemma4_onnx.quantize.sensitivity import sensitivities
from gemma4_onnx.runtime.package_files import graph_dir, graph_entries, graph_files, has_weights
from gemma4_onnx.runtime.text_model import check_files_present


def quantized_bytes(float_bytes: int, plan: list[Entry]) -> int:
    """About what the quantized package takes: the float package (``float_bytes``) with every planned tensor
    at its stored bits (scales and zero points counted)."""
    change = sum(e.candidate.size * (bits_per_weight(e.decision) / 8 - 4) for e in plan)
    return int(float_bytes + change)


def _initializer_shapes(source: Path, files: list[str]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        for tensor in onnx.load(source / file, load_external_data=False).graph.initializer:
            shapes.setdefault(tensor.name, tuple(tensor.dims))
    return shapes


def quantize_options(recipe_spec: str, budget_bits: float | None, calibration: Path | None,
                     calibration_tokens: int | None) -> tuple[Recipe, int]:
    """The recipe and the calibration token count, or a one-line error for a bad recipe or input."""
    recipe = load_recipe(recipe_spec, budget_bits)
    if calibration is not None:
        check_calibration_file(calibration)
    return recipe, token_limit(calibration_tokens)


def _block_data(block_graph: str) -> str:
    """A block graph's own data file (``blocks/layer_NN.data`` beside ``blocks/layer_NN.onnx``)."""
    return block_graph.removesuffix(".onnx") + ".data"


def quantize_package(model_dir: Path, out_dir: Path, recipe_spec: str, force: bool = False,
                     calibration: Path | None = None, budget_bits: float | None = None,
                     calibration_tokens: int | None = None) -> Path:
    source = Path(model_dir)
    quantize_options(recipe_spec, budget_bits, calibration, calibration_tokens)  # refused before the package is read
    manifest = read_manifest(source)
    check_files_present(source, manifest)
    if manifest.get("quantization"):
        raise UsageError(f"{source} is already quantized ({manifest['quantization']['recipe']}); quantize the "
                         "float export instead")
    if not has_weights(manifest):
        raise UsageError(f"{source} is a structure-only package: it has no weights to quantize")
    job = QuantizeJob(source, manifest, PackageTensors(source, manifest), recipe_spec, budget_bits, calibration,
                      calibration_tokens)
    float_bytes = sum(int(entry["bytes"]) for entry in manifest["files"].values())
    return job.publish(Path(out_dir), force, float_bytes, {"source_package": str(source.resolve())}, remember=True)


class QuantizeJob:
    """A float model (graphs in ``root``, weights from ``tensors``) quantized by a recipe into a package:
    ``quantize`` on an exported package, and ``export --recipe`` on an export in progress, whose float
    weights are never written (the same steps on the same values: both give identical bytes)."""

    def __init__(self, root: Path, manifest: dict[str, Any], tensors: FloatTensors, recipe_spec: str,
                 budget_bits: float | None, calibration: Path | None, calibration_tokens: int | None = None) -> None:
        self.root, self.manifest, self.tensors = root, manifest, tensors
        self.recipe, self.calibration_tokens = quantize_options(recipe_spec, budget_bits, calibration,
                                                                calibration_tokens)
        self.asked_budget = budget_bits is not None
        self.calibration = calibration
        self.geometry = text_geometry(manifest["text_config"])
        self.files = graph_files(manifest)
        self.plan = resolve(self.recipe, _initializer_shapes(root, self.files), self.geometry)
        if self.asked_budget and self.recipe.budget_bits is not None:  # below the rules' own bits: refused here,
            spend(self.plan, {}, self.recipe.budget_bits)  # before the sensitivities are measured

    def publish(self, out_dir: Path, force: bool, float_bytes: int, provenance: dict[str, Any],
                remember: bool = False, resume_key: str | None = None, checked: Checked | None = None) -> Path:
        """Calibrate, quantize and publish ``out_dir``. ``remember``: calibration results are kept for another
        recipe on the same package in this process (``memo``); with ``resume_key`` (what identifies the
        source) an interrupted run restarts from its last completed block. ``checked``: what the caller found
        at ``out_dir`` when its command began (``atomic.check_target``), the only thing it may replace."""
        out = Path(out_dir)
        needed = quantized_bytes(float_bytes, self.plan)
        if checked is None:
            checked = check_target(out, force)  # before calibration, which takes minutes at full size
        check_free_space(out.absolute().parent, needed)
        calibration = self.calibration
        text = calibration_file_text(calibration, self.root, max(self.calibration_tokens, SENSITIVITY_TOKENS)) \
            if calibration else calibration_text()
        if resume_key is None:
            with publish_dir(out, force=force, needed_bytes=needed, checked=checked) as staging:
                self._write(staging, text, None, remember, provenance)
            return out
        key = hashlib.sha256(json.dumps([resume_key, __version__, self.calibration_tokens, self.recipe.name,
                                         self.recipe.description,
                                         self.recipe.budget_bits, [e.as_dict() for e in self.plan],
                                         hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()],
                                        sort_keys=True).encode()).hexdigest()
        with publish_resumable(out, key, force=force, needed_bytes=needed, checked=checked) as staging:
            self._write(staging, text, ResumeState(staging), remember, provenance)
        return out

    def _write(self, staging: Path, text: str, resume: ResumeState | None, remember: bool,
               provenance: dict[str, Any]) -> None:
        plan, sensitivity = self.plan, {}
        if self.recipe.budget_bits is not None:
            candidates = upgradable(plan)
            detail = tuple((e.candidate.name, e.decision.block_size, e.decision.symmetric) for e in candidates)
            measure = functools.partial(sensitivities, self.root, self.manifest, self.tensors, candidates, text)
            kept = resume.sensitivity() if resume else None
            sensitivity = kept if kept is not None else (
                remembered("sensitivity", self.root, text, detail, measure) if remember else measure())
            if resume and kept is None:
                resume.save_sensitivity(sensitivity)
            plan = spend(plan, sensitivity, self.recipe.budget_bits, asked=self.asked_budget)
        plan_json = [e.as_dict() for e in plan]
        calibrated = {e.candidate.name for e in plan if e.decision.algorithm == "gptq" and e.decision.quantized}
        keep = remember and _small(plan, calibrated)
        walk = self._hessians(calibrated, text, keep, plan_json) if calibrated else None
        done = resume.layers_done() if resume else 0
        finished = {f for b in self.manifest["graphs"]["blocks"] if b["layer"] < done
                    for f in (b["file"], _block_data(b["file"]))}
        if resume:
            resume.clear_unfinished(finished)
            if done:
                say(f"resuming: blocks 0-{done - 1} were completed by an interrupted run")
            if walk is not None and done:
                resume.restore_walk(walk.walk)
        recipe = self.recipe
        quantizer = Quantizer(self.tensors, staging, plan, self.geometry.ple_dim)
        graphs = json.loads(json.dumps(self.manifest["graphs"]))
        signatures: dict[str, Any] = {}
        try:
            for file in progress(self._ordered(), desc=f"quantizing ({recipe.name})", unit="graph"):
                model = onnx.load(self.root / file, load_external_data=False)
                if file in finished:  # written by the interrupted run
                    written = onnx.load(staging / file, load_external_data=False)
                    quantizer.adopt(written, model, graph_dir(file))
                    signatures[file] = graph_signature(written)
                    continue
                if walk is not None:
                    quantizer.hessians = {}  # the last block's H go before this block's are summed
                    quantizer.hessians = self._step(walk, file)
                    quantizer.dequantized = {} if walk.pending is not None else None
                model = quantizer.rewrite(model, graph_dir(file))
                if walk is not None:
                    walk.advance(quantizer.dequantized or {})
                    quantizer.dequantized = None
                entry = model.metadata_props.add()
                entry.key, entry.value = PLAN_KEY, json.dumps({"recipe": recipe.name, "plan": plan_json})
                (staging / file).parent.mkdir(parents=True, exist_ok=True)
                onnx.save_model(model, staging / file)
                signatures[file] = graph_signature(model)
                layer = self._layer_of(file)
                if resume and layer is not None:
                    quantizer.writer.finish(_block_data(file))
                    if walk is not None:
                        resume.save_walk(walk.walk)
                    else:
                        resume.mark_done(layer + 1)
        finally:
            quantizer.writer.close()
        if walk is not None and walk.keep:
            remember_result("hessians", self.root, text, walk_key(calibrated, self.calibration_tokens, plan_json), walk)
        for entry_graph in graph_entries({"graphs": graphs}):
            entry_graph.update(signatures[entry_graph["file"]])
        for name in self.manifest["files"]:
            if not (staging / name).exists() and not name.endswith((".onnx", ".data")):
                (staging / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(self.root / name, staging / name)
        out = {k: v for k, v in self.manifest.items() if k not in ("format", "files", MANIFEST)}
        out.update({
            "tool": {"name": "gemma4-onnx", "version": __version__},
            "graphs": graphs,
            "precision": f"quantized ({recipe.name})",
            "quantization": {"recipe": recipe.name, "description": recipe.description,
                             "calibration": (str(self.calibration) if self.calibration else "built-in")
                             if calibrated else None,
                             "calibration_tokens": self.calibration_tokens if calibrated else None,
                             **provenance, "plan": plan_json,
                             "avg_bits_per_linear_weight": average_bits(plan),
                             "budget_bits": recipe.budget_bits, "sensitivity": sensitivity or None},
        })
        if resume:
            resume.finish()  # not part of the package
        write_manifest(staging, out)

    def _hessians(self, calibrated: set[str], text: str, keep: bool, plan_json: list[dict[str, Any]]) -> HessianWalk:
        if keep:
            kept = recall("hessians", self.root, text, walk_key(calibrated, self.calibration_tokens, plan_json))
            if kept is not None:
                return kept
        return HessianWalk(self.root, self.manifest, self.tensors, calibrated, text, self.calibration_tokens, keep)

    def _ordered(self) -> list[str]:
        """Blocks in layer order first (each calibrated just before it is quantized), then the decoder (the LM
        head's statistics follow the last block), then the rest, which reuse what those wrote."""
        blocks = [b["file"] for b in sorted(self.manifest["graphs"]["blocks"], key=lambda b: b["layer"])]
        decoder = self.manifest["graphs"]["decoder"]["file"]
        return [*blocks, decoder, *(f for f in self.files if f not in blocks and f != decoder)]

    def _layer_of(self, file: str) -> int | None:
        return next((b["layer"] for b in self.manifest["graphs"]["blocks"] if b["file"] == file), None)

    def _step(self, walk: HessianWalk, file: str) -> Hessians:
        layer = self._layer_of(file)
        if layer is not None:
            return walk.layer(self.geometry.layers[layer])
        return walk.head() if file == self.manifest["graphs"]["decoder"]["file"] else {}


MEMO_HESSIAN_BYTES = 1 << 28


def _small(plan: list[Entry], calibrated: set[str]) -> bool:
    """Whether every [K, K] float32 statistic of the calibrated tensors fits ``MEMO_HESSIAN_BYTES``."""
    total = 0
    for entry in plan:
        if entry.candidate.name in calibrated:
            shape = entry.candidate.shape
            total += math.prod(shape[:-2]) * shape[-1] ** 2 * 4
    return total <= MEMO_HESSIAN_BYTES
