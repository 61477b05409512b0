"""Any geometry transformers accepts for Gemma 4 exports, matches transformers in fp32 and quantizes with
every built-in recipe: tiny random checkpoints whose widths are not whole quantization blocks (hidden and
per-layer widths 24, 40, 72, 96; vocabularies of 259, 300, 333), odd head counts, head dims that are not
powers of two, 2 to 8 experts with top-k 2 to 8, sliding windows shorter than the prompt, layer patterns
other than E2B's and KV-shared layers. Every tensor whose width is not whole blocks of its recipe has the
fit chosen for it (``quantize.plan.fitted``) written in its plan; the rest have none.

``make test`` runs two geometries that between them have every odd width and MoE; ``make test-slow`` the grid.
"""

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from gemma4_onnx import tolerances
from gemma4_onnx.builtin_text import BUILTIN_TEXT
from gemma4_onnx.errors import UsageError
from gemma4_onnx.exporter.geometry import text_geometry
from gemma4_onnx.exporter.init_checkpoint import init_checkpoint_from_config
from gemma4_onnx.exporter.package import export_package
from gemma4_onnx.exporter.variants import FULL, SLIDING, tiny_config
from gemma4_onnx.graphs.manifest import read_manifest
from gemma4_onnx.parity_run import run_parity
from gemma4_onnx.quantize.apply import PLAN_KEY
from gemma4_onnx.quantize.blockwise import average_bits
from gemma4_onnx.quantize.float_tensors import PackageTensors
from gemma4_onnx.quantize.job import QuantizeJob, quantize_package
from gemma4_onnx.quantize.recipe import BUILTIN, MAX_BUDGET_BITS, load_recipe
from gemma4_onnx.runtime.text_model import TextModel

S, F = SLIDING, FULL
CALIBRATION_TOKENS = 256
PARITY_TEXT_CHARS = 1400  # three teacher-forced windows of 512 tokens, each far past the sliding windows
GREEDY_STEPS = 8
AUTO_BUDGET = 4.9  # auto's budget in the int4 gates; a geometry whose rules alone take more gets its floor + 0.5
AUTO_MARGIN = 0.5

# text_config fields over tiny_config's (hidden 64, 4 heads of 16, vocabulary 320, window 8, [S, F]).
GEOMETRIES: dict[str, dict[str, Any]] = {
    # PLE width 24 (the reported failure), hidden 24 (one padded 32-block, odd at int4), vocabulary 333,
    # 3 query heads of 12, KV sharing, double-wide MLP
    "ple24-hidden24": dict(hidden_size=24, hidden_size_per_layer_input=24, vocab_size=333,
                           vocab_size_per_layer_input=333, num_attention_heads=3, num_key_value_heads=1, head_dim=12,
                           global_head_dim=24, intermediate_size=72, num_hidden_layers=3, layer_types=[S, F, F],
                           num_kv_shared_layers=1, use_double_wide_mlp=True),
    # MoE with 5 experts, top-3, expert width 24; hidden 40, 5 heads of 20, K=V on full layers; starts full
    "moe5-top3-hidden40": dict(hidden_size=40, vocab_size=300, num_attention_heads=5, num_key_value_heads=5,
                               head_dim=20, global_head_dim=40, attention_k_eq_v=True, num_global_key_value_heads=1,
                               intermediate_size=40, enable_moe_block=True, num_experts=5, top_k_experts=3,
                               moe_intermediate_size=24, num_hidden_layers=3, layer_types=[F, S, F]),
    "ple40-hidden72": dict(hidden_size=72, hidden_size_per_layer_input=40, num_attention_heads=6,
                           num_key_value_heads=2, head_dim=24, global_head_dim=48, intermediate_size=100,
                           vocab_size=300, vocab_size_per_layer_input=300, num_hidden_layers=4,
                           layer_types=[S, F, S, F], num_kv_shared_layers=2, sliding_window=5),
    "hidden96-ple12": dict(hidden_size=96, hidden_size_per_layer_input=12, num_attention_heads=2,
                           num_key_value_heads=1, head_dim=48, global_head_dim=96, intermediate_size=200,
                           num_hidden_layers=2),
    "odd-ple25": dict(hidden_size=48, hidden_size_per_layer_input=25, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, global_head_dim=32, intermediate_size=96, num_hidden_layers=2),
    "ple36-window3": dict(hidden_size=64, hidden_size_per_layer_input=36, sliding_window=3, num_hidden_layers=5,
                          layer_types=[S, S, F, S, F], num_kv_shared_layers=2),
    "heads7-dim10": dict(hidden_size=56, num_attention_heads=7, num_key_value_heads=7, head_dim=10,
                         global_head_dim=14, intermediate_size=56, vocab_size=259, num_hidden_layers=2),
    "all-full-keqv": dict(hidden_size=40, num_attention_heads=4, num_key_value_heads=2, head_dim=10,
                          global_head_dim=20, attention_k_eq_v=True, num_global_key_value_heads=1,
                          intermediate_size=60, num_hidden_layers=2, layer_types=[F, F]),
    "moe2-top2-hidden24": dict(hidden_size=24, num_attention_heads=2, num_key_value_heads=1, head_dim=12,
                               global_head_dim=24, intermediate_size=48, enable_moe_block=True, num_experts=2,
                               top_k_experts=2, moe_intermediate_size=20, vocab_size=333, num_hidden_layers=2),
    "moe8-top8-hidden96": dict(hidden_size=96, num_attention_heads=3, num_key_value_heads=3, head_dim=32,
                               global_head_dim=32, intermediate_size=64, enable_moe_block=True, num_experts=8,
                               top_k_experts=8, moe_intermediate_size=40, num_hidden_layers=2),
    "moe6-top4-pattern": dict(hidden_size=72, num_attention_heads=3, num_key_value_heads=1, head_dim=24,
                              global_head_dim=48, attention_k_eq_v=True, num_global_key_value_heads=1,
                              intermediate_size=72, enable_moe_block=True, num_experts=6, top_k_experts=4,
                              moe_intermediate_size=36, num_hidden_layers=4, layer_types=[S, F, S, F],
                              sliding_window=6),
    "hidden40-towers": dict(hidden_size=40, hidden_size_per_layer_input=24, num_attention_heads=5,
                            num_key_value_heads=1, head_dim=8, global_head_dim=16, intermediate_size=80,
                            num_hidden_layers=2, num_kv_shared_layers=0),
}
WITH_TOWERS = {"hidden40-towers"}
FAST = ("ple24-hidden24", "moe5-top3-hidden40")
NAMES = [name if name in FAST else pytest.param(name, marks=pytest.mark.slow) for name in GEOMETRIES]


def geometry_config(name: str) -> dict[str, Any]:
    return tiny_config(towers=name in WITH_TOWERS, **GEOMETRIES[name])


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory):
    """A function: geometry name → (checkpoint dir, fp32 package dir, parity text), made once per module."""
    root = tmp_path_factory.mktemp("sweep")
    text = root / "parity.txt"
    text.write_text(BUILTIN_TEXT[:PARITY_TEXT_CHARS])
    made: dict[str, tuple[Path, Path, Path]] = {}

    def get(name: str) -> tuple[Path, Path, Path]:
        if name not in made:
            checkpoint = init_checkpoint_from_config(geometry_config(name), root / name / "checkpoint", dtype="float32")
            made[name] = checkpoint, export_package(str(checkpoint), root / name / "fp32"), text
        return made[name]

    return get


def test_the_grid_covers_what_the_issue_names() -> None:
    geometries = [text_geometry(geometry_config(name)) for name in GEOMETRIES]
    assert {24, 40, 72, 96} <= {g.hidden_size for g in geometries}
    assert {24, 40, 25} <= {g.ple_dim for g in geometries}
    assert {259, 300, 333} <= {g.vocab_size for g in geometries}
    assert any(g.num_heads % 2 for g in geometries)
    assert any(spec.head_dim & (spec.head_dim - 1) for g in geometries for spec in g.layers)  # not powers of two
    assert {2, 8} <= {g.num_experts for g in geometries} and {2, 8} <= {g.top_k_experts for g in geometries}
    patterns = {tuple(spec.attention for spec in g.layers) for g in geometries}
    assert len(patterns) >= 5 and ("full", "sliding", "full") in patterns and ("full", "full") in patterns
    assert any(spec.kv_mode == "reuse" for g in geometries for spec in g.layers)
    assert all(g.sliding_window < 16 for g in geometries)  # the parity windows run far past every one


@pytest.mark.parametrize("name", NAMES)
def test_geometry_exports_and_matches_transformers(name: str, sweep) -> None:
    checkpoint, package, text = sweep(name)
    result = run_parity(package, checkpoint, text, steps=GREEDY_STEPS)
    t = result["text"]
    assert t["greedy_match_steps"] == t["greedy_steps"] == GREEDY_STEPS
    assert t["max_abs_logit_diff"] <= tolerances.TEXT_FP32_MAX_ABS_LOGIT_DIFF
    assert t["kl_mean"] <= tolerances.TEXT_FP32_KL_MEAN
    assert min(b["cosine"] for b in result["blocks"]) >= tolerances.BLOCK_FP32_MIN_COSINE
    assert t["positions"] / t["windows"] > 3 * text_geometry(geometry_config(name)).sliding_window
    assert result["passed"]


def _budget(package: Path) -> float:
    """auto's budget: 4.9 bits, or where the rules alone exceed it (tiny widths, int8 K/V), a little above
    them, so the budget still has tensors to move."""
    manifest = read_manifest(package)
    job = QuantizeJob(package, manifest, PackageTensors(package, manifest), "auto", MAX_BUDGET_BITS, None,
                      CALIBRATION_TOKENS)  # the plan before any budget is spent
    return max(AUTO_BUDGET, round(average_bits(job.plan) + AUTO_MARGIN, 2))


def _odd_widths(plan: list[dict[str, Any]], ple_dim: int, recipe: str) -> set[str]:
    """The quantized tensors whose width is not whole blocks: of their block (padded), or for the PLE, of the
    block its rule asked for (changed to one that divides the per-layer width)."""
    loaded = load_recipe(recipe, AUTO_BUDGET)
    asked = {rule.name: rule.decide(loaded.default) for rule in loaded.rules}
    odd = set()
    for entry in plan:
        if entry["bits"] == "float":
            continue
        if entry["kind"] == "ple":
            if ple_dim % asked.get(entry["rule"], loaded.default).block_size:
                odd.add(entry["tensor"])
            continue
        width, block = entry["shape"][-1], entry["block_size"]
        if width % block or (entry["kind"] == "embedding" and entry["bits"] == 4 and -(-width // block) % 2):
            odd.add(entry["tensor"])
    return odd


def _logit_cosine(package: Path, reference: Path) -> float:
    """Mean cosine of the quantized package's logits with the float package's over 64 tokens of text."""
    ids = [2] + [b + 3 for b in BUILTIN_TEXT[:63].encode()]
    logits = []
    for directory in (package, reference):
        model = TextModel(directory)
        logits.append(model.forward([ids], model.empty_cache(1))[0].astype(np.float64))
    a, b = logits
    return float(np.mean((a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)))


@pytest.mark.parametrize("recipe", BUILTIN)
@pytest.mark.parametrize("name", NAMES)
def test_geometry_quantizes_with_every_recipe(name: str, recipe: str, sweep, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    _, fp32, _ = sweep(name)
    budget = _budget(fp32) if recipe == "auto" else None
    if budget is not None and budget > AUTO_BUDGET:  # 4.9 cannot be met here: refused in one line, before any work
        with monkeypatch.context() as patched:
            patched.setattr("gemma4_onnx.quantize.job.sensitivities", None)  # measuring them would fail
            with pytest.raises(UsageError, match=f"--budget-bits {AUTO_BUDGET:g} is below this recipe's own"):
                quantize_package(fp32, tmp_path / "refused", recipe, budget_bits=AUTO_BUDGET)
        assert not (tmp_path / "refused").exists()
    package = quantize_package(fp32, tmp_path / recipe, recipe, budget_bits=budget,
                               calibration_tokens=CALIBRATION_TOKENS)
    geometry = text_geometry(geometry_config(name))
    model = TextModel(package)
    tokens = model.greedy([2, 40, 41, 42, 43], GREEDY_STEPS)
    assert len(tokens) == GREEDY_STEPS and all(0 <= t < geometry.vocab_size for t in tokens)
    gate = tolerances.SWEEP_QUANT_MIN_LOGIT_COSINE["int8" if recipe == "int8" else "int4"]
    assert _logit_cosine(package, fp32) >= gate

    manifest = json.loads((package / "manifest.json").read_text())
    plan = manifest["quantization"]["plan"]
    for graph in package.rglob("*.onnx"):
        metadata = {p.key: p.value for p in onnx.load(graph, load_external_data=False).metadata_props}
        assert json.loads(metadata[PLAN_KEY])["plan"] == plan, graph.name
    fitted = {e["tensor"] for e in plan if e.get("fit")}
    assert fitted == _odd_widths(plan, geometry.ple_dim, recipe)  # every odd tensor says its fit; no other
    for entry in plan:
        if entry["kind"] == "ple" and entry["bits"] != "float":
            assert geometry.ple_dim % entry["block_size"] == 0  # no block straddles two layers' slices
    if recipe == "auto":
        assert manifest["quantization"]["avg_bits_per_linear_weight"] <= budget + 1e-9
        assert any(e["rule"].startswith("budget") for e in plan)


# The fits, each against onnxruntime's own kernel: exact, not approximately right.

def _kernel_session(node: onnx.NodeProto, inputs: list[onnx.ValueInfoProto], tensors: list[onnx.TensorProto]):
    import onnxruntime as ort

    graph = onnx.helper.make_graph([node], "fit", inputs, [onnx.helper.make_tensor_value_info("y", 1, None)], tensors)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21),
                                                         onnx.helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k", [8, 24, 40, 72, 333])
def test_matmul_nbits_takes_k_padded_to_whole_blocks(k: int, bits: int) -> None:
    from gemma4_onnx.quantize.blockwise import blockwise
    from gemma4_onnx.quantize.experts import dequantize
    from gemma4_onnx.quantize.recipe import Decision

    rng = np.random.default_rng(k)
    weight, x = rng.standard_normal((20, k)).astype(np.float32), rng.standard_normal((3, k)).astype(np.float32)
    packed, scales, zeros = blockwise(weight, Decision(bits=bits, block_size=32, symmetric=False))
    tensors = [onnx.numpy_helper.from_array(a, n) for a, n in ((packed, "p"), (scales, "s"), (zeros, "z"))]
    node = onnx.helper.make_node("MatMulNBits", ["x", "p", "s", "z"], ["y"], domain="com.microsoft", K=k, N=20,
                                 bits=bits, block_size=32, accuracy_level=1)
    y = _kernel_session(node, [onnx.helper.make_tensor_value_info("x", 1, [3, k])], tensors).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ dequantize(packed, scales, zeros, bits, k).T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("width", "bits", "block"), [(24, 4, 32), (96, 4, 32), (40, 4, 16), (72, 8, 16), (48, 4, 16)])
def test_gather_block_quantized_reads_the_head_bytes_padded_and_its_own_zero_points(width: int, bits: int,
                                                                                     block: int) -> None:
    """The embedding lookup of ``apply._gather``: the LM head's MatMulNBits bytes as [V, padded] elements, with
    zero points re-packed across rows where a row has an odd number of 4-bit blocks, then sliced to the width."""
    from gemma4_onnx.quantize.apply import nibbles_across_rows
    from gemma4_onnx.quantize.blockwise import blockwise
    from gemma4_onnx.quantize.experts import dequantize
    from gemma4_onnx.quantize.recipe import Decision

    rows = 333
    weight = np.random.default_rng(width).standard_normal((rows, width)).astype(np.float32)
    packed, scales, zeros = blockwise(weight, Decision(bits=bits, block_size=block, symmetric=False))
    blocks = scales.shape[1]
    element = onnx.TensorProto.UINT4 if bits == 4 else onnx.TensorProto.UINT8
    zero_bytes = nibbles_across_rows(zeros, blocks) if bits == 4 and blocks % 2 else zeros
    tensors = [onnx.helper.make_tensor("d", element, [rows, blocks * block], packed.tobytes(), raw=True),
               onnx.helper.make_tensor("z", element, [rows, blocks], zero_bytes.tobytes(), raw=True),
               onnx.numpy_helper.from_array(scales, "s")]
    node = onnx.helper.make_node("GatherBlockQuantized", ["d", "i", "s", "z"], ["y"], domain="com.microsoft",
                                 gather_axis=0, quantize_axis=1, block_size=block, bits=bits)
    ids = np.array([0, 7, rows - 1, 100])
    session = _kernel_session(node, [onnx.helper.make_tensor_value_info("i", onnx.TensorProto.INT64, [4])], tensors)
    gathered = session.run(None, {"i": ids})[0]
    np.testing.assert_array_equal(gathered[:, :width], dequantize(packed, scales, zeros, bits, width)[ids])


@pytest.mark.parametrize(("ple_dim", "bits", "block", "expected"), [
    (256, 4, 32, (4, 32)), (8, 4, 32, (4, 8)), (24, 4, 32, (4, 24)), (24, 8, 16, (8, 12)), (40, 4, 32, (4, 20)),
    (74, 4, 32, (4, 74)), (36, 4, 32, (4, 18)), (25, 4, 32, (8, 25)), (25, 8, 16, (8, 25)), (15, 8, 16, (8, 15)),
])
def test_ple_blocks_divide_the_per_layer_width_and_say_why(ple_dim: int, bits: int, block: int,
                                                          expected: tuple[int, int]) -> None:
    from gemma4_onnx.quantize.blockwise import blockwise
    from gemma4_onnx.quantize.experts import dequantize
    from gemma4_onnx.quantize.plan import Candidate, Entry, fitted
    from gemma4_onnx.quantize.recipe import Decision

    table = Candidate("model.language_model.embed_tokens_per_layer.weight", "ple", (300, 3 * ple_dim), None)
    entry = fitted(Entry(table, Decision(bits=bits, block_size=block, symmetric=False), "PLE"), ple_dim)
    assert (entry.decision.bits, entry.decision.block_size) == expected
    assert (entry.fit is None) == (ple_dim % block == 0)
    if bits == 4 and expected[0] == 8:
        assert entry.fit and "odd" in entry.fit
    weight = np.random.default_rng(ple_dim).standard_normal(table.shape).astype(np.float32)
    packed, scales, zeros = blockwise(weight, entry.decision)  # any block: the kernel's rounding rule
    restored = dequantize(packed, scales, zeros, entry.decision.bits, table.shape[1])
    assert np.abs(restored - weight).max() <= scales.max()  # within a step of its block
