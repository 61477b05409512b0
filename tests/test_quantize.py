"""Recipes, plans and quantized packages."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from gemma4_onnx import tolerances
from gemma4_onnx.errors import UsageError
from gemma4_onnx.exporter.geometry import text_geometry
from gemma4_onnx.exporter.package import PLE_TABLE
from gemma4_onnx.exporter.variants import variant_config
from gemma4_onnx.graphs.external_data import PAGE, external_entries
from gemma4_onnx.parity_run import run_parity
from gemma4_onnx.quantize.apply import ple_bytes
from gemma4_onnx.quantize.job import quantize_package
from gemma4_onnx.quantize.plan import resolve
from gemma4_onnx.quantize.recipe import BUILTIN, Decision, load_recipe, parse_recipe
from gemma4_onnx.runtime.text_model import TextModel

from support import TRAINED_FIXTURES

LAYER0 = "model.language_model.layers.0."
AUTO_BUDGET = 4.9  # the int4 gate's bit limit: auto is held to the int4 gates on the trained fixtures
# The tiny variants' K/V projections (int8 in the base rules) weigh so much that the rules alone exceed 4.9.
TINY_AUTO_BUDGET = 6.0
SHAPES = {
    LAYER0 + "self_attn.q_proj.weight": (64, 64),
    LAYER0 + "mlp.up_proj.weight": (128, 64),
    "model.language_model.layers.4.mlp.up_proj.weight": (128, 64),
    "model.language_model.layers.7.mlp.up_proj.weight": (256, 64),
    LAYER0 + "input_layernorm.weight": (64,),
    "model.language_model.embed_tokens.weight": (320, 64),
}


def plan_of(text: str) -> dict[str, dict]:
    recipe = parse_recipe("test", text)
    entries = resolve(recipe, SHAPES, text_geometry(variant_config("tiny-e2b")))
    return {e.candidate.name: {**e.decision.as_dict(), "rule": e.rule} for e in entries}


def test_first_matching_rule_decides_and_default_covers_the_rest() -> None:
    plan = plan_of('''
[default]
bits = 4
[[rules]]
name = "full layers at 8"
match = "up_proj"
layer_types = ["full"]
bits = 8
[[rules]]
name = "shared layers float"
match = "mlp"
layer_types = ["shared"]
bits = "float"
[[rules]]
name = "layer 0 block 64"
match = 'layers\\.0\\.'
layers = "0"
block_size = 64
''')
    assert plan["model.language_model.layers.4.mlp.up_proj.weight"]["bits"] == 8  # layer 4 is full
    assert plan["model.language_model.layers.7.mlp.up_proj.weight"] == {"bits": "float", "rule": "shared layers float"}
    assert plan[LAYER0 + "self_attn.q_proj.weight"]["block_size"] == 64
    assert plan["model.language_model.embed_tokens.weight"]["rule"] == "default"
    assert LAYER0 + "input_layernorm.weight" not in plan  # norms are never candidates


@pytest.mark.parametrize(("text", "message"), [
    ("colour = 1", "unknown key"),
    ("[default]\nbits = 3", "bits must be 4, 8"),
    ("[default]\nblock_size = 48", "block_size must be one of"),
    ("[default]\nalgorithm = 'gptq9'", "algorithm must be one of"),
    ("[default]\nactivations = 'int4'", "activations must be"),
    ("[[rules]]\nname = 'r'\nmatch = '('", "rule 'r': bad regular expression"),
    ("[[rules]]\nname = 'r'\nmatch = 'x'\nwhatever = 1", "rule 'r': unknown key"),
    ("[[rules]]\nname = 'r'\nmatch = 'x'\nskip = true\nbits = 8", "cannot be combined"),
    ("[[rules]]\nname = 'r'\nmatch = 'x'\nlayers = '3-1'", "layers must be like"),
    ("[[rules]]\nname = 'nothing'\nmatch = 'no_such_tensor'", "rule 'nothing' matches no tensor"),
    ("not toml [", "not valid TOML"),
])
def test_bad_recipes_are_refused_naming_the_rule(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        plan_of(text)


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_recipes_parse(name: str) -> None:
    assert load_recipe(name, budget_bits=AUTO_BUDGET if name == "auto" else None).default.bits in (4, 8)


def test_auto_needs_a_budget_and_budgets_must_be_bits() -> None:
    with pytest.raises(UsageError, match="auto needs --budget-bits"):
        load_recipe("auto")
    with pytest.raises(UsageError, match="--budget-bits: must be a number of bits"):
        load_recipe("auto", budget_bits=-1)
    with pytest.raises(UsageError, match="budget_bits: must be a number of bits"):
        parse_recipe("test", "budget_bits = 'lots'")


@pytest.fixture(scope="module")
def packages(exported, tmp_path_factory):
    """(source, recipe) → (checkpoint dir, quantized package dir), quantizing the session's fp32 export."""
    root = tmp_path_factory.mktemp("quantized")
    made: dict[tuple[str, str], tuple[Path, Path]] = {}

    def get(source: str, recipe: str) -> tuple[Path, Path]:
        if (source, recipe) not in made:
            checkpoint, fp32 = exported(source)
            budget = (AUTO_BUDGET if source in TRAINED_FIXTURES else TINY_AUTO_BUDGET) if recipe == "auto" else None
            made[source, recipe] = checkpoint, quantize_package(fp32, root / f"{source}-{recipe}", recipe,
                                                                budget_bits=budget)
        return made[source, recipe]

    return get


# tiny-e2b and tiny-26b-a4b cover every layer kind in make test (PLE, KV sharing, K=V, MoE); the other two
# families run in make test-slow.
TINY_VARIANTS = ["tiny-e2b", "tiny-26b-a4b", pytest.param("tiny-e4b", marks=pytest.mark.slow),
                 pytest.param("tiny-31b", marks=pytest.mark.slow)]


@pytest.mark.parametrize("source", TINY_VARIANTS)
@pytest.mark.parametrize("recipe", BUILTIN)
def test_every_recipe_runs_on_tiny_variants(source: str, recipe: str, packages) -> None:
    _, package = packages(source, recipe)
    model = TextModel(package)
    logits = model.forward([[2, 10, 11, 12, 13]], model.empty_cache(1))
    assert logits.shape == (1, 5, 320) and abs(logits).max() > 0
    manifest = json.loads((package / "manifest.json").read_text())
    assert manifest["quantization"]["recipe"] == recipe
    decoder = onnx.load(package / "decoder.onnx", load_external_data=False)
    assert any(n.op_type == "MatMulNBits" for n in decoder.graph.node)
    plan = json.loads(next(p.value for p in decoder.metadata_props if p.key == "gemma4_onnx.quantization_plan"))
    assert plan["recipe"] == recipe and plan["plan"] == manifest["quantization"]["plan"]
    if recipe == "auto":  # the budget was measured and spent: some tensors moved to int8, within it
        quantization = manifest["quantization"]
        assert quantization["sensitivity"] and quantization["avg_bits_per_linear_weight"] <= TINY_AUTO_BUDGET
        assert any(e["rule"].startswith("budget") and e["bits"] == 8 for e in quantization["plan"])
    moe = [n for n in decoder.graph.node if n.op_type == "TopKMoE"]
    assert bool(moe) == (source == "tiny-26b-a4b")
    assert all(n.overload == "nbits" for n in moe)  # every built-in recipe quantizes the experts
    moe_functions = {(f.name, f.overload) for f in decoder.functions if f.name == "TopKMoE"}
    assert moe_functions == ({("TopKMoE", "nbits")} if moe else set())


@pytest.mark.parametrize(("recipe", "bits"), [("int8", 8), ("int4-mobile", 4)])
def test_quantized_ple_data_holds_only_the_quantized_ple_table(recipe: str, bits: int, packages) -> None:
    _, package = packages("tiny-e2b", recipe)
    in_ple, payload = set(), 0
    for graph in package.rglob("*.onnx"):
        for tensor in onnx.load(graph, load_external_data=False).graph.initializer:
            if external_entries(tensor).get("location", "").endswith("ple.data") and tensor.name not in in_ple:
                in_ple.add(tensor.name)
                payload += int(external_entries(tensor)["length"])
    assert in_ple == {f"{PLE_TABLE}.q{bits}", f"{PLE_TABLE}.scales", f"{PLE_TABLE}.zero_points"}
    geometry = text_geometry(variant_config("tiny-e2b"))
    planned = next(e for e in json.loads((package / "manifest.json").read_text())["quantization"]["plan"]
                   if e["tensor"] == PLE_TABLE)
    decision = Decision(**{k: planned[k] for k in ("bits", "block_size", "symmetric", "algorithm")})
    assert decision.bits == bits
    expected = ple_bytes(geometry.ple_vocab_size, geometry.num_layers, geometry.ple_dim, decision)
    assert payload == expected  # the formula the README's E2B/E4B sizes come from
    assert payload <= (package / "ple.data").stat().st_size <= payload + 3 * PAGE  # alignment padding only


def test_quantizing_a_quantized_package_is_refused(packages, tmp_path: Path) -> None:
    _, package = packages("tiny-31b", "int8")
    with pytest.raises(UsageError, match="already quantized"):
        quantize_package(package, tmp_path / "twice", "int4")


# Quality gates on the trained fixtures (measured on their eval.txt against the float package).
GATES = tolerances.QUANT_GATES  # int4-mobile is held to the int4 gates


@pytest.mark.long
@pytest.mark.parametrize("source", TRAINED_FIXTURES)
@pytest.mark.parametrize("recipe", ["int8", "int4", "int4-mobile", "auto"])
def test_quality_gates_on_trained_fixtures(source: str, recipe: str, packages) -> None:
    checkpoint, package = packages(source, recipe)
    result = run_parity(package, checkpoint, checkpoint / "eval.txt", steps=4)
    text = result["text"]
    assert result["size"]["avg_bits_per_linear_weight"] > 0
    gate = GATES["int8" if recipe == "int8" else "int4"]
    assert text["kl_mean"] <= gate["kl_mean"]
    assert text["top1_agreement"] >= gate["top1_agreement"]
    if "bits_per_byte_increase" in gate:
        assert text["bits_per_byte_onnx"] <= text["bits_per_byte_reference"] * (1 + gate["bits_per_byte_increase"])
        assert result["size"]["avg_bits_per_linear_weight"] <= gate["avg_bits_per_linear_weight"]


def test_budget_goes_to_the_most_harmful_tensors_per_extra_bit() -> None:
    from gemma4_onnx.quantize.blockwise import average_bits
    from gemma4_onnx.quantize.budget import spend
    from gemma4_onnx.quantize.plan import Candidate, Entry
    from gemma4_onnx.quantize.recipe import Decision

    int4 = Decision(bits=4, block_size=32, symmetric=False, algorithm="gptq")
    sizes = {"a": 1000, "b": 1000, "c": 4000, "d": 1000}
    plan = [Entry(Candidate(n, "linear", (s, 32), 0), int4, "default") for n, s in sizes.items()]
    # per extra bit: c is the most harmful in total but the least per weight
    sensitivity = {"a": 1e-3, "b": 3e-3, "c": 2e-3, "d": 1e-5}
    floor = average_bits(plan)
    one_small = floor + (8 - 4 + 4 / 32) * 1000 / 7000  # room for exactly one 1000-weight tensor at int8
    chosen = spend(plan, sensitivity, one_small + 1e-9)
    assert [e.candidate.name for e in chosen if e.decision.bits == 8] == ["b"]
    assert "block error 3.00e-03" in next(e.rule for e in chosen if e.candidate.name == "b")
    two = spend(plan, sensitivity, floor + 2 * (one_small - floor) + 1e-9)
    assert {e.candidate.name for e in two if e.decision.bits == 8} == {"a", "b"}
    assert average_bits(two) <= floor + 2 * (one_small - floor) + 1e-9
    assert spend(plan, sensitivity, floor) == plan
    with pytest.raises(UsageError, match="below this recipe's own"):
        spend(plan, sensitivity, floor - 0.1)
    assert spend(plan, sensitivity, floor - 0.1, asked=False) == plan  # a recipe's own budget buys nothing


@pytest.mark.parametrize("recipe", ["int8", "int4"])
def test_encoder_towers_are_quantized_to_int8_and_keep_their_soft_tokens(recipe: str, packages, exported) -> None:
    from gemma4_onnx.multimodal_parity import synthetic_clip, synthetic_image
    from gemma4_onnx.runtime.image_processing import image_patches
    from gemma4_onnx.runtime.multimodal import MultimodalModel
    from gemma4_onnx.runtime.parity import block_parity

    _, package = packages("tiny-e2b", recipe)
    plan = json.loads((package / "manifest.json").read_text())["quantization"]["plan"]
    towers = [e for e in plan if e["kind"] in ("vision", "audio")]
    assert {e["kind"] for e in towers} == {"vision", "audio"} and all(e["bits"] == 8 for e in towers)
    for graph in ("vision_encoder.onnx", "audio_encoder.onnx"):
        assert any(n.op_type == "MatMulNBits" for n in onnx.load(package / graph, load_external_data=False).graph.node)
    quantized, fp32 = MultimodalModel(package), MultimodalModel(exported("tiny-e2b")[1])
    entry = fp32.graphs["vision_encoder"]
    patches = image_patches(synthetic_image(), 70, entry["patch_size"], entry["pooling_kernel_size"])
    clip = synthetic_clip()
    for name, ours, reference in [("vision", quantized.image_soft_tokens(patches), fp32.image_soft_tokens(patches)),
                                  ("audio", quantized.audio_soft_tokens(clip), fp32.audio_soft_tokens(clip))]:
        assert block_parity(name, reference, ours)["cosine"] >= tolerances.SOFT_TOKEN_INT8_MIN_COSINE, name


def _accuracy_levels(package: Path) -> dict[str, int]:
    levels: dict[str, int] = {}
    for node in onnx.load(package / "decoder.onnx", load_external_data=False).graph.node:
        if node.op_type == "MatMulNBits":
            attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            levels[node.input[1]] = attributes["accuracy_level"]
    return levels


def test_int8_activations_select_the_integer_kernel_only_where_the_recipe_says(packages, exported, tmp_path) -> None:
    _, package = packages("tiny-e2b", "int4")
    levels = _accuracy_levels(package)
    assert any(".q_proj." in name for name in levels) and set(levels.values()) == {4}  # the built-in int4
    _, fp32 = exported("tiny-e2b")
    recipe = tmp_path / "q_only.toml"
    recipe.write_text('[default]\nbits = 4\n[[rules]]\nmatch = "q_proj"\nactivations = "int8"\n')
    levels = _accuracy_levels(quantize_package(fp32, tmp_path / "q_only", str(recipe)))
    assert {levels[name] for name in levels if ".q_proj." in name} == {4}
    assert {levels[name] for name in levels if ".q_proj." not in name} == {1}
    recipe = tmp_path / "experts.toml"
    recipe.write_text('[default]\nbits = 4\nactivations = "int8"\n[[rules]]\nmatch = "router"\nbits = "float"\n')
    _, fp32 = exported("tiny-26b-a4b")
    with pytest.raises(UsageError, match="not to MoE experts"):
        quantize_package(fp32, tmp_path / "out", str(recipe))
    assert not (tmp_path / "out").exists()


def _reference_gptq(w: np.ndarray, h: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """The GPTQ reference's loop in float64, one column at a time with U = chol(H⁻¹)ᵀ: (codes, dequantized)."""
    import torch

    from gemma4_onnx.quantize import gptq

    k = w.shape[1]
    diagonal = np.diagonal(h).copy()
    dead = diagonal == 0
    diagonal[dead] = 1.0
    damped = h.astype(np.float64)
    damped[np.arange(k), np.arange(k)] = diagonal + gptq.DAMPING * diagonal.mean()
    u = np.linalg.cholesky(np.linalg.inv(damped)).T
    w = np.where(dead, 0.0, w).astype(np.float64)
    codes, dequantized, top = np.zeros(w.shape, np.int64), np.zeros_like(w), (1 << bits) - 1
    for j in range(k):
        if j % block == 0:
            scale_t, zero_t = gptq._group_params(torch.from_numpy(w[:, j:j + block].astype(np.float32)), top, False)
            scale, zero = scale_t.double().numpy(), zero_t.double().numpy()
        codes[:, j] = np.clip(np.round(w[:, j] / scale) + zero, 0, top)
        dequantized[:, j] = (codes[:, j] - zero) * scale
        w[:, j:] -= np.outer((w[:, j] - dequantized[:, j]) / u[j, j], u[j, j:])
    return codes, dequantized


@pytest.mark.parametrize("symmetric", [False, True], ids=["asymmetric", "symmetric"])
def test_range_search_keeps_the_first_least_error_shrink(symmetric: bool) -> None:
    """The batched search against a scan over the shrink factors, row by row, in float64."""
    import torch

    from gemma4_onnx.quantize import gptq

    rng = np.random.default_rng(3)
    columns = rng.standard_normal((2, 40, 32)) * rng.uniform(0.5, 2, (2, 40, 1))
    columns[0, 0, 5] = 9.0  # an outlier worth clipping
    top = 15
    scale_t, zero_t = gptq._group_params(torch.from_numpy(np.swapaxes(columns, -1, -2).astype(np.float32))
                                         .transpose(-1, -2), top, symmetric)
    for row in np.ndindex(columns.shape[:-1]):
        w = columns[row].astype(np.float32).astype(np.float64)
        best, chosen = np.inf, None
        for shrink in gptq.SHRINK_GRID.astype(np.float32):
            low, high = min(w.min(), 0) * shrink, max(w.max(), 0) * shrink
            if symmetric:
                high = max(-low, high)
                scale, zero = 2 * high / top, (top + 1) // 2
            else:
                scale = (high - low) / top
                zero = np.round(-low / scale)
            codes = np.clip(np.round(w / scale) + zero, 0, top)
            error = np.sum(np.abs((codes - zero) * scale - w) ** gptq.ERROR_NORM)
            if error < best * (1 - 1e-6):
                best, chosen = error, (scale, zero)
        assert chosen is not None
        assert scale_t[row].item() == pytest.approx(chosen[0], rel=1e-5) and zero_t[row].item() == chosen[1]


@pytest.mark.parametrize("symmetric", [False, True], ids=["asymmetric", "symmetric"])
def test_sensitivity_rounding_is_the_kernels_round_trip(symmetric: bool) -> None:
    """``fake_quantized`` (torch, in place) equals onnxruntime's 4-bit kernel then dequantization, expert by
    expert, with K not a multiple of the block."""
    from gemma4_onnx.quantize.blockwise import blockwise
    from gemma4_onnx.quantize.experts import dequantize
    from gemma4_onnx.quantize.plan import Candidate, Entry
    from gemma4_onnx.quantize.sensitivity import fake_quantized

    weight = np.random.default_rng(4).standard_normal((3, 24, 200)).astype(np.float32)
    decision = Decision(bits=8, block_size=32, symmetric=symmetric, algorithm="gptq")
    entry = Entry(Candidate("experts", "experts", weight.shape, 0), decision, "test")
    rtn = Decision(bits=4, block_size=32, symmetric=symmetric, algorithm="rtn")
    expected = np.stack([dequantize(*blockwise(m, rtn), bits=4, k=200) for m in weight])
    np.testing.assert_allclose(fake_quantized(weight, entry), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asymmetric", "symmetric"])
def test_small_block_rounding_is_the_kernels(bits: int, symmetric: bool) -> None:
    """Blocks below the kernel's minimum are rounded by the kernel's rule: at a size both take, the same
    packed codes, scales and zero points."""
    from gemma4_onnx.quantize.blockwise import _rtn_any_block, blockwise

    weight = np.random.default_rng(5).standard_normal((12, 64)).astype(np.float32)
    weight[0, :16] = 0.0  # an all-zero block: scale 0
    decision = Decision(bits=bits, block_size=16, symmetric=symmetric, algorithm="rtn")
    for ours, kernels in zip(_rtn_any_block(weight, decision), blockwise(weight, decision), strict=True):
        np.testing.assert_array_equal(ours, kernels)


@pytest.mark.parametrize("experts,k", [(None, 160), (3, 96), (None, 150)], ids=["one", "experts", "padded"])
def test_gptq_equals_the_reference_loop(experts: int | None, k: int) -> None:
    """Our GPTQ (R-only updates, recursive blocking, float32) against the reference loop (float64, explicit
    U): the same codes but for rounding ties, and the same output error Σ over calibration rows."""
    from gemma4_onnx.quantize.gptq import gptq

    rng = np.random.default_rng(1)
    n, rows, block = 48, 600, 32
    batch = experts or 1
    x = rng.standard_normal((batch, rows, k)) * rng.uniform(0.1, 3, k)
    x[..., 7] = 0  # a column no calibration row reaches
    h = np.swapaxes(x, -1, -2) @ x
    w = rng.standard_normal((batch, n, k))
    got = gptq(w if experts else w[0], h if experts else h[0], 4, block, False)
    codes, scales, zeros = (a.reshape(batch, *a.shape[-2:]) for a in got)
    pad = -k % block  # zero columns, as MatMulNBits pads
    for e in range(batch):
        ref_codes, ref_dequantized = _reference_gptq(np.pad(w[e], [(0, 0), (0, pad)]), np.pad(h[e], [(0, pad)] * 2),
                                                     4, block)
        assert np.mean(codes[e] == ref_codes) >= 0.99
        ours = (codes[e] - np.repeat(zeros[e], block, axis=1)) * np.repeat(scales[e], block, axis=1)
        error = [np.linalg.norm((w[e] - dq[:, :k]) @ x[e].T) for dq in (ours, ref_dequantized)]
        assert error[0] <= 1.01 * error[1]


def test_gptq_spends_only_a_writable_float32_hessian() -> None:
    """A writable float32 H is factorized in its own memory; a float64 or read-only H is left as it was, and
    every path gives the same codes, also chunk by chunk with the factor reused (a dead column included)."""
    from gemma4_onnx.quantize.gptq import gptq, reused_factors

    rng = np.random.default_rng(5)
    x = rng.standard_normal((300, 96))
    x[:, 3] = 0
    h64 = x.T @ x
    w = rng.standard_normal((40, 96))
    expected = gptq(w, h64, 4, 32, False)[0]
    assert np.array_equal(h64, x.T @ x)
    kept = h64.astype(np.float32)
    kept.flags.writeable = False
    assert np.array_equal(gptq(w, kept, 4, 32, False)[0], expected)
    assert np.array_equal(kept, h64.astype(np.float32))
    spent = h64.astype(np.float32)
    with reused_factors():
        chunks = [gptq(w[rows], spent, 4, 32, False)[0] for rows in (slice(0, 25), slice(25, 40))]
    assert np.array_equal(np.concatenate(chunks), expected)
    assert not np.array_equal(spent, h64.astype(np.float32))


def test_expert_statistics_are_the_routed_weighted_sums_per_expert(monkeypatch) -> None:
    import torch

    from gemma4_onnx.graphs.topk_moe import route
    from gemma4_onnx.quantize import calibration
    from gemma4_onnx.quantize.calibration import ExpertStatistics, gelu_tanh

    monkeypatch.setattr(calibration, "FEW_ROUTED_DAMPING", 0.0)  # the plain sums (few-token damping: test_quant_levers)

    rng = np.random.default_rng(0)
    experts, hidden, inner, top_k = 6, 16, 8, 2
    names = ["r", "z", "scale", "proj", "per_expert", "gate_up", "down"]
    node = onnx.helper.make_node("TopKMoE", names, ["y"], domain="ai.gemma4", top_k=top_k, eps=1e-6)
    arrays = {k: v.astype(np.float32) for k, v in {
        "scale": rng.uniform(0.5, 1.5, hidden), "proj": rng.standard_normal((experts, hidden)),
        "per_expert": rng.uniform(0.5, 1.5, experts), "gate_up": rng.standard_normal((experts, 2 * inner, hidden)),
        "down": rng.standard_normal((experts, hidden, inner))}.items()}
    statistics = ExpertStatistics(node, arrays)
    windows = [rng.standard_normal((1, 5, hidden)).astype(np.float32) for _ in range(2 * 2)]
    for r, z in zip(windows[::2], windows[1::2], strict=True):
        statistics.add(r, z)
    expected = {"gate_up": np.zeros((experts, hidden, hidden)), "down": np.zeros((experts, inner, inner))}
    scale, proj, per_expert = (torch.from_numpy(arrays[k]) for k in ("scale", "proj", "per_expert"))
    for r, z in zip(windows[::2], windows[1::2], strict=True):
        weights, index = (t.numpy() for t in route(torch.from_numpy(r[0]), scale, proj, per_expert, top_k, 1e-6))
        for token, slot in np.ndindex(index.shape):
            e, w, x = index[token, slot], float(weights[token, slot]), z[0, token].astype(np.float64)
            gate, up = np.split(arrays["gate_up"][e].astype(np.float64) @ x, 2)
            a = gelu_tanh(gate) * up
            expected["gate_up"][e] += w * w * np.outer(x, x)
            expected["down"][e] += w * w * np.outer(a, a)
    hessians = statistics.hessians()
    for name in ("gate_up", "down"):
        reached = hessians[name].reached
        assert reached == [e for e in range(experts) if np.trace(expected[name][e]) > 0]
        got = hessians[name][reached]
        assert np.abs(got - expected[name][reached]).max() <= 1e-5 * np.abs(expected[name]).max(), name


@pytest.mark.parametrize("k", [300, 2 * 1024 + 333], ids=["whole", "upper panels mirrored"])
def test_gram_sums_are_x_transpose_x(k: int) -> None:
    from gemma4_onnx.quantize.calibration import GramSums

    rng = np.random.default_rng(2)
    windows = [rng.standard_normal((1, 40, k)).astype(np.float32) for _ in range(3)]
    gram = GramSums()
    for x in windows:
        gram.add("x", x)
    rows = np.concatenate([x[0] for x in windows]).astype(np.float64)
    expected = rows.T @ rows
    assert np.abs(gram.result()["x"] - expected).max() <= 1e-5 * np.abs(expected).max()
