"""Hostile and broken packages and arguments: each refused with one line naming the problem, the exact
error class, and nothing that looks valid left behind. Bad checkpoints and bad recipe texts are in
test_checkpoint.py and test_quantize.py; the image budget argument belongs to the vision work."""

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest

from gemma4_onnx.cli import main
from gemma4_onnx.errors import PackageError, UnknownVariantError, UsageError
from gemma4_onnx.graphs.manifest import MANIFEST, file_table
from gemma4_onnx.verify import verify_package

RTN = '[default]\nbits = 4\nblock_size = 16\nalgorithm = "rtn"\n'


def reseal(package: Path, signatures: bool = False) -> None:
    """Rewrite the manifest's checksums (and graph signatures) as someone who controls the directory would."""
    from gemma4_onnx.graphs.manifest import graph_signature

    manifest = json.loads((package / MANIFEST).read_text())
    manifest["files"] = file_table(package)
    if signatures:
        for entry in [manifest["graphs"]["embed"], manifest["graphs"]["decoder"], *manifest["graphs"]["blocks"]]:
            entry.update(graph_signature(onnx.load(package / entry["file"], load_external_data=False)))
    (package / MANIFEST).write_text(json.dumps(manifest))


def edit_graph(package: Path, file: str, change: Callable[[onnx.ModelProto], None], signatures: bool = False) -> None:
    model = onnx.load(package / file, load_external_data=False)
    change(model)
    onnx.save_model(model, package / file)
    reseal(package, signatures)


def first_external(model: onnx.ModelProto) -> dict[str, onnx.StringStringEntryProto]:
    tensor = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    return {e.key: e for e in tensor.external_data}


def set_external(key: str, value: Callable[[Path, str], str]) -> Callable[[Path], None]:
    def damage(package: Path) -> None:
        def change(model: onnx.ModelProto) -> None:
            entries = first_external(model)
            entries[key].value = value(package, entries["location"].value)
        edit_graph(package, "embed.onnx", change)
    return damage


def outside_copy(package: Path, name: str) -> Path:
    target = package.parent / f"outside-{Path(name).name}"
    shutil.copyfile(package / name, target)
    return target


def parent_escape(p: Path) -> None:
    outside_copy(p, "embed.data")
    set_external("location", lambda p, loc: "../outside-embed.data")(p)


def absolute_location(p: Path) -> None:
    set_external("location", lambda p, loc: str(outside_copy(p, loc)))(p)


def symlinked_data_file(p: Path) -> None:
    target = outside_copy(p, "blocks/layer_00.data")
    (p / "blocks/layer_00.data").unlink()
    (p / "blocks/layer_00.data").symlink_to(target)


def symlinked_directory(p: Path) -> None:
    shutil.move(p / "blocks", p.parent / "outside-blocks")
    (p / "blocks").symlink_to(p.parent / "outside-blocks")


def hardlinked_data_file(p: Path) -> None:
    target = outside_copy(p, "blocks/layer_00.data")
    (p / "blocks/layer_00.data").unlink()
    os.link(target, p / "blocks/layer_00.data")


def offset_beyond_end(p: Path) -> None:
    set_external("offset", lambda p, loc: str((p / loc).stat().st_size))(p)


def negative_offset(p: Path) -> None:
    set_external("offset", lambda p, loc: "-64")(p)


def length_not_the_shape(p: Path) -> None:
    set_external("length", lambda p, loc: str(1 << 40))(p)


def unlisted_data_file(p: Path) -> None:
    shutil.copyfile(p / "embed.data", p / "stray.data")
    set_external("location", lambda p, loc: "stray.data")(p)
    manifest = json.loads((p / MANIFEST).read_text())
    del manifest["files"]["stray.data"]
    (p / MANIFEST).write_text(json.dumps(manifest))


def truncate(name: str, seal: bool) -> Callable[[Path], None]:
    def damage(p: Path) -> None:
        (p / name).write_bytes((p / name).read_bytes()[:-4096])
        if seal:
            reseal(p)
    return damage


def flipped_byte(p: Path) -> None:
    data = bytearray((p / "embed.data").read_bytes())
    data[100] ^= 0xFF
    (p / "embed.data").write_bytes(bytes(data))


def missing_block_graph(p: Path) -> None:
    (p / "blocks/layer_01.onnx").unlink()


def foreign_producer(p: Path) -> None:
    edit_graph(p, "decoder.onnx", lambda m: setattr(m, "producer_name", "pytorch"))


def hidden_width(value: int) -> Callable[[onnx.ModelProto], None]:
    def change(model: onnx.ModelProto) -> None:
        output = next(o for o in model.graph.output if o.name == "inputs_embeds")
        output.type.tensor_type.shape.dim[2].dim_value = value
    return change


def signature_not_the_manifest(p: Path) -> None:
    edit_graph(p, "embed.onnx", hidden_width(96))


def graph_of_another_width(p: Path) -> None:
    edit_graph(p, "embed.onnx", hidden_width(96), signatures=True)


def huge_dimension(p: Path) -> None:
    edit_graph(p, "embed.onnx", hidden_width(1 << 40), signatures=True)


def garbage_graph(p: Path) -> None:
    (p / "embed.onnx").write_bytes(b"\x0a\xff\xff\xff\xff\x0f" + os.urandom(64))
    reseal(p)


def tokenizer_beyond_vocab(p: Path) -> None:
    tokenizer = json.loads((p / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"]["<extra>"] = 5000
    (p / "tokenizer.json").write_text(json.dumps(tokenizer))
    reseal(p)


def edit_manifest(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(p: Path) -> None:
        manifest = json.loads((p / MANIFEST).read_text())
        change(manifest)
        (p / MANIFEST).write_text(json.dumps(manifest))
    return damage


def no_manifest(p: Path) -> None:
    (p / MANIFEST).unlink()


def manifest_not_json(p: Path) -> None:
    (p / MANIFEST).write_text('{"format": "gemma4-onnx/1", "files": ')


BAD_PACKAGES = [
    (parent_escape, PackageError, "location '../outside-embed.data' escapes the package directory"),
    (absolute_location, PackageError, "location '/.*' escapes the package directory"),
    (symlinked_data_file, PackageError, "blocks/layer_00.data is a symbolic link"),
    (symlinked_directory, PackageError, "blocks is a symbolic link"),
    (hardlinked_data_file, PackageError, "blocks/layer_00.data has 2 hard links"),
    (offset_beyond_end, PackageError, "lie beyond the end of embed.data"),
    (negative_offset, PackageError, "offset '-64' is not a byte count"),
    (length_not_the_shape, PackageError, "length 1099511627776 does not match its shape"),
    (unlisted_data_file, PackageError, "external-data file stray.data is not listed in the manifest"),
    (truncate("ple.data", seal=False), PackageError,
     r"ple.data \(the per-layer embedding table\) has \d+ bytes, the manifest says"),
    (truncate("ple.data", seal=True), PackageError, "lie beyond the end of ple.data"),
    (truncate("blocks/layer_02.data", seal=True), PackageError, "lie beyond the end of blocks/layer_02.data"),
    (flipped_byte, PackageError, "embed.data: sha256 differs from the manifest"),
    (missing_block_graph, PackageError, "package file blocks/layer_01.onnx is missing"),
    (foreign_producer, PackageError, "decoder.onnx was produced by 'pytorch'"),
    (signature_not_the_manifest, PackageError, "embed.onnx: inputs/outputs differ from the manifest"),
    (graph_of_another_width, PackageError, "inputs_embeds width 96 is not the config's hidden_size 64"),
    (huge_dimension, PackageError, "value inputs_embeds declares dimensions"),
    (garbage_graph, PackageError, "embed.onnx is not a valid ONNX file"),
    (tokenizer_beyond_vocab, PackageError, "tokenizer.json has token id 5000, beyond the model's vocab_size 320"),
    (edit_manifest(lambda m: m["files"].update({"../secret": {"bytes": 1, "sha256": "0" * 64}})), PackageError,
     "manifest entry '../secret' escapes"),
    (edit_manifest(lambda m: m.pop("files")), PackageError, "manifest.json: files: is missing"),
    (no_manifest, UsageError, "is not a gemma4-onnx package"),
    (manifest_not_json, UsageError, "not valid JSON"),
]


def cli_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[type[BaseException], str]:
    """The exact class (with --debug) and the one-line message (without) of a failing command."""
    with pytest.raises(Exception) as raised:
        main([*argv, "--debug"])
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and err.startswith(f"gemma4-onnx {argv[0]}: error: ")
    return raised.type, err


def no_output(path: Path) -> bool:
    """Neither the output nor a staging directory for it exists."""
    return not path.exists() and not list(path.parent.glob(f".{path.name}.*"))


@pytest.fixture
def package(exported, tmp_path: Path) -> Path:
    """A private copy of the session's tiny-e2b fp32 export, inside tmp_path/work."""
    _, fp32 = exported("tiny-e2b")
    return Path(shutil.copytree(fp32, tmp_path / "work" / "package"))


@pytest.mark.parametrize(("damage", "error", "message"), BAD_PACKAGES,
                         ids=[f"{i:02d}-{getattr(b[0], '__name__', 'edit')}" for i, b in enumerate(BAD_PACKAGES)])
def test_bad_packages_are_refused_by_every_loader_and_by_verify(damage, error, message, package, tmp_path,
                                                                 capsys) -> None:
    damage(package)
    recipe = tmp_path / "rtn.toml"
    recipe.write_text(RTN)
    out = tmp_path / "quantized"
    for argv in (["generate", str(package), "--prompt", "def f", "--quiet"],
                 ["quantize", str(package), str(out), "--recipe", str(recipe), "--quiet"]):
        kind, err = cli_error(argv, capsys)
        assert kind is error, err
        assert re.search(message, err), err
    assert no_output(out)
    report = verify_package(package)
    assert report["passed"] is False
    assert any(c["problems"] for c in report["checks"]), report


def test_parity_refuses_a_tampered_package_before_reading_it(package, exported, capsys) -> None:
    checkpoint, _ = exported("tiny-e2b")
    flipped_byte(package)
    kind, err = cli_error(["parity", str(package), "--checkpoint", str(checkpoint), "--steps", "1", "--quiet"],
                          capsys)
    assert kind is PackageError and "sha256 differs" in err
    assert no_output(package.parent / f"{package.name}.parity")


def recipe_file(text: str) -> Callable[[Path], str]:
    def write(tmp_path: Path) -> str:
        (tmp_path / "recipe.toml").write_text(text)
        return str(tmp_path / "recipe.toml")
    return write


BAD_ARGUMENTS = [
    ("parity-negative-steps", ["parity", "{package}", "--checkpoint", "{checkpoint}", "--steps", "-1"], UsageError,
     "--steps must be ≥ 0, got -1"),
    ("generate-negative-tokens", ["generate", "{package}", "--prompt", "x", "--max-new-tokens", "-3"], UsageError,
     "--max-new-tokens must be ≥ 0"),
    ("quantize-unknown-recipe", ["quantize", "{package}", "{out}", "--recipe", "int3"], UsageError,
     "unknown recipe 'int3'"),
    ("quantize-unknown-key", ["quantize", "{package}", "{out}", "--recipe", recipe_file("colour = 1")], UsageError,
     "unknown key"),
    ("quantize-impossible-bits", ["quantize", "{package}", "{out}", "--recipe",
                                  recipe_file("[default]\nbits = 3")], UsageError, "bits must be 4, 8"),
    ("quantize-impossible-block", ["quantize", "{package}", "{out}", "--recipe",
                                   recipe_file("[default]\nblock_size = 48")], UsageError, "block_size must be one of"),
    ("quantize-rule-matches-nothing", ["quantize", "{package}", "{out}", "--recipe",
                                       recipe_file(RTN + "[[rules]]\nname = 'none'\nmatch = 'no_such_weight'\n")],
     UsageError, "rule 'none' matches no tensor"),
    ("export-unknown-variant", ["export", "tiny-e2c", "{out}"], UnknownVariantError, "did you mean tiny-e2b"),
    ("export-missing-checkpoint", ["export", "{missing}", "{out}"], UsageError, "is not a checkpoint directory"),
]


@pytest.mark.parametrize(("argv", "error", "message"), [b[1:] for b in BAD_ARGUMENTS],
                         ids=[b[0] for b in BAD_ARGUMENTS])
def test_bad_arguments_are_refused_and_write_nothing(argv, error, message, package, exported, tmp_path,
                                                     capsys) -> None:
    checkpoint, _ = exported("tiny-e2b")
    out = tmp_path / "out"
    names = {"package": str(package), "checkpoint": str(checkpoint), "out": str(out), "missing": str(tmp_path / "no")}
    argv = [a(tmp_path) if callable(a) else a.format(**names) for a in argv]
    kind, err = cli_error([*argv, "--quiet"], capsys)
    assert kind is error, err
    assert re.search(message, err), err
    assert no_output(out)
    assert no_output(package.parent / f"{package.name}.parity")


def test_an_existing_output_is_kept_without_force(package, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    recipe = recipe_file(RTN)(tmp_path)
    kind, err = cli_error(["quantize", str(package), str(out), "--recipe", recipe, "--quiet"], capsys)
    assert kind is UsageError and "pass --force" in err
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
