"""lower_ort: the exported ai.gemma4 graphs with PRoPE (both layouts) → com.microsoft.RotaryEmbedding
and KEqVAttention:kv → com.microsoft.GroupQueryAttention, against transformers (same cases as the op
tests, fp32); keqv / reuse stay functions, nested PRoPE included, with the reason recorded."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from transformers.models.gemma4.modeling_gemma4 import apply_rotary_pos_emb

from gemma4_onnx.graphs import domain
from gemma4_onnx.graphs.domain import ORT_CONTRIB_DOMAIN
from gemma4_onnx.graphs.lower_ort import LowerToOrtPass

from op_harness import (
    CASES,
    FULL,
    LAYER_TYPES,
    ROPE,
    SLIDING,
    Exported,
    assert_close,
    exported_attention,
    exported_prope,
    op_inputs,
    positions,
    register_report,
    rotary,
    transformers_run,
)

OP = "lower_ort"


@pytest.fixture(scope="module", autouse=True)
def _report(request: pytest.FixtureRequest) -> None:
    register_report(request.config)


class Lowered:
    """An exported op graph after LowerToOrtPass, loaded in onnxruntime."""

    def __init__(self, graph: Exported) -> None:
        model = ir.from_proto(graph.model)
        self.lowering = LowerToOrtPass()
        self.lowering(model)
        self.model: onnx.ModelProto = ir.to_proto(model)
        self.session = ort.InferenceSession(self.model.SerializeToString(), providers=["CPUExecutionProvider"])
        self.input_names = graph.input_names

    def op_types(self) -> set[tuple[str, str]]:
        return {(n.domain, n.op_type) for n in self.model.graph.node}

    def run(self, **feeds: torch.Tensor) -> list:
        return self.session.run(None, {name: feeds[name].numpy() for name in self.input_names})


@functools.cache
def lowered_rope(theta: float, fraction: float, head_dim: int, head_axis: int = 2) -> Lowered:
    return Lowered(exported_prope(theta, fraction, head_dim, head_axis))


@functools.cache
def lowered_attention(geometry: str, layer: int) -> Lowered:
    return Lowered(exported_attention(geometry, layer))


def test_no_tensor_grows_with_the_context() -> None:
    """The cos/sin rows are computed for the positions of each call: the lowered graph holds no table."""
    lowered = lowered_attention("real", 1)
    largest = max((int(np.prod(t.dims)) for t in lowered.model.graph.initializer), default=0)
    constants = [a.t for n in lowered.model.graph.node if n.op_type == "Constant" for a in n.attribute]
    assert max([largest, *(int(np.prod(t.dims)) for t in constants)]) <= 512


ROPE_CASES = [
    (dims, starts, n)
    for dims in ((16, 32), (256, 512))
    for starts, n in (([0], 7), ([123_457], 1), ([0, 100_003], 5), ([9, 3000], 4))
]


@pytest.mark.parametrize("head_axis", [2, 1], ids=["bsnd", "bnsd"])
@pytest.mark.parametrize("layer_type", [SLIDING, FULL])
@pytest.mark.parametrize(("dims", "starts", "length"), ROPE_CASES, ids=[f"{d[0]}-{s}-{n}" for d, s, n in ROPE_CASES])
def test_prope_lowered_to_rotary_embedding(
    layer_type: str, dims: tuple[int, int], starts: list, length: int, head_axis: int
) -> None:
    head_dim = dims[0] if layer_type == SLIDING else dims[1]
    theta, fraction = ROPE[layer_type]
    lowered = lowered_rope(theta, fraction, head_dim, head_axis)
    assert lowered.lowering.lowered == {"PRoPE": 1}
    assert (ORT_CONTRIB_DOMAIN, "RotaryEmbedding") in lowered.op_types()
    assert not any(d == domain.DOMAIN for d, _ in lowered.op_types())
    assert not lowered.model.functions

    x = torch.randn(len(starts), length, 3, head_dim, generator=torch.Generator().manual_seed(length))
    position_ids = positions(starts, length)
    cos, sin = rotary(*dims)(x, position_ids, layer_type)
    expected = apply_rotary_pos_emb(x, cos, sin, unsqueeze_dim=2)
    if head_axis == 1:
        x, expected = x.transpose(1, 2).contiguous(), expected.transpose(1, 2)
    (actual,) = lowered.run(x=x, position_ids=position_ids)
    assert_close(OP, "RotaryEmbedding vs transformers", actual, expected)


KV_CASES = [(g, s) for g, s in CASES if g in ("tiny", "real")]
KV_CASES += [("real", "decode-below-window"), ("real", "decode-at-window")]


@pytest.mark.parametrize("layer", [0, 1], ids=["sliding", "full"])
@pytest.mark.parametrize(("geometry", "scenario"), KV_CASES, ids=[f"{g}-{s}" for g, s in KV_CASES])
def test_kv_attention_lowered_to_group_query_attention(geometry: str, scenario: str, layer: int) -> None:
    lowered = lowered_attention(geometry, layer)
    assert lowered.lowering.lowered == {"KEqVAttention:kv": 1}
    assert (ORT_CONTRIB_DOMAIN, "GroupQueryAttention") in lowered.op_types()
    assert not any(d == domain.DOMAIN for d, _ in lowered.op_types())
    assert not lowered.model.functions  # the nested PRoPE went with the node

    run = transformers_run(geometry, scenario)
    outputs = lowered.run(**op_inputs(geometry, scenario, layer))
    present_key, present_value = run["present"][layer]
    key_states, value_states = run["shared"][LAYER_TYPES[layer]]
    expected = [run["output"][layer], present_key, present_value, key_states, value_states]
    for actual, want in zip(outputs, expected, strict=True):
        assert_close(OP, "GroupQueryAttention vs transformers", actual, want)


@pytest.mark.parametrize(("geometry", "layer", "reason"), [("tiny-keqv", 1, "K=V"), ("tiny", 2, "KV-shared")])
def test_keqv_and_reuse_stay_functions(geometry: str, layer: int, reason: str) -> None:
    lowered = lowered_attention(geometry, layer)
    assert lowered.lowering.lowered == {}
    assert len(lowered.lowering.skipped) == 1 and reason in lowered.lowering.skipped[0][1]
    assert (domain.DOMAIN, "KEqVAttention") in lowered.op_types()
    kept = {(f.domain, f.name) for f in lowered.model.functions}
    assert kept == {(domain.DOMAIN, "KEqVAttention"), (domain.DOMAIN, "PRoPE")}  # PRoPE: called inside
    run = transformers_run(geometry, "decode-beyond-window-batch2-pos1e5")
    (output, *_) = lowered.run(**op_inputs(geometry, "decode-beyond-window-batch2-pos1e5", layer))
    assert_close(OP, "unlowered function vs transformers", output, run["output"][layer])


@pytest.mark.parametrize("scenario", ["prefill-beyond-window", "decode-beyond-window-batch2-pos1e5"])
def test_image_blocks_attention_lowered_behind_an_if(scenario: str) -> None:
    """kv_image_blocks → If: GroupQueryAttention when no token is in an image (text and decode), the function
    (kept, with its nested PRoPE) when one is; both branches give the function's outputs."""
    graph = exported_attention("tiny", 0, image_blocks=True)
    lowered = Lowered(graph)
    assert lowered.lowering.lowered == {"KEqVAttention:kv_image_blocks": 1}
    assert ("", "If") in lowered.op_types()
    inputs = op_inputs("tiny", scenario, 0)
    batch, length = inputs["position_ids"].shape
    text = torch.full((batch, length), -1)
    image = text.clone()
    image[:, : max(length - 1, 1)] = 0  # decode: the one token is a block of its own
    for blocks in (text, image):
        for actual, want in zip(lowered.run(**inputs, image_blocks=blocks), graph.run(**inputs, image_blocks=blocks),
                                strict=True):
            assert_close(OP, "If(GroupQueryAttention, function) vs function", actual, want)
