"""PRoPE: torch reference vs transformers' Gemma4TextRotaryEmbedding + apply_rotary_pos_emb vs
onnxruntime running the exported ai.gemma4::PRoPE, in fp32."""

from __future__ import annotations

import pytest
import torch
from transformers.models.gemma4.modeling_gemma4 import apply_rotary_pos_emb

from gemma4_onnx.graphs import prope

from op_harness import FULL, ROPE, SLIDING, assert_close, exported_prope, positions, register_report, rotary

OP = "PRoPE"


@pytest.fixture(scope="module", autouse=True)
def _report(request: pytest.FixtureRequest) -> None:
    register_report(request.config)


@pytest.mark.parametrize("layer_type", [SLIDING, FULL])
@pytest.mark.parametrize("dims", [(16, 32), (256, 512)], ids=["tiny", "real"])
def test_inv_freq_is_transformers_buffer(layer_type: str, dims: tuple[int, int]) -> None:
    """The exact float32 frequency table: one ulp off would move angles at 10^5 by ~10^-2 rad."""
    head_dim = dims[0] if layer_type == SLIDING else dims[1]
    theta, fraction = ROPE[layer_type]
    expected = getattr(rotary(*dims), f"{layer_type}_inv_freq")
    assert torch.equal(prope.inv_freq(theta, fraction, head_dim), expected)


@pytest.mark.parametrize("head_axis", [2, 1], ids=["bsnd", "bnsd"])
@pytest.mark.parametrize("layer_type", [SLIDING, FULL])
@pytest.mark.parametrize("dims", [(16, 32), (256, 512)], ids=["tiny", "real"])
@pytest.mark.parametrize(
    ("starts", "length"),
    [([0], 1), ([0], 7), ([123_457], 1), ([0, 100_003], 5), ([262_100, 7], 3)],
    ids=["decode", "prefill", "decode-pos1e5", "batch2-pos1e5", "batch2-pos2.6e5"],
)
def test_three_way(layer_type: str, dims: tuple[int, int], starts: list[int], length: int, head_axis: int) -> None:
    """Both layouts: head_axis 2 on x [B, S, N, D], head_axis 1 on the same x as [B, N, S, D]."""
    head_dim = dims[0] if layer_type == SLIDING else dims[1]
    theta, fraction = ROPE[layer_type]
    generator = torch.Generator().manual_seed(len(starts) * 1000 + length + head_dim)
    x = torch.randn(len(starts), length, 3, head_dim, generator=generator)
    position_ids = positions(starts, length)

    cos, sin = rotary(*dims)(x, position_ids, layer_type)
    expected = apply_rotary_pos_emb(x, cos, sin, unsqueeze_dim=2)
    layout = "bsnd" if head_axis == 2 else "bnsd"
    if head_axis == 1:
        x, expected = x.transpose(1, 2).contiguous(), expected.transpose(1, 2)
    reference = torch.ops.gemma4.prope(x, position_ids, theta, fraction, head_axis)
    assert_close(OP, f"reference vs transformers ({layout})", reference, expected)
    (actual,) = exported_prope(theta, fraction, head_dim, head_axis).run(x=x, position_ids=position_ids)
    assert_close(OP, f"onnxruntime vs transformers ({layout})", actual, expected)


def test_head_axis_is_checked() -> None:
    with pytest.raises(ValueError, match="head_axis"):
        torch.ops.gemma4.prope(torch.zeros(1, 1, 1, 16), positions([0], 1), 1e4, 1.0, 3)


def test_pass_through_dims_of_proportional_rope() -> None:
    """p-RoPE at D = 512 rotates dims 0–63 and 256–319 only; the rest pass through bit for bit."""
    x = torch.randn(1, 4, 2, 512, generator=torch.Generator().manual_seed(3))
    position_ids = positions([100_000], 4)
    y = torch.ops.gemma4.prope(x, position_ids, 1_000_000.0, 0.25)
    (actual,) = exported_prope(1_000_000.0, 0.25, 512).run(x=x, position_ids=position_ids)
    still = torch.cat([torch.arange(64, 256), torch.arange(320, 512)])
    assert torch.equal(y[..., still], x[..., still])
    assert torch.equal(torch.from_numpy(actual)[..., still], x[..., still])
    assert not torch.allclose(y[..., :64], x[..., :64])
