"""KEqVAttention: torch reference vs transformers' Gemma4TextAttention (eager, DynamicCache, KV
sharing) vs onnxruntime running the exported ai.gemma4::KEqVAttention, in fp32.

The cases (op_harness): transformers layers S F S F, the last two KV-shared, a prefill of ``past``
tokens then the step under test. The op is compared on its output (the o_proj input), its present
cache(s) and the K/V it attended with.
"""

from __future__ import annotations

import pytest
import torch

from gemma4_onnx.graphs import domain, keqv_attention

from op_harness import (
    CASES,
    LAYER_TYPES,
    WINDOW,
    assert_close,
    exported_attention,
    op_call,
    op_inputs,
    positions,
    register_report,
    transformers_run,
)

OP = "KEqVAttention"


@pytest.fixture(scope="module", autouse=True)
def _report(request: pytest.FixtureRequest) -> None:
    register_report(request.config)


@pytest.mark.parametrize("layer", [0, 1, 2, 3], ids=["sliding", "full", "sliding-reuse", "full-reuse"])
@pytest.mark.parametrize(("geometry", "scenario"), CASES, ids=[f"{g}-{s}" for g, s in CASES])
def test_three_way(geometry: str, scenario: str, layer: int) -> None:
    mode, attributes = op_call(geometry, layer)
    inputs = op_inputs(geometry, scenario, layer)
    run = transformers_run(geometry, scenario)
    layer_type = LAYER_TYPES[layer]

    reference = keqv_attention.keqv_attention(
        inputs["query"],
        inputs["q_norm_weight"],
        inputs["position_ids"],
        inputs.get("key"),
        inputs.get("value"),
        inputs.get("k_norm_weight"),
        inputs.get("past_key"),
        inputs.get("past_value"),
        mode=mode,
        **attributes,
    )
    onnx_outputs = exported_attention(geometry, layer).run(**inputs)

    expected: dict[int, torch.Tensor] = {0: run["output"][layer]}
    if mode != "reuse":
        present_key, present_value = run["present"][layer]
        key_states, value_states = run["shared"][layer_type]
        expected |= {2: present_value, 3: key_states, 4: value_states}
        if mode == "kv":
            expected[1] = present_key
        else:  # K=V keeps one cache: the values; transformers' cached keys are what the op recomputes
            assert reference[1].numel() == 0
            recomputed = reference[3][:, :, -present_key.shape[2] :]
            assert_close(OP, "K=V recomputed keys vs transformers cache", recomputed, present_key)
    onnx_index = {"kv": [0, 1, 2, 3, 4], "keqv": [0, 2, 3, 4], "reuse": [0]}[mode]
    for slot, want in expected.items():
        assert_close(OP, f"reference vs transformers ({mode})", reference[slot], want)
        assert_close(OP, f"onnxruntime vs transformers ({mode})", onnx_outputs[onnx_index.index(slot)], want)


def test_sliding_cache_is_window_bounded() -> None:
    """After 20 + 4 tokens the sliding layer keeps W − 1 = 7, the full layer all 24; the K/V attended
    with hold everything (past + current)."""
    run = transformers_run("tiny", "chunk-beyond-window-pos1e5")
    inputs = op_inputs("tiny", "chunk-beyond-window-pos1e5", 0)
    outputs = exported_attention("tiny", 0).run(**inputs)
    assert outputs[1].shape[2] == WINDOW - 1 and outputs[3].shape[2] == WINDOW - 1 + 4
    assert run["present"][1][0].shape[2] == 24


IMAGE_BLOCK_CASES = {
    # a 9-token image on a 12-token prefill: longer than the window W = 8, so the window still bounds it
    "prefill-beyond-window": [[-1, 0, 0, 0, 0, 0, 0, 0, 0, 0, -1, 1]],
    # rows at different positions, one image each, and a text-only row
    "prefill-batch2-pos2e5": [[-1, 0, 0, 0, -1, -1], [-1, -1, -1, -1, -1, -1]],
    # a chunk after 20 cached tokens: the blocks of past keys are never needed
    "chunk-beyond-window-pos1e5": [[0, 0, 0, -1]],
}


@pytest.mark.parametrize("scenario", list(IMAGE_BLOCK_CASES))
def test_image_blocks(scenario: str) -> None:
    """The kv_image_blocks overload in onnxruntime vs the torch reference; the image tokens see their own
    block's later tokens (the output changes from the causal one) and text tokens do not."""
    mode, attributes = op_call("tiny", 0)
    inputs = op_inputs("tiny", scenario, 0)
    blocks = torch.tensor(IMAGE_BLOCK_CASES[scenario])
    reference = keqv_attention.keqv_attention(
        inputs["query"], inputs["q_norm_weight"], inputs["position_ids"], inputs["key"], inputs["value"],
        inputs["k_norm_weight"], inputs["past_key"], inputs["past_value"], mode=mode, **attributes,
        image_blocks=blocks,
    )  # fmt: skip
    causal = exported_attention("tiny", 0).run(**inputs)[0]
    onnx_outputs = exported_attention("tiny", 0, image_blocks=True).run(**inputs, image_blocks=blocks)
    for slot in range(5):
        assert_close(OP, "onnxruntime vs reference (image blocks)", onnx_outputs[slot], reference[slot])
    changed = torch.from_numpy(abs(onnx_outputs[0] - causal).max(axis=-1) > 1e-6)
    blocks_ahead = torch.stack([torch.tensor([(row[i] >= 0) and bool((row[i + 1:] == row[i]).any())
                                              for i in range(len(row))]) for row in blocks])
    assert torch.equal(changed, blocks_ahead)


def test_modes_are_checked() -> None:
    query = torch.zeros(1, 1, 64)
    with pytest.raises(ValueError, match="takes exactly"):
        keqv_attention.keqv_attention(
            query, torch.ones(16), positions([0], 1), query, None, None, None, None,
            mode="kv", num_heads=4, num_kv_heads=4, head_dim=16, sliding_window=0,
            rope_theta=1e4, rope_fraction=1.0, eps=1e-6,
        )  # fmt: skip


@pytest.mark.parametrize(("geometry", "layer"), [("tiny", 0), ("tiny", 1), ("tiny-keqv", 1)])
def test_onnxruntime_accepts_zero_length_past(geometry: str, layer: int) -> None:
    """The first prefill feeds [B, KVH, 0, D] caches; onnxruntime runs them (values: test_three_way)."""
    inputs = op_inputs(geometry, "prefill-empty-past", layer)
    assert inputs["past_value"].shape[2] == 0
    outputs = exported_attention(geometry, layer).run(**inputs)
    assert outputs[-1].shape[2] == 5  # value_states: the 5 new tokens


@pytest.mark.parametrize(
    ("geometry", "layer", "head_axes"),
    [("tiny", 0, [2, 2]), ("tiny-keqv", 1, [2, 1]), ("tiny", 2, [2])],
    ids=["kv: q and the new keys", "keqv: q, and the keys over the cache", "reuse: q only"],
)
def test_rope_is_a_nested_prope_node(geometry: str, layer: int, head_axes: list[int]) -> None:
    """Each overload's body calls ai.gemma4::PRoPE (no RoPE math of its own) with the table, theta
    and fraction of the node (attribute references); the model carries the PRoPE function, which
    assert_has_function checked at export and onnxruntime ran in test_three_way."""
    mode, _ = op_call(geometry, layer)
    graph = exported_attention(geometry, layer)
    body = next(f for f in graph.model.functions if f.name == "KEqVAttention" and f.overload == mode)
    calls = [n for n in body.node if n.domain == domain.DOMAIN]
    assert [(n.op_type, n.overload) for n in calls] == [("PRoPE", "")] * len(head_axes)
    for node, head_axis in zip(calls, head_axes, strict=True):
        attributes = {a.name: a for a in node.attribute}
        assert attributes["head_axis"].i == head_axis
        refs = {name: attributes[name].ref_attr_name for name in ("theta", "fraction", "inv_freq")}
        assert refs == {"theta": "rope_theta", "fraction": "rope_fraction", "inv_freq": "rope_inv_freq"}
    assert not {"Sin", "Cos"} & {node.op_type for node in body.node}
    assert (domain.DOMAIN, "PRoPE", "") in {(f.domain, f.name, f.overload) for f in graph.model.functions}
