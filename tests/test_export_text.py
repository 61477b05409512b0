"""Text export end to end: every tiny variant and both trained fixtures, fp32, against transformers."""

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import onnx
import pytest
import torch
from tokenizers import Tokenizer

from gemma4_onnx import tolerances
from gemma4_onnx.cli import main
from gemma4_onnx.errors import UsageError
from gemma4_onnx.exporter.checkpoint import Checkpoint
from gemma4_onnx.exporter.geometry import text_geometry
from gemma4_onnx.exporter.package import PLE_TABLE, export_package
from gemma4_onnx.exporter.reference import load_reference_model
from gemma4_onnx.exporter.variants import TINY
from gemma4_onnx.graphs.external_data import external_entries
from gemma4_onnx.parity_run import run_parity
from gemma4_onnx.runtime.text_model import TextModel

from support import TRAINED_FIXTURES

SOURCES = TINY + TRAINED_FIXTURES


@pytest.mark.parametrize("source", SOURCES)
def test_fp32_export_matches_transformers(source: str, exported) -> None:
    checkpoint, package = exported(source)
    text = checkpoint / "eval.txt" if source in TRAINED_FIXTURES else None
    result = run_parity(package, checkpoint, text, steps=64)
    t = result["text"]
    assert t["greedy_match_steps"] == t["greedy_steps"] == 64
    assert t["max_abs_logit_diff"] <= tolerances.TEXT_FP32_MAX_ABS_LOGIT_DIFF
    assert t["kl_mean"] <= tolerances.TEXT_FP32_KL_MEAN
    assert min(b["cosine"] for b in result["blocks"]) >= tolerances.BLOCK_FP32_MIN_COSINE
    window = text_geometry(json.loads((checkpoint / "config.json").read_text())).sliding_window
    assert t["positions"] / t["windows"] > 3 * window  # sequences run well past the sliding window
    assert len(result["blocks"]) == len(json.loads((package / "manifest.json").read_text())["graphs"]["blocks"])
    assert result["passed"]


@pytest.mark.parametrize("source", ["tiny-e2b", "e2b-mini"])
def test_ple_data_holds_exactly_the_ple_table(source: str, exported) -> None:
    checkpoint, package = exported(source)
    manifest = json.loads((package / "manifest.json").read_text())
    assert manifest["ple"] == {"file": "ple.data", "tensor": PLE_TABLE}
    table = Checkpoint.open(checkpoint).tensor(PLE_TABLE, torch.float32).numpy()
    assert (package / "ple.data").read_bytes() == table.tobytes()
    references = []
    for graph in package.rglob("*.onnx"):
        model = onnx.load(graph, load_external_data=False)
        references += [(graph.name, t.name) for t in model.graph.initializer
                       if external_entries(t).get("location", "").endswith("ple.data")]
    assert references == [("embed.onnx", PLE_TABLE)]


def test_missing_ple_data_fails_with_a_clear_message(exported, tmp_path: Path) -> None:
    _, package = exported("tiny-e2b")
    broken = tmp_path / "broken"
    shutil.copytree(package, broken)
    (broken / "ple.data").unlink()
    with pytest.raises(UsageError, match=r"package file ple.data \(the per-layer embedding table\) is missing"):
        TextModel(broken)


@pytest.mark.parametrize("source", SOURCES)
def test_cache_io_only_for_cache_owning_layers(source: str, exported) -> None:
    checkpoint, package = exported(source)
    geometry = Checkpoint.open(checkpoint).geometry
    decoder = onnx.load(package / "decoder.onnx", load_external_data=False)
    past = sorted(i.name for i in decoder.graph.input if i.name.startswith("past."))
    expected = []
    for spec in geometry.cache_layers:
        expected += [f"past.{spec.index}.key_value"] if spec.k_eq_v else [f"past.{spec.index}.key",
                                                                          f"past.{spec.index}.value"]
    assert past == sorted(expected)
    assert len(past) < 2 * geometry.num_layers or not any(s.kv_mode == "reuse" for s in geometry.layers)
    if any(s.k_eq_v for s in geometry.layers):
        assert any(name.endswith("key_value") for name in past)  # one tensor per K=V layer


def test_manifest_lists_every_file_with_checksum(exported) -> None:
    _, package = exported("tiny-e2b")
    manifest = json.loads((package / "manifest.json").read_text())
    on_disk = sorted(p.relative_to(package).as_posix() for p in package.rglob("*")
                     if p.is_file() and p.name != "manifest.json")
    assert sorted(manifest["files"]) == on_disk
    assert all(len(entry["sha256"]) == 64 for entry in manifest["files"].values())
    assert {"torch", "transformers", "onnx", "onnxruntime"} <= set(manifest["libraries"])
    assert [i["name"] for i in manifest["graphs"]["embed"]["inputs"]] == ["input_ids"]
    assert len(manifest["cache"]) == 6 and manifest["source"]["kind"] == "checkpoint"


def test_generate_continues_like_transformers_on_e2b_mini(exported, capsys) -> None:
    checkpoint, package = exported("e2b-mini")
    prompt = "def read_config(path):"
    assert main(["generate", str(package), "--prompt", prompt, "--max-new-tokens", "48"]) == 0
    ours = capsys.readouterr().out.rstrip("\n")
    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    ids = tokenizer.encode(prompt).ids
    model = load_reference_model(Checkpoint.open(checkpoint))
    theirs = model.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False)[0, len(ids):].tolist()
    assert ours == tokenizer.decode(theirs)
    assert '"""' in ours


def test_variant_name_exports_the_same_weights_as_its_random_checkpoint(tmp_path: Path) -> None:
    from gemma4_onnx.exporter.init_checkpoint import init_checkpoint

    from_name = export_package("tiny-31b", tmp_path / "name")
    checkpoint = init_checkpoint("tiny-31b", tmp_path / "checkpoint")  # bf16, seed 0: what the name streams
    from_dir = export_package(str(checkpoint), tmp_path / "dir")
    files = [json.loads((d / "manifest.json").read_text())["files"] for d in (from_name, from_dir)]
    data = [{n: e["sha256"] for n, e in f.items() if n.endswith((".data", ".onnx"))} for f in files]
    assert data[0] == data[1] and len(data[0]) > 4


def _op_types(graph: onnx.GraphProto) -> Iterator[str]:
    for node in graph.node:
        yield node.op_type
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _op_types(attribute.g)


@pytest.mark.parametrize("source", ["tiny-26b-a4b", "e2b-mini"])
def test_ort_target_matches_transformers(source: str, exported, tmp_path: Path) -> None:
    checkpoint, _ = exported(source)
    package = export_package(str(checkpoint), tmp_path / "ort", target="ort")
    manifest = json.loads((package / "manifest.json").read_text())
    assert manifest["target"] == "ort" and manifest["lowering"]["decoder"]["lowered"]
    assert not any("rope" in name for name in manifest["files"])  # cos/sin rows are computed per call
    decoder = onnx.load(package / "decoder.onnx", load_external_data=False)
    assert "GroupQueryAttention" in set(_op_types(decoder.graph))  # 26B-A4B: in If branches (image_blocks)
    text = checkpoint / "eval.txt" if source in TRAINED_FIXTURES else None
    result = run_parity(package, checkpoint, text, steps=32)
    assert result["passed"], result["checks"]
