"""Hostile and malformed checkpoints and configs (issue 22): every one refused by the real CLI with exit 2 and
one line naming the file, the field and the problem, nothing left at OUT, and no file outside the checkpoint
read (``hostile.Sandbox``). Configs and safetensors headers are also fuzzed (hypothesis)."""

import copy
import json
import os
import shutil
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from gemma4_onnx.cli import main
from gemma4_onnx.errors import ConfigError, UsageError
from gemma4_onnx.exporter.config_schema import validate_config
from gemma4_onnx.exporter.geometry import text_geometry
from gemma4_onnx.exporter.variants import REGISTRY, get_variant
from gemma4_onnx.graphs.manifest import FORMAT, MANIFEST

from hostile import FAST, SLOW, Sandbox, no_output, refused
from support import TRAINED_FIXTURES, trained_fixture

BASE = "tiny-e2b"
SHARD = "model-00001-of-00001.safetensors"
INDEX = "model.safetensors.index.json"
DROP = object()


@pytest.fixture
def ckpt(tiny_checkpoint, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_checkpoint(BASE), tmp_path / "ckpt"))


@pytest.fixture
def sandbox(tmp_path: Path) -> Sandbox:
    box = Sandbox(tmp_path / "outside")
    box.add("secret.bin")
    box.add("secret.json", b'{"SECRET-SENTINEL": "do-not-read"}\n')
    return box


@pytest.fixture
def no_model_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refusal that must come from the schema: building transformers' model would be a failure."""
    import gemma4_onnx.exporter.checkpoint as checkpoint_module

    def built(config: Any) -> Any:
        raise AssertionError("the model was built from a config the schema should have refused")

    monkeypatch.setattr(checkpoint_module, "expected_tensors", built)


def export_refused(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], sandbox: Sandbox) -> str:
    out = tmp_path / "out"
    return refused(["export", str(ckpt), str(out), "--quiet"], capsys, out=out, sandbox=sandbox)


def edit_json(path: Path, keys: tuple[str, ...], value: Any) -> None:
    document = json.loads(path.read_text())
    node = document
    for key in keys[:-1]:
        node = node[key]
    if value is DROP:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    path.write_text(json.dumps(document))


# --- config.json: types and ranges ----------------------------------------------------------------------------

T = "text_config"
CONFIG_CASES: list[tuple[tuple[str, ...], Any, str]] = [
    ((T, "num_kv_shared_layers"), "3", "text_config.num_kv_shared_layers: must be an integer, got str '3'"),
    ((T, "num_key_value_heads"), 0, r"text_config.num_key_value_heads: must be in [1, 1024], got 0"),
    ((T, "layer_types"), 5, "text_config.layer_types: must be a list, got int 5"),
    ((T, "rms_norm_eps"), "tiny", "text_config.rms_norm_eps: must be a number, got str 'tiny'"),
    ((T, "rms_norm_eps"), float("nan"), "text_config.rms_norm_eps: must be a number"),
    ((T, "rope_parameters"), [], "text_config.rope_parameters: must be an object, got list"),
    ((T, "rope_parameters", "full_attention", "rope_type"), "yarn",
     "text_config.rope_parameters.full_attention.rope_type: must be one of default, proportional"),
    ((T, "rope_parameters", "sliding_attention", "rope_theta"), -1.0,
     "text_config.rope_parameters.sliding_attention.rope_theta: must be in [1, "),
    ((T, "rope_parameters", "full_attention", "rope_theta"), 1e-300,
     "text_config.rope_parameters.full_attention.rope_theta: must be in [1, "),
    ((T, "final_logit_softcapping"), 1e-300, "text_config.final_logit_softcapping: must be in [0.01, "),
    ((T, "sliding_window"), 0, "text_config.sliding_window: must be in [1, 131072], got 0"),
    ((T, "use_double_wide_mlp"), "true", "text_config.use_double_wide_mlp: must be true or false, got str"),
    ((T, "attention_k_eq_v"), 1, "text_config.attention_k_eq_v: must be true or false, got int"),
    ((T, "vocab_size"), 10**12, "text_config.vocab_size: must be in [1, 4194304], got 1000000000000"),
    ((T, "num_hidden_layers"), 10**9, "text_config.num_hidden_layers: must be in [1, 512]"),
    ((T, "max_position_embeddings"), 10**12, "text_config.max_position_embeddings: must be in"),
    ((T, "hidden_size"), -4, "text_config.hidden_size: must be in [1, 65536], got -4"),
    ((T, "hidden_size"), DROP, "text_config.hidden_size: is missing"),
    ((T, "head_dim"), 15, "text_config.head_dim: must be even (RoPE rotates pairs of dimensions), got 15"),
    ((T, "global_head_dim"), 33, "text_config.global_head_dim: must be even"),
    ((T, "layer_types"), ["sliding_attention"] * 3, "text_config.layer_types: has 3 entries for 10 layers"),
    ((T, "layer_types"), ["sliding_attention"] * 9 + ["global"], "text_config.layer_types[9]: must be one of"),
    ((T, "num_kv_shared_layers"), 10, "text_config.num_kv_shared_layers: must be below num_hidden_layers (10)"),
    ((T, "hidden_size_per_layer_input"), 0, "text_config.num_kv_shared_layers: must be 0 without per-layer embeddings"),
    ((T, "per_layer_config"), {"99": {"head_dim": 32}}, "text_config.per_layer_config: names layer 99"),
    ((T, "per_layer_config"), {"4": {"intermediate_size": 32}}, "text_config.per_layer_config.4.intermediate_size: "
     "is not a known field"),
    ((T, "eos_token_id"), 5000, "text_config.eos_token_id: 5000 is not below vocab_size 320"),
    ((T, "enable_moe_block"), True, "text_config.num_experts: is missing (enable_moe_block is true)"),
    ((T, "tie_word_embeddings"), False, "text_config.tie_word_embeddings: must be true"),
    ((T, "hidden_activation"), "relu6", "text_config.hidden_activation: must be one of gelu_pytorch_tanh"),
    ((T, "use_bidirectional_attention"), "all", "text_config.use_bidirectional_attention: must be one of vision"),
    ((T, "to_dict"), 5, "text_config.to_dict: is not a configuration field"),
    ((T, "_evil\nkey"), 1, r"text_config._evil\nkey: is not a configuration field"),
    ((T, "_experts_implementation"), "grouped_mm", "text_config._experts_implementation: is not a configuration"),
    ((T,), [], "text_config: must be an object, got list"),
    ((T,), DROP, "text_config: is missing"),
    (("num_labels",), 10**9, "num_labels: must be in [1, 1024]"),
    (("dtype",), "save", "dtype: must be one of bfloat16, float16, float32"),
    (("image_token_id",), 400, "image_token_id: 400 is not below text_config.vocab_size 320"),
    (("vision_config", "patch_size"), "4", "vision_config.patch_size: must be an integer, got str '4'"),
    (("vision_config", "head_dim"), 0, "vision_config.head_dim: must be in [2, 1024]"),
    (("vision_config",), 5, "vision_config: must be an object or null, got int"),
    (("audio_config", "subsampling_conv_channels"), [128], "audio_config.subsampling_conv_channels: must have 2 to 2"),
    (("audio_config", "subsampling_conv_channels"), [64, 8],
     "audio_config.subsampling_conv_channels: must start with 128"),
    (("audio_config", "attention_context_left"), 0, "audio_config.attention_context_left: must be in [1, 4096]"),
    (("audio_config", "num_attention_heads"), 3, "audio_config.num_attention_heads: 3 does not divide"),
]


@pytest.mark.parametrize(("keys", "value", "message"), CONFIG_CASES,
                         ids=[".".join(k) + "=" + ("DROP" if v is DROP else repr(v))[:24] for k, v, _ in CONFIG_CASES])
def test_bad_config_fields_are_refused_before_any_model_is_built(keys, value, message, ckpt, tmp_path, capsys,
                                                                  sandbox, no_model_built) -> None:
    import gemma4_onnx.exporter.package  # noqa: F401 (imported before the clock starts, as in a warm session)

    edit_json(ckpt / "config.json", keys, value)
    started = time.perf_counter()
    err = export_refused(ckpt, tmp_path, capsys, sandbox)
    assert time.perf_counter() - started < 2.0  # refused from the schema: nothing allocated, nothing traced
    assert f"{ckpt / 'config.json'}: {message}" in err, err


@pytest.mark.parametrize(("raw", "message"), [
    (b"{", "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    (b"[]", "expected a JSON object"),
    (b'{"model_type": "gemma4", "model_type": "gemma4"}', "key model_type appears twice"),
    (b'{"model_type": "llama\\nSECOND LINE"}', r"model_type 'llama\nSECOND LINE'"),
    (b'{"model_type": "gemma4", "text_config": {"hidden_size": 1e999}}', "text_config"),
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
])
def test_unreadable_configs_are_one_line_errors(raw, message, ckpt, tmp_path, capsys, sandbox, no_model_built) -> None:
    (ckpt / "config.json").write_bytes(raw)
    assert message in export_refused(ckpt, tmp_path, capsys, sandbox)


def test_an_oversized_config_is_not_read_whole(ckpt, tmp_path, capsys, sandbox, monkeypatch) -> None:
    import gemma4_onnx.exporter.checkpoint as checkpoint_module

    monkeypatch.setattr(checkpoint_module, "MAX_JSON_BYTES", 1000)
    assert "more than 1000 bytes" in export_refused(ckpt, tmp_path, capsys, sandbox)


def test_every_variant_and_released_layout_passes_the_schema() -> None:
    from gemma4_onnx.exporter.hf_model import hf_config

    for name in REGISTRY:
        config = get_variant(name).config
        validate_config(config, name)
        resaved = json.loads(hf_config(config).to_json_string())  # transformers' spelling: per_layer_config
        validate_config(resaved, f"{name} re-saved")
        assert text_geometry(resaved) == text_geometry(config)


@pytest.mark.parametrize("fixture", TRAINED_FIXTURES)
def test_the_trained_fixture_configs_pass_the_schema(fixture: str) -> None:
    validate_config(json.loads((trained_fixture(fixture) / "config.json").read_text()), fixture)


@pytest.mark.parametrize("change", [
    {"head_dim": 6, "global_head_dim": 10},  # heads × head_dim ≠ hidden_size, not a power of two
    {"sliding_window": 1},
    {"sliding_window": 100_000},  # beyond max_position_embeddings
    {"num_kv_shared_layers": 0},
    {"hidden_size_per_layer_input": 0, "num_kv_shared_layers": 0},
    {"final_logit_softcapping": None, "rms_norm_eps": 0.5},
])
def test_unusual_values_transformers_runs_are_accepted(change: dict[str, Any]) -> None:
    import torch
    from transformers import Gemma4ForConditionalGeneration

    from gemma4_onnx.exporter.hf_model import hf_config

    config = copy.deepcopy(get_variant(BASE).config)
    config["text_config"].update(change)
    validate_config(config)
    text_geometry(config)
    torch.manual_seed(0)
    model = Gemma4ForConditionalGeneration(hf_config(config)).eval()
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([list(range(3, 23))])).logits).all()


def test_the_geometry_checks_a_manifest_text_config_too() -> None:
    text = copy.deepcopy(get_variant(BASE).config["text_config"]) | {"num_key_value_heads": 0}
    with pytest.raises(ConfigError, match=r"^pkg/manifest.json: text_config.num_key_value_heads: must be in"):
        text_geometry(text, "pkg/manifest.json")


# --- safetensors headers ----------------------------------------------------------------------------------------

def split_shard(shard: Path) -> tuple[dict[str, Any], bytes]:
    data = shard.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def write_shard(shard: Path, header: bytes, body: bytes) -> None:
    header += b" " * (-len(header) % 8)
    shard.write_bytes(struct.pack("<Q", len(header)) + header + body)


def same_size_pair(header: dict[str, Any]) -> tuple[str, str]:
    by_size: dict[int, str] = {}
    for name, info in header.items():
        if name != "__metadata__":
            begin, end = info["data_offsets"]
            if end > begin and (end - begin) in by_size:
                return by_size[end - begin], name
            by_size[end - begin] = name
    raise AssertionError("no two tensors of one size")


def offsets(value: Callable[[int, int], Any]) -> Callable[[dict[str, Any], str, str], None]:
    def mutate(header: dict[str, Any], a: str, b: str) -> None:
        header[a]["data_offsets"] = value(*header[a]["data_offsets"])
    return mutate


def entry_field(key: str, value: Any) -> Callable[[dict[str, Any], str, str], None]:
    def mutate(header: dict[str, Any], a: str, b: str) -> None:
        header[a][key] = value
    return mutate


def overlap(header: dict[str, Any], a: str, b: str) -> None:
    header[b]["data_offsets"] = list(header[a]["data_offsets"])


def whole(value: Any) -> Callable[[dict[str, Any], str, str], Any]:
    return lambda header, a, b: value


HEADER_CASES: list[tuple[str, Callable[[dict[str, Any], str, str], Any], str]] = [
    ("offsets_strings", offsets(lambda b, e: [str(b), str(e)]), "data_offsets ['"),
    ("offsets_floats", offsets(lambda b, e: [float(b), float(e)]), "is not a list of two integers"),
    ("offsets_bools", offsets(lambda b, e: [False, True]), "is not a list of two integers"),
    ("offsets_negative", offsets(lambda b, e: [-8, e - b - 8]), "declares bytes -8.."),
    ("offsets_not_a_list", offsets(lambda b, e: {"begin": b, "end": e}), "is not a list of two integers"),
    ("offsets_three", offsets(lambda b, e: [b, e, e]), "is not a list of two integers"),
    ("offsets_beyond_the_file", offsets(lambda b, e: [b + (1 << 30), e + (1 << 30)]), "truncated: tensor"),
    ("offsets_overlapping", overlap, "overlap (bytes"),
    ("shape_strings", entry_field("shape", ["64"]), "is not a list of at most 8 non-negative integers"),
    ("shape_negative", entry_field("shape", [-64]), "is not a list of at most 8 non-negative integers"),
    ("shape_float", entry_field("shape", [64.0]), "is not a list of at most 8 non-negative integers"),
    ("shape_not_a_list", entry_field("shape", 64), "is not a list of at most 8 non-negative integers"),
    ("shape_huge", entry_field("shape", [1 << 40, 1 << 40]), "bytes expected"),
    ("dtype_unknown", entry_field("dtype", "Q4_K"), "unsupported dtype 'Q4_K'"),
    ("dtype_not_a_string", entry_field("dtype", 5), "unsupported dtype 5"),
    ("entry_extra_key", entry_field("checksum", "x"), "must be an object with exactly dtype, shape, data_offsets"),
    ("entry_not_an_object", lambda header, a, b: header.update({a: [1, 2]}), "must be an object with exactly"),
    ("metadata_not_strings", lambda header, a, b: header.update({"__metadata__": {"format": 5}}),
     "__metadata__ must be an object of strings"),
    ("header_a_list", whole([1, 2]), "not an object"),
    ("header_a_string", whole("x"), "not an object"),
]


@pytest.mark.parametrize(("name", "mutate", "message"), HEADER_CASES, ids=[c[0] for c in HEADER_CASES])
def test_malformed_safetensors_headers_are_one_line_errors(name, mutate, message, ckpt, tmp_path, capsys,
                                                           sandbox) -> None:
    header, body = split_shard(ckpt / SHARD)
    a, b = same_size_pair(header)
    replaced = mutate(header, a, b)
    write_shard(ckpt / SHARD, json.dumps(header if replaced is None else replaced).encode(), body)
    err = export_refused(ckpt, tmp_path, capsys, sandbox)
    assert f"{SHARD}: " in err and message in err, err


def test_duplicate_header_keys_are_refused(ckpt, tmp_path, capsys, sandbox) -> None:
    header, body = split_shard(ckpt / SHARD)
    a, _ = same_size_pair(header)
    text = json.dumps(header)
    duplicate = f'"{a}": {json.dumps(header[a])}'
    write_shard(ckpt / SHARD, text.replace(duplicate, duplicate + ", " + duplicate, 1).encode(), body)
    assert f"corrupt safetensors header (key {a} appears twice)" in export_refused(ckpt, tmp_path, capsys, sandbox)


def test_a_tensor_name_cannot_break_the_line(ckpt, tmp_path, capsys, sandbox) -> None:
    header, body = split_shard(ckpt / SHARD)
    a, _ = same_size_pair(header)
    header["evil\nSECOND LINE"] = header.pop(a)
    header["evil\nSECOND LINE"]["dtype"] = "NOPE"
    write_shard(ckpt / SHARD, json.dumps(header).encode(), body)
    assert "evil\\nSECOND LINE" in export_refused(ckpt, tmp_path, capsys, sandbox)


# --- containment: shards, index, config and side files stay inside the checkpoint ------------------------------

def point_tensor_at(ckpt: Path, file: str) -> None:
    index = json.loads((ckpt / INDEX).read_text())
    first = sorted(index["weight_map"])[0]
    index["weight_map"][first] = file
    (ckpt / INDEX).write_text(json.dumps(index))


def replace_with_link(path: Path, target: Path, hard: bool = False) -> None:
    path.unlink()
    (os.link if hard else os.symlink)(target, path)


def shard_parent_escape(ckpt: Path, box: Sandbox) -> None:
    point_tensor_at(ckpt, "../outside/secret.bin")


def shard_absolute(ckpt: Path, box: Sandbox) -> None:
    point_tensor_at(ckpt, str(box.root / "secret.bin"))


def shard_backslashes(ckpt: Path, box: Sandbox) -> None:
    point_tensor_at(ckpt, "..\\outside\\secret.bin")


def shard_through_linked_folder(ckpt: Path, box: Sandbox) -> None:
    os.symlink(box.root, ckpt / "sub")
    point_tensor_at(ckpt, "sub/secret.bin")


def shard_symlink_outside(ckpt: Path, box: Sandbox) -> None:
    replace_with_link(ckpt / SHARD, box.root / "secret.bin")


def shard_symlink_inside(ckpt: Path, box: Sandbox) -> None:
    shutil.copyfile(ckpt / SHARD, ckpt / "real.bin")
    replace_with_link(ckpt / SHARD, ckpt / "real.bin")


def shard_hard_link_outside(ckpt: Path, box: Sandbox) -> None:
    replace_with_link(ckpt / SHARD, box.root / "secret.bin", hard=True)


def single_file_symlink(ckpt: Path, box: Sandbox) -> None:
    (ckpt / INDEX).unlink()
    (ckpt / SHARD).rename(ckpt / "model.safetensors")
    replace_with_link(ckpt / "model.safetensors", box.root / "secret.bin")


def index_symlink_outside(ckpt: Path, box: Sandbox) -> None:
    replace_with_link(ckpt / INDEX, box.root / "secret.json")


def config_symlink_outside(ckpt: Path, box: Sandbox) -> None:
    replace_with_link(ckpt / "config.json", box.root / "secret.json")


def tokenizer_symlink_outside(ckpt: Path, box: Sandbox) -> None:
    replace_with_link(ckpt / "tokenizer.json", box.root / "secret.json")


def template_symlink_outside(ckpt: Path, box: Sandbox) -> None:
    os.symlink(box.root / "secret.bin", ckpt / "chat_template.jinja")


def config_a_fifo(ckpt: Path, box: Sandbox) -> None:
    (ckpt / "config.json").unlink()
    os.mkfifo(ckpt / "config.json")  # opening it would block for ever


def tokenizer_a_folder(ckpt: Path, box: Sandbox) -> None:
    (ckpt / "tokenizer.json").unlink()
    (ckpt / "tokenizer.json").mkdir()


def weight_map_a_list(ckpt: Path, box: Sandbox) -> None:
    (ckpt / INDEX).write_text(json.dumps({"weight_map": ["../outside/secret.bin"]}))


def weight_map_values_not_strings(ckpt: Path, box: Sandbox) -> None:
    point_tensor_at(ckpt, 5)  # type: ignore[arg-type]


def index_not_an_object(ckpt: Path, box: Sandbox) -> None:
    (ckpt / INDEX).write_text("[]")


def index_not_json(ckpt: Path, box: Sandbox) -> None:
    (ckpt / INDEX).write_bytes(b"\xff{")


CONTAINMENT_CASES = [
    (shard_parent_escape, "shard named in model.safetensors.index.json '../outside/secret.bin' escapes the checkpoint"),
    (shard_absolute, "escapes the checkpoint directory"),
    (shard_backslashes, "escapes the checkpoint directory"),
    (shard_through_linked_folder, "sub is a symbolic link (a checkpoint is read from plain files only"),
    (shard_symlink_outside, f"{SHARD} is a symbolic link"),
    (shard_symlink_inside, f"{SHARD} is a symbolic link"),
    (shard_hard_link_outside, "has 2 hard links (one may lie outside the checkpoint)"),
    (single_file_symlink, "model.safetensors is a symbolic link"),
    (index_symlink_outside, f"{INDEX} is a symbolic link"),
    (config_symlink_outside, "config.json is a symbolic link"),
    (tokenizer_symlink_outside, "tokenizer.json is a symbolic link"),
    (template_symlink_outside, "chat_template.jinja is a symbolic link"),
    (config_a_fifo, "config.json is not a regular file"),
    (tokenizer_a_folder, "tokenizer.json is not a regular file"),
    (weight_map_a_list, "corrupt index (weight_map must be an object of tensor name → shard file)"),
    (weight_map_values_not_strings, "corrupt index (weight_map must be an object"),
    (index_not_an_object, "corrupt index (weight_map must be an object"),
    (index_not_json, "corrupt index ("),
]


@pytest.mark.parametrize(("damage", "message"), CONTAINMENT_CASES, ids=[c[0].__name__ for c in CONTAINMENT_CASES])
def test_nothing_outside_the_checkpoint_is_read(damage, message, ckpt, tmp_path, capsys, sandbox) -> None:
    damage(ckpt, sandbox)
    err = export_refused(ckpt, tmp_path, capsys, sandbox)
    assert message in err, err


def test_parity_and_block_parity_read_checkpoints_through_the_same_gate(ckpt, tmp_path, capsys, sandbox) -> None:
    config_symlink_outside(ckpt, sandbox)
    package = fake_package(tmp_path / "pkg", get_variant(BASE).config)
    for extra in ([], ["--blocks"]):
        err = refused(["parity", str(package), "--checkpoint", str(ckpt), "--quiet", *extra], capsys,
                      out=tmp_path / "pkg.parity", sandbox=sandbox)
        assert "config.json is a symbolic link" in err, err


# --- parity against a checkpoint of another model: configs compared first ---------------------------------------

def fake_package(directory: Path, config: dict[str, Any]) -> Path:
    """A manifest alone: the comparison must refuse before any other file of the package is opened."""
    directory.mkdir()
    (directory / MANIFEST).write_text(json.dumps({"format": FORMAT, "files": {}, "text_config": config["text_config"]}))
    return directory


@pytest.mark.parametrize("blocks", [False, True], ids=["parity", "parity--blocks"])
def test_parity_refuses_a_checkpoint_of_another_model_at_once(blocks, tiny_checkpoint, tmp_path, capsys) -> None:
    other = tiny_checkpoint("tiny-31b")
    package = fake_package(tmp_path / "pkg", get_variant(BASE).config)
    argv = ["parity", str(package), "--checkpoint", str(other), "--quiet", *(["--blocks"] if blocks else [])]
    import gemma4_onnx.block_parity
    import gemma4_onnx.exporter.weights
    import gemma4_onnx.parity_run  # noqa: F401 (imported before the clock starts, as in a warm session)

    started = time.perf_counter()
    err = refused(argv, capsys, out=tmp_path / "pkg.parity")
    assert time.perf_counter() - started < 1.0
    assert f"{other} is not the source of {package} (a checkpoint of another model?): text_config." in err, err


def test_the_source_comparison_accepts_the_same_model_in_either_spelling(tmp_path) -> None:
    from gemma4_onnx.exporter.hf_model import hf_config
    from gemma4_onnx.parity_run import check_same_model

    config = get_variant(BASE).config
    manifest = {"text_config": config["text_config"]}
    check_same_model(tmp_path, manifest, "same", config)
    resaved = json.loads(hf_config(config).to_json_string())
    check_same_model(tmp_path, manifest, "re-saved", resaved)
    with pytest.raises(UsageError, match=r"text_config\.sliding_window is 9 there, 8 in the package"):
        check_same_model(tmp_path, manifest, "other", {"text_config": config["text_config"] | {"sliding_window": 9}})


# --- fuzzing: mutated configs and headers through the real CLI ----------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6)


def field_paths(config: dict[str, Any]) -> list[tuple[str, ...]]:
    paths: list[tuple[str, ...]] = []

    def walk(node: Any, prefix: tuple[str, ...]) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                paths.append((*prefix, key))
                walk(value, (*prefix, key))

    walk(config, ())
    return paths


CONFIG_PATHS = field_paths(get_variant(BASE).config)


@st.composite
def config_mutations(draw: st.DrawFn) -> tuple[tuple[str, ...], Any]:
    keys = draw(st.sampled_from(CONFIG_PATHS))
    current = _lookup(get_variant(BASE).config, keys)
    numeric = isinstance(current, int | float) and not isinstance(current, bool)
    value = draw(st.one_of(
        st.just(DROP), JSON_VALUES,
        *([st.sampled_from([0, -1, 1, 2, 10**12]).map(lambda f: current * f if f else 0),
           st.integers(-3, 3).map(lambda d: current + d)] if numeric else []),
    ))
    return keys, value


def _lookup(node: Any, keys: tuple[str, ...]) -> Any:
    for key in keys:
        node = node[key]
    return node


@pytest.fixture
def export_stops_before_tracing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A valid mutation exports an empty package: the promise on input is kept or broken before tracing (the
    trace of a valid tiny config takes minutes on 2 busy cores)."""
    import gemma4_onnx.exporter.package as package_module

    monkeypatch.setattr(package_module, "_write_package", lambda weights, writer, structure_only: None)


def run_export(ckpt: Path, out: Path, capsys: pytest.CaptureFixture[str], sandbox: Sandbox) -> None:
    """The promise: exit 0 with OUT published, or ``refused``'s checks."""
    before = sandbox.listing()
    code = main(["export", str(ckpt), str(out), "--quiet"])
    event(f"exit {code}")
    if code == 0:
        capsys.readouterr()
        assert out.is_dir() and not sandbox.untouched() and sandbox.listing() <= before
        shutil.rmtree(out)
        return
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err and "internal error" not in err, err
    assert no_output(out) and not sandbox.untouched() and "SECRET-SENTINEL" not in err, err


def _fuzz_config(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], sandbox: Sandbox,
                 mutation: tuple[tuple[str, ...], Any]) -> None:
    original = (ckpt / "config.json").read_text()
    edit_json(ckpt / "config.json", *mutation)
    try:
        run_export(ckpt, tmp_path / "out", capsys, sandbox)
    finally:
        (ckpt / "config.json").write_text(original)


@FAST
@given(mutation=config_mutations())
def test_fuzzed_configs_keep_the_promise(mutation, ckpt, tmp_path, capsys, sandbox,
                                         export_stops_before_tracing) -> None:
    _fuzz_config(ckpt, tmp_path, capsys, sandbox, mutation)


@pytest.mark.slow
@SLOW
@given(mutation=config_mutations())
def test_fuzzed_configs_keep_the_promise_long(mutation, ckpt, tmp_path, capsys, sandbox,
                                              export_stops_before_tracing) -> None:
    _fuzz_config(ckpt, tmp_path, capsys, sandbox, mutation)


HEADER_KEYS = st.sampled_from(["dtype", "shape", "data_offsets", "extra"])


@st.composite
def header_mutations(draw: st.DrawFn) -> list[tuple[int, str, Any]]:
    """(tensor index, key, value) edits; offsets are drawn near the real ones as often as anywhere."""
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        index = draw(st.integers(0, 400))
        key = draw(HEADER_KEYS)
        value = draw(st.one_of(
            JSON_VALUES,
            st.lists(st.integers(-4, 4), min_size=2, max_size=2).map(lambda d: ("shift", d)),
            st.integers(0, 400).map(lambda other: ("copy", other)),
            st.just(DROP)))
        edits.append((index, key, value))
    return edits


def _apply(header: dict[str, Any], edits: list[tuple[int, str, Any]]) -> None:
    names = sorted(n for n in header if n != "__metadata__")
    for index, key, value in edits:
        entry = header[names[index % len(names)]]
        if value is DROP:
            entry.pop(key, None)
        elif isinstance(value, tuple) and value[0] == "shift" and isinstance(entry.get("data_offsets"), list):
            entry["data_offsets"] = [o + d if isinstance(o, int) else o for o, d in
                                     zip(entry["data_offsets"], value[1], strict=False)]
        elif isinstance(value, tuple) and value[0] == "copy":
            entry[key] = copy.deepcopy(header[names[value[1] % len(names)]].get(key))
        else:
            entry[key] = value


def _fuzz_header(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], sandbox: Sandbox,
                 edits: list[tuple[int, str, Any]]) -> None:
    original = (ckpt / SHARD).read_bytes()
    header, body = split_shard(ckpt / SHARD)
    _apply(header, edits)
    write_shard(ckpt / SHARD, json.dumps(header).encode(), body)
    try:
        run_export(ckpt, tmp_path / "out", capsys, sandbox)
    finally:
        (ckpt / SHARD).write_bytes(original)


@FAST
@given(edits=header_mutations())
def test_fuzzed_safetensors_headers_keep_the_promise(edits, ckpt, tmp_path, capsys, sandbox,
                                                     export_stops_before_tracing) -> None:
    _fuzz_header(ckpt, tmp_path, capsys, sandbox, edits)


@pytest.mark.slow
@SLOW
@given(edits=header_mutations())
def test_fuzzed_safetensors_headers_keep_the_promise_long(edits, ckpt, tmp_path, capsys, sandbox,
                                                          export_stops_before_tracing) -> None:
    _fuzz_header(ckpt, tmp_path, capsys, sandbox, edits)


HOSTILE_NAMES = [SHARD, f"./{SHARD}", f"{SHARD}/", f"sub/../{SHARD}", "../outside/secret.bin", "..", "/", "",
                 "link.bin", "linkdir/secret.bin", "hard.bin", "fifo", "config.json", INDEX, "tokenizer.json",
                 "~/secret.bin", "..\\outside\\secret.bin", "a\x00b", "nested/" * 40 + "x"]


@st.composite
def index_mutations(draw: st.DrawFn) -> list[tuple[str | None, Any]]:
    """(tensor name or None for a new one, value) edits of the index's weight_map."""
    return draw(st.lists(st.tuples(
        st.one_of(st.none(), st.integers(0, 400).map(str)),
        st.one_of(st.sampled_from(HOSTILE_NAMES), st.sampled_from(HOSTILE_NAMES).map(lambda n: "../" + n),
                  st.text(max_size=20), JSON_VALUES)), min_size=1, max_size=3))


def _lay_traps(ckpt: Path, sandbox: Sandbox) -> None:
    """Names a hostile index may point at: links out of the checkpoint, a FIFO."""
    if not (ckpt / "link.bin").exists():
        os.symlink(sandbox.root / "secret.bin", ckpt / "link.bin")
        os.symlink(sandbox.root, ckpt / "linkdir")
        os.link(sandbox.root / "secret.bin", ckpt / "hard.bin")
        os.mkfifo(ckpt / "fifo")


def _fuzz_index(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], sandbox: Sandbox,
                edits: list[tuple[str | None, Any]]) -> None:
    _lay_traps(ckpt, sandbox)
    original = (ckpt / INDEX).read_text()
    index = json.loads(original)
    names = sorted(index["weight_map"])
    for which, value in edits:
        index["weight_map"][names[int(which) % len(names)] if which is not None else "model.extra"] = value
    (ckpt / INDEX).write_text(json.dumps(index))
    try:
        run_export(ckpt, tmp_path / "out", capsys, sandbox)
    finally:
        (ckpt / INDEX).write_text(original)


@FAST
@given(edits=index_mutations())
def test_fuzzed_indexes_never_reach_outside(edits, ckpt, tmp_path, capsys, sandbox,
                                            export_stops_before_tracing) -> None:
    _fuzz_index(ckpt, tmp_path, capsys, sandbox, edits)


@pytest.mark.slow
@SLOW
@given(edits=index_mutations())
def test_fuzzed_indexes_never_reach_outside_long(edits, ckpt, tmp_path, capsys, sandbox,
                                                 export_stops_before_tracing) -> None:
    _fuzz_index(ckpt, tmp_path, capsys, sandbox, edits)


@pytest.mark.slow
@pytest.mark.parametrize("change", [{"sliding_window": 1}, {"num_kv_shared_layers": 3}])
def test_valid_odd_configs_export_for_real(change, ckpt, tmp_path, capsys) -> None:
    """What the fuzz stubs out: a config the schema accepts traces and exports (the slow tier only)."""
    config = json.loads((ckpt / "config.json").read_text())
    config["text_config"].update(change)
    (ckpt / "config.json").write_text(json.dumps(config))
    assert main(["export", str(ckpt), str(tmp_path / "out"), "--quiet"]) == 0, capsys.readouterr().err
    assert (tmp_path / "out" / MANIFEST).is_file()


def hub_snapshot(ckpt: Path, root: Path) -> Path:
    """``ckpt`` laid out as Hugging Face's cache does: every file a link from snapshots/<rev>/ to blobs/."""
    repo = root / "models--google--tiny"
    snapshot, blobs = repo / "snapshots" / "0123abc", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, path in enumerate(sorted(ckpt.iterdir())):
        shutil.copyfile(path, blobs / f"blob{i}")
        (snapshot / path.name).symlink_to(Path("../../blobs") / f"blob{i}")
    return snapshot


def test_a_hugging_face_cache_snapshot_is_read_through_its_blob_links(ckpt, tmp_path) -> None:
    from gemma4_onnx.exporter.checkpoint import Checkpoint

    snapshot = hub_snapshot(ckpt, tmp_path / "hub")
    checkpoint = Checkpoint.open(snapshot)
    name = next(iter(checkpoint.entries))
    assert checkpoint.tensor(name).equal(Checkpoint.open(ckpt).tensor(name))


def test_a_snapshot_link_out_of_its_blobs_folder_is_refused(ckpt, tmp_path, capsys, sandbox) -> None:
    snapshot = hub_snapshot(ckpt, tmp_path / "hub")
    secret = sandbox.add("secret.json", b'{"SECRET-SENTINEL": 1}')
    (snapshot / "config.json").unlink()
    (snapshot / "config.json").symlink_to(secret)
    err = refused(["export", str(snapshot), str(tmp_path / "out"), "--quiet"], capsys, out=tmp_path / "out",
                  sandbox=sandbox)
    assert "config.json is a symbolic link" in err
