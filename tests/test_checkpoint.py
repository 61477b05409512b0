"""Random checkpoints (init-checkpoint) and checked, streaming checkpoint reading."""

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from gemma4_onnx.cli import main
from gemma4_onnx.errors import CheckpointError, ConfigError
from gemma4_onnx.exporter.checkpoint import Checkpoint
from gemma4_onnx.exporter.init_checkpoint import init_checkpoint
from gemma4_onnx.exporter.reference import load_reference_model, load_reference_text_model
from gemma4_onnx.exporter.variants import TINY

from support import TRAINED_FIXTURES, trained_fixture


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("variant", TINY)
def test_random_checkpoint_loads_into_transformers_and_runs(variant: str, tiny_checkpoint) -> None:
    checkpoint = Checkpoint.open(tiny_checkpoint(variant))
    model = load_reference_model(checkpoint)
    logits = model(input_ids=torch.tensor([[2, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]])).logits
    assert logits.shape == (1, 12, 320)
    assert torch.isfinite(logits).all()
    assert 20 < logits.abs().max() < 30  # embeddings ~N(0, 1) drive logits close to the softcap


def test_our_loader_equals_transformers_from_pretrained(tiny_checkpoint) -> None:
    from transformers import Gemma4ForConditionalGeneration

    directory = tiny_checkpoint("tiny-e2b")
    ours = load_reference_model(Checkpoint.open(directory))
    theirs = Gemma4ForConditionalGeneration.from_pretrained(directory, dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    ids = torch.tensor([[2, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]])
    torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["tiny-e2b", "tiny-26b-a4b"])
def test_lean_text_loader_equals_the_full_loader(variant: str, tiny_checkpoint) -> None:
    checkpoint = Checkpoint.open(tiny_checkpoint(variant))
    full, text = load_reference_model(checkpoint), load_reference_text_model(checkpoint, torch.float32)
    assert all(p.is_meta for p in text.model.vision_tower.parameters())  # the towers are never read
    ids = torch.tensor([[2, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]])
    with torch.no_grad():
        torch.testing.assert_close(text(input_ids=ids).logits, full(input_ids=ids).logits, rtol=0, atol=0)


def test_tensors_larger_than_one_read_come_whole(tiny_checkpoint, monkeypatch) -> None:
    import gemma4_onnx.exporter.checkpoint as checkpoint_module

    name = "model.language_model.embed_tokens_per_layer.weight"  # E2B's largest tensor (4.7 GB at full size)
    whole = Checkpoint.open(tiny_checkpoint("tiny-e2b")).tensor(name)
    monkeypatch.setattr(checkpoint_module, "READ_CHUNK_BYTES", 1000)  # as a >2 GiB tensor meets pread's limit
    chunked = Checkpoint.open(tiny_checkpoint("tiny-e2b")).tensor(name)
    assert whole.numel() * whole.element_size() > 10_000
    torch.testing.assert_close(chunked, whole, rtol=0, atol=0)


def test_init_checkpoint_is_deterministic_and_seeded(tmp_path: Path) -> None:
    a = init_checkpoint("tiny-31b", tmp_path / "a", seed=3, max_shard_bytes=200_000)
    b = init_checkpoint("tiny-31b", tmp_path / "b", seed=3, max_shard_bytes=200_000)
    c = init_checkpoint("tiny-31b", tmp_path / "c", seed=4, max_shard_bytes=200_000)
    assert digest(a) == digest(b)
    assert len(list(a.glob("*.safetensors"))) > 1
    assert digest(a)["config.json"] == digest(c)["config.json"]
    shards = sorted(p.name for p in a.glob("*.safetensors"))
    assert all(digest(a)[s] != digest(c)[s] for s in shards)


def test_random_values_follow_the_parity_initialisation(tiny_checkpoint) -> None:
    checkpoint = Checkpoint.open(tiny_checkpoint("tiny-e2b"))
    scalars = torch.stack([checkpoint.tensor(n) for n in checkpoint.entries if n.endswith("layer_scalar")])
    assert scalars.min() >= 0.5 and scalars.max() <= 1.5 and scalars.std() > 0.05
    norm = checkpoint.tensor("model.language_model.layers.0.input_layernorm.weight")
    assert norm.min() >= 0.5 and norm.max() <= 1.5 and norm.std() > 0.1
    clip = [checkpoint.tensor(n).item() for n in checkpoint.entries if n.endswith(("input_min", "output_max"))]
    assert set(clip) == {-3.0, 3.0}
    embed = checkpoint.tensor("model.language_model.embed_tokens.weight")
    assert 0.9 < embed.std() < 1.1


def test_kv_shared_layer_projections_are_written_and_ignored(tiny_checkpoint) -> None:
    checkpoint = Checkpoint.open(tiny_checkpoint("tiny-e2b"))
    assert "model.language_model.layers.9.self_attn.k_proj.weight" in checkpoint.entries  # like the real E2B
    load_reference_model(checkpoint)  # and the loader ignores them, as transformers does


def test_tokenizer_is_byte_level_like_the_fixtures(tiny_checkpoint) -> None:
    tokenizer = Tokenizer.from_file(str(tiny_checkpoint("tiny-e2b") / "tokenizer.json"))
    text = 'def f(x):\n    return "é"\n'
    assert tokenizer.encode(text).ids[:3] == [ord("d") + 3, ord("e") + 3, ord("f") + 3]
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


@pytest.mark.parametrize("fixture", TRAINED_FIXTURES)
def test_trained_fixtures_load_and_run_through_transformers(fixture: str) -> None:
    directory = trained_fixture(fixture)
    model = load_reference_model(Checkpoint.open(directory))
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    prompt = tokenizer.encode("def read_config(path):\n").ids
    out = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)
    continuation = tokenizer.decode(out[0, len(prompt):].tolist())
    assert continuation.startswith("    ")  # an indented body: the fixture learned Python
    assert any(word in continuation for word in ('"""', "with", "open", "return", "if", "="))


# --- bad checkpoints: one clear error naming the problem -------------------------------------------------

def corrupt_copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def first_shard(directory: Path) -> Path:
    return sorted(directory.glob("model-*.safetensors"))[0]


def rewrite_tensor(directory: Path, name: str, value: torch.Tensor | None) -> None:
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    shard = directory / index["weight_map"][name]
    tensors = load_file(shard)
    if value is None:
        del tensors[name]
    else:
        tensors[name] = value
    save_file(tensors, shard)


LAYER0 = "model.language_model.layers.0."


def missing_tensor(d: Path) -> None:
    rewrite_tensor(d, LAYER0 + "mlp.up_proj.weight", None)


def unexpected_tensor(d: Path) -> None:
    rewrite_tensor(d, LAYER0 + "mlp.gate_proj.weight", torch.zeros(128, 64))
    shard = first_shard(d)
    tensors = load_file(shard)
    tensors["model.language_model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    save_file(tensors, shard)


def wrong_shape(d: Path) -> None:
    rewrite_tensor(d, LAYER0 + "mlp.up_proj.weight", torch.zeros(100, 64))


def wrong_dtype(d: Path) -> None:
    rewrite_tensor(d, LAYER0 + "mlp.up_proj.weight", torch.zeros(128, 64, dtype=torch.int32))


def truncated_shard(d: Path) -> None:
    shard = first_shard(d)
    shard.write_bytes(shard.read_bytes()[:-100])


def corrupt_header(d: Path) -> None:
    shard = first_shard(d)
    data = bytearray(shard.read_bytes())
    data[8:16] = b"\xff" * 8
    shard.write_bytes(bytes(data))


def absurd_header_length(d: Path) -> None:
    shard = first_shard(d)
    shard.write_bytes(struct.pack("<Q", 1 << 60) + shard.read_bytes()[8:])


def absent_shard(d: Path) -> None:
    first_shard(d).unlink()


def config_inconsistent(d: Path) -> None:
    config = json.loads((d / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(config))


def no_config(d: Path) -> None:
    (d / "config.json").unlink()


def not_gemma4(d: Path) -> None:
    config = json.loads((d / "config.json").read_text())
    config["model_type"], config["architectures"] = "llama", ["LlamaForCausalLM"]
    (d / "config.json").write_text(json.dumps(config))


def tokenizer_beyond_vocab(d: Path) -> None:
    tokenizer = json.loads((d / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"]["<|extra|>"] = 5000
    (d / "tokenizer.json").write_text(json.dumps(tokenizer))


BAD_CHECKPOINTS = [
    (missing_tensor, CheckpointError, "missing tensor .*mlp.up_proj.weight"),
    (unexpected_tensor, CheckpointError, "unexpected tensor .*mlp.extra.weight"),
    (wrong_shape, CheckpointError, r"up_proj.weight has shape \[100, 64\], but config.json implies \[128, 64\]"),
    (wrong_dtype, CheckpointError, "up_proj.weight has dtype I32"),
    (truncated_shard, CheckpointError, "truncated"),
    (corrupt_header, CheckpointError, "corrupt safetensors header"),
    (absurd_header_length, CheckpointError, "corrupt safetensors header"),
    (absent_shard, CheckpointError, "shard model-00001-of-00001.safetensors named in .* is missing"),
    (config_inconsistent, CheckpointError, "mlp.gate_proj.weight has shape"),
    (no_config, ConfigError, "no config.json"),
    (not_gemma4, ConfigError, "is not Gemma 4"),
    (tokenizer_beyond_vocab, CheckpointError, "tokenizer.json has token id 5000, beyond the model's vocab_size 320"),
]


@pytest.mark.parametrize(("damage", "error", "message"), BAD_CHECKPOINTS, ids=[b[0].__name__ for b in BAD_CHECKPOINTS])
def test_bad_checkpoints_are_refused_with_a_clear_error(damage, error, message, tiny_checkpoint, tmp_path) -> None:
    directory = corrupt_copy(tiny_checkpoint("tiny-e2b"), tmp_path / "bad")
    damage(directory)
    with pytest.raises(error, match=message):
        Checkpoint.open(directory)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_name_the_tensor_and_count(value: float, tiny_checkpoint, tmp_path) -> None:
    directory = corrupt_copy(tiny_checkpoint("tiny-e2b"), tmp_path / "bad")
    weight = torch.zeros(128, 64)
    weight[0, :3] = value
    rewrite_tensor(directory, LAYER0 + "mlp.up_proj.weight", weight)
    checkpoint = Checkpoint.open(directory)
    with pytest.raises(CheckpointError, match=r"mlp.up_proj.weight has 3 non-finite values"):
        checkpoint.tensor(LAYER0 + "mlp.up_proj.weight")


def test_cli_errors_are_one_line_without_traceback(capsys, tmp_path: Path) -> None:
    assert main(["init-checkpoint", "tiny-e2c", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown variant 'tiny-e2c'; did you mean tiny-e2b" in err
    assert "Traceback" not in err
    with pytest.raises(Exception, match="unknown variant"):
        main(["init-checkpoint", "tiny-e2c", str(tmp_path / "x"), "--debug"])


def test_existing_output_is_not_overwritten_without_force(capsys, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["init-checkpoint", "tiny-31b", str(out), "--quiet"]) == 2
    assert "not empty; pass --force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert main(["init-checkpoint", "tiny-31b", str(out), "--quiet", "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging directories left behind
