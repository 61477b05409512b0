"""Deterministic random checkpoints in Hugging Face layout, written shard by shard.

Reference initialisation leaves norms, ``layer_scalar``, router scales at 1 and clip bounds at ±inf,
which lets a wrong exporter pass parity. Values here follow the architecture doc §5.2 instead, so every
path is exercised: norms and scales U(0.5, 1.5), clip bounds ±3, embeddings N(0, 1) (logits near the
softcap), linear weights N(0, 0.08). Each tensor has its own generator seeded from (seed, name), and
large tensors are produced in row chunks, so a full-size E2B (10 GB in bf16, its PLE table alone
4.7 GB) is written with a small, flat memory footprint.
"""

import functools
import json
import math
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from gemma4_onnx.atomic import publish_dir
from gemma4_onnx.exporter.hf_model import STATE_PREFIX, expected_tensors
from gemma4_onnx.exporter.safetensors_io import PlannedTensor, write_streaming
from gemma4_onnx.exporter.tokenizer import write_tokenizer
from gemma4_onnx.exporter.variants import get_variant
from gemma4_onnx.progress import progress

CHUNK_VALUES = 1 << 24  # 16 M values (64 MB in fp32) generated at a time
DEFAULT_SHARD_BYTES = 2 << 30
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def init_rule(name: str) -> tuple[str, float, float]:
    """(distribution, a, b) for a tensor: ("uniform", low, high), ("normal", mean, std) or ("const", v, v)."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("input_min", "output_min"):
        return ("const", -3.0, -3.0)
    if leaf in ("input_max", "output_max"):
        return ("const", 3.0, 3.0)
    if leaf == "std_bias":
        return ("normal", 0.0, 0.5)
    if leaf in ("layer_scalar", "std_scale", "per_expert_scale", "scale") or "norm" in name:
        return ("uniform", 0.5, 1.5)
    if leaf == "per_dim_scale":
        return ("normal", 0.0, 0.5)
    if "embed_tokens" in name or "position_embedding_table" in name:
        return ("normal", 0.0, 1.0)
    return ("normal", 0.0, 0.08)


def tensor_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (1 << 63)


def random_chunks(name: str, shape: tuple[int, ...], seed: int) -> Iterator[torch.Tensor]:
    """The tensor's values in row chunks; the same (seed, name, shape) always gives the same values."""
    kind, a, b = init_rule(name)
    generator = torch.Generator().manual_seed(tensor_seed(seed, name))
    total = math.prod(shape)
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    step = max(1, CHUNK_VALUES // row) * row
    for start in range(0, total, step):
        n = min(step, total - start)
        if kind == "const":
            yield torch.full((n,), a)
        elif kind == "uniform":
            yield torch.rand(n, generator=generator) * (b - a) + a
        else:
            yield torch.randn(n, generator=generator) * b + a


def planned_tensors(config: dict[str, Any], seed: int, dtype: torch.dtype) -> list[PlannedTensor]:
    """Every tensor of the checkpoint, in state-dict order, plus the unused k/v projections of KV-shared
    layers that the released E2B/E4B checkpoints carry (§4.1), so loaders must really ignore them."""
    shapes = {name: shape for name, (shape, _) in expected_tensors(config).items()}
    shapes.update(_shared_layer_extras(config, shapes))
    return [PlannedTensor(name, shape, dtype, functools.partial(random_chunks, name, shape, seed))
            for name, shape in shapes.items()]


def _shared_layer_extras(config: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    from gemma4_onnx.exporter.geometry import text_geometry

    extras = {}
    geometry = text_geometry(config)
    for spec in geometry.layers:
        if spec.kv_mode != "reuse" or spec.kv_producer is None:
            continue
        producer = f"{STATE_PREFIX}layers.{spec.kv_producer}.self_attn."
        mine = f"{STATE_PREFIX}layers.{spec.index}.self_attn."
        for part in ("k_proj.weight", "v_proj.weight", "k_norm.weight"):
            if producer + part in shapes:
                extras[mine + part] = shapes[producer + part]
    return extras


def shard_plan(tensors: list[PlannedTensor], max_bytes: int) -> list[list[PlannedTensor]]:
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        nbytes = math.prod(t.shape) * t.dtype.itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    return shards


def init_checkpoint(variant: str, out_dir: Path, seed: int = 0, dtype: str = "bfloat16",
                    max_shard_bytes: int = DEFAULT_SHARD_BYTES, force: bool = False) -> Path:
    """Write ``variant``'s random checkpoint to ``out_dir``; returns the directory."""
    return init_checkpoint_from_config(get_variant(variant).config, out_dir, seed, dtype, max_shard_bytes, force,
                                       variant=variant)


def init_checkpoint_from_config(config: dict[str, Any], out_dir: Path, seed: int = 0, dtype: str = "bfloat16",
                                max_shard_bytes: int = DEFAULT_SHARD_BYTES, force: bool = False,
                                variant: str | None = None) -> Path:
    """Write a random checkpoint of any geometry (a top-level ``config.json`` as a dict) to ``out_dir``."""
    config = config | {"dtype": dtype}
    tensors = planned_tensors(config, seed, DTYPES[dtype])
    shards = shard_plan(tensors, max_shard_bytes)
    with publish_dir(Path(out_dir), force=force) as staging:
        weight_map: dict[str, str] = {}
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for file, shard in progress(list(zip(names, shards, strict=True)), desc="writing shards", unit="shard"):
            write_streaming(staging / file, shard)
            weight_map.update({t.name: file for t in shard})
        total = sum(math.prod(t.shape) * t.dtype.itemsize for t in tensors)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        text = config["text_config"]
        (staging / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": text["bos_token_id"], "eos_token_id": text["eos_token_id"],
             "pad_token_id": text["pad_token_id"]}, indent=1) + "\n")
        write_tokenizer(staging, text["max_position_embeddings"])
        (staging / "init.json").write_text(json.dumps({"variant": variant, "seed": seed, "dtype": dtype}) + "\n")
    return Path(out_dir)
