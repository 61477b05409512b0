"""Packages someone else made, as an attacker would: every verb passes the one containment gate
(``runtime.package_files.open_package``) before it opens a file, so a manifest or graph that names
something outside the package, through a path, a link or an unlisted entry, is refused with one line and
nothing outside is read or written. The manifest fuzz mutates one field at a time and runs the real verbs."""

import itertools
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gemma4_onnx.cli import main
from gemma4_onnx.errors import UsageError
from gemma4_onnx.graphs.manifest import MANIFEST
from gemma4_onnx.verify import verify_package

from hostile import FAST, SLOW, Sandbox, refused
from test_bad_inputs import RTN, edit_graph


@pytest.fixture
def workspace(exported, tmp_path: Path) -> tuple[Path, Sandbox]:
    """A private copy of the tiny-e2b fp32 package at tmp_path/work/package and sentinels beside it."""
    _, fp32 = exported("tiny-e2b")
    package = Path(shutil.copytree(fp32, tmp_path / "work" / "package"))
    sandbox = Sandbox(tmp_path / "work")
    for name in ("victim.onnx", "secret.onnx", "outside.bin", "template.jinja"):
        sandbox.add(name)
    (tmp_path / "recipe.toml").write_text(RTN)
    return package, sandbox


def edit_manifest(package: Path, change: Any) -> None:
    manifest = json.loads((package / MANIFEST).read_text())
    change(manifest)
    (package / MANIFEST).write_text(json.dumps(manifest))


def verbs(package: Path, tmp_path: Path) -> list[tuple[list[str], Path | None]]:
    """Every verb that reads a package, with the output it must not leave behind."""
    return [
        (["generate", str(package), "--prompt", "def f", "--max-new-tokens", "2", "--quiet"], None),
        (["quantize", str(package), str(tmp_path / "work" / "q"), "--recipe", str(tmp_path / "recipe.toml"),
          "--quiet"], tmp_path / "work" / "q"),
        (["mobile", str(package), str(tmp_path / "work" / "m"), "--quiet"], tmp_path / "work" / "m"),
        (["mobile", str(package), str(tmp_path / "work" / "g"), "--genai", "--quiet"], tmp_path / "work" / "g"),
    ]


def assert_every_verb_refuses(package: Path, tmp_path: Path, sandbox: Sandbox, capsys, message: str) -> None:
    for argv, out in verbs(package, tmp_path):
        err = refused(argv, capsys, out=out, sandbox=sandbox)
        assert message in err, (argv[0], err)
    assert main(["verify", str(package), "--quiet"]) == 1
    capsys.readouterr()
    assert not sandbox.untouched()


def unlisted_graph_entry(file: str, graph: str = "vision_encoder") -> Any:
    def change(manifest: dict[str, Any]) -> None:
        manifest["graphs"][graph]["file"] = file
    return change


@pytest.mark.parametrize(("file", "message"), [
    ("../victim.onnx", "graph '../victim.onnx' escapes the package directory"),
    ("stray.onnx", "graph stray.onnx is not among the manifest's files"),
])
def test_a_graph_entry_the_manifest_does_not_list_is_refused_not_skipped(file, message, workspace, tmp_path,
                                                                          capsys) -> None:
    package, sandbox = workspace
    shutil.copyfile(package / "vision_encoder.onnx", package / "stray.onnx")
    sandbox.add("victim.onnx", (package / "vision_encoder.onnx").read_bytes())
    edit_manifest(package, unlisted_graph_entry(file))
    assert_every_verb_refuses(package, tmp_path, sandbox, capsys, message)


def test_a_weights_file_or_ple_file_the_manifest_does_not_list_is_refused(workspace, tmp_path, capsys) -> None:
    package, sandbox = workspace
    edit_manifest(package, lambda m: m["graphs"]["vision_encoder"].update(weights_file="../outside.bin"))
    assert_every_verb_refuses(package, tmp_path, sandbox, capsys, "'../outside.bin' escapes the package")
    edit_manifest(package, lambda m: m["graphs"]["vision_encoder"].update(weights_file="vision_encoder.data"))
    edit_manifest(package, lambda m: m["ple"].update(file="unlisted.data"))
    assert_every_verb_refuses(package, tmp_path, sandbox, capsys, "per-layer embedding file unlisted.data is not "
                                                                  "among the manifest's files")


def test_a_symlinked_manifest_is_not_verified(workspace, tmp_path, capsys) -> None:
    package, sandbox = workspace
    outside = tmp_path / "work" / "manifest-outside.json"
    shutil.move(package / MANIFEST, outside)
    (package / MANIFEST).symlink_to(outside)
    report = verify_package(package)
    assert not report["passed"] and "manifest.json is a symbolic link" in report["checks"][0]["problems"][0]
    assert refused(["generate", str(package), "--prompt", "x", "--quiet"], capsys, sandbox=sandbox)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"])
def test_side_files_are_never_read_through_a_link(name, workspace, tmp_path, capsys) -> None:
    package, sandbox = workspace
    target = sandbox.add(f"outside-{name}", b'{"chat_template": "SECRET-SENTINEL"}' if name.endswith(".json")
                         else b"SECRET-SENTINEL {{ messages }}")
    if (package / name).exists():
        (package / name).unlink()
    (package / name).symlink_to(target)
    if name in json.loads((package / MANIFEST).read_text())["files"]:
        message = f"{name} is a symbolic link"
    else:
        message = f"file {name} is not listed in the manifest"
    for argv, out in verbs(package, tmp_path)[:3:2]:  # generate and mobile copy side files
        err = refused(argv, capsys, out=out, sandbox=sandbox)
        assert message in err, err


def sparse_outside(location: str) -> Any:
    def change(model: onnx.ModelProto) -> None:
        values = onnx.numpy_helper.from_array(np.zeros(1, np.float32), "sparse_values")
        values.data_location = onnx.TensorProto.EXTERNAL
        values.ClearField("raw_data")
        values.external_data.add(key="location", value=location)
        values.external_data.add(key="length", value="4")
        indices = onnx.numpy_helper.from_array(np.zeros(1, np.int64), "sparse_indices")
        sparse = onnx.helper.make_sparse_tensor(values, indices, [4])
        model.graph.sparse_initializer.append(sparse)
    return change


def constant_sparse_outside(location: str) -> Any:
    def change(model: onnx.ModelProto) -> None:
        graph = onnx.ModelProto()
        sparse_outside(location)(graph)
        sparse = graph.graph.sparse_initializer[0]
        node = onnx.helper.make_node("Constant", [], ["sparse_constant"], sparse_value=sparse)
        model.graph.node.insert(0, node)
    return change


@pytest.mark.parametrize("change", [sparse_outside, constant_sparse_outside], ids=["initializer", "constant"])
def test_sparse_tensors_are_walked_by_the_external_data_check(change, workspace, tmp_path, capsys) -> None:
    package, sandbox = workspace
    edit_graph(package, "embed.onnx", change("../outside.bin"))
    assert_every_verb_refuses(package, tmp_path, sandbox, capsys, "location '../outside.bin' escapes the package")


@pytest.mark.parametrize(("change", "message"), [
    (lambda m: m["text_config"].update(eos_token_id="end"), "text_config.eos_token_id"),
    (lambda m: m["text_config"].update(vocab_size=-1), "text_config.vocab_size: must be in"),
    (lambda m: m["cache"][0].update(past="past.0.key"), "cache[0].past: must be a list"),
    (lambda m: m["files"]["embed.onnx"].update(bytes="12"), "files.embed.onnx.bytes: must be an integer"),
    (lambda m: m["graphs"]["embed"].update(file=7), "graphs.embed.file: must be a string"),
    (lambda m: m["token_ids"].update(image_token_id=[1]), "token_ids.image_token_id: must be an integer"),
    (lambda m: m.update(ple={"tables": 3}), "ple.file: is missing"),
], ids=["eos-string", "vocab-negative", "cache-past-string", "bytes-string", "graph-file-int", "token-id-list",
        "ple-no-file"])
def test_malformed_manifest_values_are_one_line_errors(change, message, workspace, tmp_path, capsys) -> None:
    package, sandbox = workspace
    edit_manifest(package, change)
    assert_every_verb_refuses(package, tmp_path, sandbox, capsys, message)


HOSTILE_VALUES = st.one_of(
    st.sampled_from(["../victim.onnx", "/etc/passwd", "", "..", "a/../../secret.onnx", "x\\..\\y", "~/x",
                     "embed.onnx", "ple.data", "\x00", "nan"]),
    st.integers(min_value=-(1 << 70), max_value=1 << 70), st.floats(allow_nan=True), st.booleans(), st.none(),
    st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.sampled_from(["file", "bytes"]), st.integers(), max_size=2),
)


def leaf_paths(value: Any, path: tuple = ()) -> list[tuple]:
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in leaf_paths(v, (*path, k))] or [path]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in leaf_paths(v, (*path, i))] or [path]
    return [path]


def set_path(document: Any, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        document = document[key]
    document[path[-1]] = value


def mutate_manifest_and_run(package: Path, tmp_path: Path, sandbox: Sandbox, capsys, data: st.DataObject) -> None:
    pristine = json.loads((package / MANIFEST).read_text())
    manifest = json.loads(json.dumps(pristine))
    paths = [p for p in leaf_paths(manifest) if p and p[0] not in ("tool", "libraries", "source")]
    for _ in range(data.draw(st.integers(1, 3))):
        set_path(manifest, data.draw(st.sampled_from(paths)), data.draw(HOSTILE_VALUES))
    (package / MANIFEST).write_text(json.dumps(manifest))
    try:
        for argv, out in verbs(package, tmp_path)[:2]:
            before = sandbox.listing()
            code = main(argv)
            err = capsys.readouterr().err
            assert code in (0, 2), err
            assert "Traceback" not in err and "internal error" not in err, err
            if code == 2:
                assert err.count("\n") == 1 and (out is None or not out.exists()), err
            elif out is not None:
                shutil.rmtree(out)
            assert not sandbox.untouched() and sandbox.listing() <= before, err
            assert "SECRET-SENTINEL" not in err
        assert main(["verify", str(package), "--quiet"]) in (0, 1)
        assert "Traceback" not in capsys.readouterr().err
    finally:
        (package / MANIFEST).write_text(json.dumps(pristine))


@FAST
@given(data=st.data())
def test_manifest_fuzz(workspace, tmp_path, capsys, data) -> None:
    package, sandbox = workspace
    mutate_manifest_and_run(package, tmp_path, sandbox, capsys, data)


@pytest.mark.slow
@SLOW
@given(data=st.data())
def test_manifest_fuzz_long(workspace, tmp_path, capsys, data) -> None:
    package, sandbox = workspace
    mutate_manifest_and_run(package, tmp_path, sandbox, capsys, data)


def test_hard_linked_manifest_is_refused(workspace, tmp_path, capsys) -> None:
    package, sandbox = workspace
    os.link(package / MANIFEST, tmp_path / "linked-manifest.json")
    err = refused(["generate", str(package), "--prompt", "x", "--quiet"], capsys, sandbox=sandbox)
    assert "manifest.json has 2 hard links" in err


PARITY = {"precision": "float32", "checkpoint": "ckpt", "quantization": {"recipe": "int4"},
          "text": {"kl_mean": 1e-3, "top1_agreement": 0.99, "bits_per_byte_onnx": 0.9, "bits_per_byte_reference": 0.89,
                   "greedy_match_steps": 60, "greedy_steps": 64},
          "size": {"avg_bits_per_linear_weight": 4.8, "total_bytes": 1000, "ple_bytes": 10},
          "blocks": [{"name": "layer_00", "cosine": 0.999}, {"name": "layer_01", "cosine": 0.998}]}


def report_on(document: Any, tmp_path: Path, capsys) -> tuple[int, str]:
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    (run / "parity.json").write_text(json.dumps(document))
    out = tmp_path / "report"
    code = main(["report", str(run), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code in (0, 2) and "Traceback" not in err and "internal error" not in err, err
    if code == 2:
        assert err.count("\n") == 1 and not out.exists(), err
    else:
        shutil.rmtree(out)
    return code, err


@pytest.mark.parametrize("document", [{}, [], {"blocks": "x"}, {"blocks": [{"name": "a", "cosine": "1"}]},
                                      {**PARITY, "text": {"kl_mean": 1}}])
def test_report_refuses_a_parity_json_it_cannot_read(document, tmp_path, capsys) -> None:
    code, err = report_on(document, tmp_path, capsys)
    assert code == 2 and "parity.json" in err


@FAST
@given(data=st.data())
def test_report_fuzz(tmp_path, capsys, data) -> None:
    document = json.loads(json.dumps(PARITY))
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from([p for p in leaf_paths(document) if p]))
        set_path(document, path, data.draw(HOSTILE_VALUES))
    report_on(document, tmp_path, capsys)


def test_a_graph_with_training_info_is_refused(workspace, tmp_path, capsys) -> None:
    package, sandbox = workspace

    def change(model: onnx.ModelProto) -> None:
        info = model.training_info.add()
        tensor = info.initialization.initializer.add()
        tensor.CopyFrom(onnx.numpy_helper.from_array(np.zeros(1, np.float32), "t"))
        tensor.data_location = onnx.TensorProto.EXTERNAL
        tensor.ClearField("raw_data")
        tensor.external_data.add(key="location", value="../outside.bin")
    edit_graph(package, "embed.onnx", change)
    assert_every_verb_refuses(package, tmp_path, sandbox, capsys, "embed.onnx carries training_info")


# Found by an outside attacker after the tests above were written; each is one case here.
LONG_NAME = "x" * 300


def unknown_domain(model: onnx.ModelProto) -> None:
    node = onnx.helper.make_node("Evil", ["input_ids"], ["evil_out"], domain="evil.domain")
    model.graph.node.append(node)


def recursive_function(model: onnx.ModelProto) -> None:
    call = onnx.helper.make_node("Loop", ["x"], ["y"], domain="local")
    model.functions.append(onnx.helper.make_function("local", "Loop", ["x"], ["y"], [call], []))
    model.graph.node.append(onnx.helper.make_node("Loop", ["input_ids"], ["loop_out"], domain="local"))


def duplicate_location(model: onnx.ModelProto) -> None:
    tensor = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    tensor.external_data.insert(0, onnx.StringStringEntryProto(key="location", value="../outside.bin"))


def scan(model: onnx.ModelProto) -> None:
    body = onnx.helper.make_graph([], "body", [], [])
    model.graph.node.append(onnx.helper.make_node("Scan", [], [], body=body, num_scan_inputs=0, name="spin"))


def many_nodes(model: onnx.ModelProto) -> None:
    names = ["input_ids", *(f"copy_{i}" for i in range(200_001))]
    model.graph.node.extend(onnx.helper.make_node("Identity", [a], [b]) for a, b in itertools.pairwise(names))


def unknown_data_type(model: onnx.ModelProto) -> None:
    model.graph.initializer.append(onnx.TensorProto(name="odd", data_type=99, dims=[1], raw_data=b"\0"))


def name_with_a_newline(model: onnx.ModelProto) -> None:
    tensor = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    tensor.name += "\nSECOND LINE"
    tensor.external_data.add(key="bogus", value="1")


@pytest.mark.parametrize(("change", "message"), [
    (unknown_domain, "is of domain 'evil.domain', which gemma4-onnx never writes"),
    (recursive_function, "function local::Loop calls itself"),
    (duplicate_location, "an external-data key is given twice"),
    (scan, "node 'spin' is a Scan, which gemma4-onnx never writes"),
    (many_nodes, "more than 200000 nodes"),
    (unknown_data_type, "tensor 'odd' has data type 99, which is not an ONNX tensor type"),
    (name_with_a_newline, "\\nSECOND LINE"),
], ids=["unknown-domain", "recursive-function", "duplicate-location", "scan", "many-nodes", "data-type", "newline"])
def test_graphs_onnxruntime_would_refuse_are_refused_by_the_gate(change, message, workspace, tmp_path,
                                                                 capsys) -> None:
    package, sandbox = workspace
    edit_graph(package, "embed.onnx", change)
    assert_every_verb_refuses(package, tmp_path, sandbox, capsys, message)


def test_a_graph_that_fails_inside_onnxruntime_is_one_line(workspace, tmp_path, capsys) -> None:
    package, sandbox = workspace

    def huge_allocation(model: onnx.ModelProto) -> None:  # inputs_embeds + sum(zeros([2^30, 2^30])): same signature
        producer = next(n for n in model.graph.node if "inputs_embeds" in n.output)
        producer.output[list(producer.output).index("inputs_embeds")] = "embeds_before"
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.array([1 << 30, 1 << 30], np.int64),
                                                                    "huge_shape"))
        model.graph.node.extend([
            onnx.helper.make_node("ConstantOfShape", ["huge_shape"], ["huge"]),
            onnx.helper.make_node("ReduceSum", ["huge"], ["huge_sum"], keepdims=0),
            onnx.helper.make_node("Add", ["embeds_before", "huge_sum"], ["inputs_embeds"])])
    edit_graph(package, "embed.onnx", huge_allocation)
    err = refused(["generate", str(package), "--prompt", "def f", "--max-new-tokens", "1", "--quiet"], capsys,
                  sandbox=sandbox)
    assert "onnxruntime cannot run this package" in err


@pytest.mark.parametrize("change", [
    lambda m: m.update(extra=int("9" * 5000)),
    lambda m: m["files"].update({LONG_NAME: {"bytes": 1, "sha256": "0" * 64}}),
], ids=["integer-of-5000-digits", "name-of-300-bytes"])
def test_values_past_python_and_filesystem_limits_are_one_line(change, workspace, tmp_path, capsys) -> None:
    package, sandbox = workspace
    manifest = json.loads((package / MANIFEST).read_text())
    sys.set_int_max_str_digits(0)
    try:
        change(manifest)
        (package / MANIFEST).write_text(json.dumps(manifest))
    finally:
        sys.set_int_max_str_digits(4300)
    for argv, out in verbs(package, tmp_path)[:2]:
        refused(argv, capsys, out=out, sandbox=sandbox)
    assert main(["verify", str(package), "--quiet"]) == 1


@pytest.mark.parametrize("verb", [["verify", "{long}"], ["report", "{long}", "--out", "{out}"],
                                  ["generate", "{long}", "--prompt", "x"], ["export", "{long}", "{out}"],
                                  ["quantize", "{long}", "{out}"], ["mobile", "{long}", "{out}"]])
def test_a_path_argument_too_long_for_the_filesystem_is_one_line(verb, tmp_path, capsys) -> None:
    names = {"long": str(tmp_path / LONG_NAME), "out": str(tmp_path / "out")}
    argv = [a.format(**names) for a in verb]
    code = main([*argv, "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "internal error" not in err, err


def test_report_reads_no_integer_python_cannot_convert(tmp_path, capsys) -> None:
    document = json.loads(json.dumps(PARITY))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "parity.json").write_text(json.dumps(document)[:-1] + ', "huge": ' + "9" * 400 + "}")
    code = main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "report"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "an integer of 400 digits" in err, err


@pytest.mark.parametrize("text", ["bits = " + "9" * 5000, "[[rules]]\nname = 'r'\nmatch = '^([a-z_.0-9]+)*!$'\n",
                                  "[[rules]]\nname = 'r'\nmatch = '(ab|a)+'\n",
                                  "[[rules]]\nname = 'r'\nmatch = '(a)\\1'\n",
                                  "[[rules]]\nname = 'r'\nmatch = '.*.*.*.*.*.*.*.*.*.*.*.*X'\n"],
                         ids=["huge-integer", "nested-repeat", "repeated-alternation", "backreference", "polynomial"])
def test_recipes_that_python_cannot_read_or_would_backtrack_for_ever_are_refused(text, tmp_path, capsys) -> None:
    from gemma4_onnx.quantize.recipe import parse_recipe

    with pytest.raises(UsageError) as raised:
        parse_recipe("r", text if text.startswith("[") else "[default]\n" + text, "r.toml")
    assert "\n" not in str(raised.value)


def test_a_chat_template_format_width_is_refused_before_it_allocates() -> None:
    from gemma4_onnx.runtime.chat_template import render

    with pytest.raises(UsageError, match="formats with a width above"):
        render("{{ '%2000000000d'|format(1) }}", {}, "x")
    assert render("{{ '%3d'|format(7) }}", {}, "x") == "  7"


def test_parity_reads_only_the_start_of_a_large_text(tmp_path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    from gemma4_onnx.quantize.calibration import text_prefix

    tokenizer = Tokenizer(models.WordLevel({"w": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "eval.txt"
    path.write_bytes(b"w " * 200_000 + b"\xff\xfe not UTF-8 past the part read")
    text = text_prefix(path, tokenizer, 4096, "--text")
    assert 4096 <= len(text.split()) < 200_000


STUCK = """
import sys
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper
from gemma4_onnx import cli

body = helper.make_graph([helper.make_node("Identity", ["cond"], ["cond_out"]),
                         helper.make_node("Identity", ["v"], ["v_out"])], "body",
                        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                         helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
                         helper.make_tensor_value_info("v", TensorProto.INT64, [])],
                        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
                         helper.make_tensor_value_info("v_out", TensorProto.INT64, [])])
loop = helper.make_node("Loop", ["trips", "", "trips"], ["out"], body=body)
graph = helper.make_graph([loop], "endless", [helper.make_tensor_value_info("trips", TensorProto.INT64, [])],
                          [helper.make_tensor_value_info("out", TensorProto.INT64, [])])
session = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
                               .SerializeToString())
cli.STUCK_SECONDS = 1.0
cli.signal.signal(cli.signal.SIGTERM, cli.interrupt_on_sigterm)
cli.exit_when_stuck()
print("running", flush=True)
session.run(None, {"trips": np.array(1 << 62, np.int64)})
"""


def test_sigterm_ends_a_command_stuck_inside_onnxruntime(tmp_path) -> None:
    import signal
    import subprocess
    import time

    process = subprocess.Popen([sys.executable, "-c", STUCK], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline() == "running\n"
    time.sleep(1)
    process.send_signal(signal.SIGTERM)
    start = time.monotonic()
    try:
        code = process.wait(timeout=60)
    finally:
        process.kill()
    assert code == 128 + signal.SIGTERM and time.monotonic() - start < 60


@pytest.mark.parametrize("blocks", [lambda b: [], lambda b: [b[0]] * len(b)], ids=["none", "layer-0-repeated"])
def test_a_block_list_that_does_not_cover_the_layers_is_refused(blocks, workspace, tmp_path, capsys) -> None:
    package, sandbox = workspace
    edit_manifest(package, lambda m: m["graphs"].update(blocks=blocks(m["graphs"]["blocks"])))
    err = refused(verbs(package, tmp_path)[1][0], capsys, out=tmp_path / "work" / "q", sandbox=sandbox)
    assert "graphs.blocks must hold layers 0 to" in err


def test_parity_blocks_refuses_a_sequence_no_layer_could_hold(workspace, exported, capsys) -> None:
    package, _ = workspace
    checkpoint, _ = exported("tiny-e2b")
    err = refused(["parity", str(package), "--checkpoint", str(checkpoint), "--blocks", "--sequence", str(10**9),
                   "--out", str(package.parent / "report"), "--quiet"], capsys, out=package.parent / "report")
    assert "--sequence must be in [1, 65536]" in err


def test_report_reads_parity_json_through_no_link(tmp_path, capsys) -> None:
    sandbox = Sandbox(tmp_path / "outside")
    secret = sandbox.add("parity.json", json.dumps({"SECRET-SENTINEL": 1}).encode())
    run = tmp_path / "run"
    run.mkdir()
    (run / "parity.json").symlink_to(secret)
    err = refused(["report", str(run), "--out", str(tmp_path / "report")], capsys, out=tmp_path / "report",
                  sandbox=sandbox)
    assert "is a symbolic link" in err
    (run / "parity.json").unlink()
    os.link(secret, run / "parity.json")
    err = refused(["report", str(run), "--out", str(tmp_path / "report")], capsys, out=tmp_path / "report",
                  sandbox=sandbox)
    assert "has 2 hard links" in err


def test_an_interruption_wrapped_by_a_library_still_ends_quietly_with_143() -> None:
    from gemma4_onnx.cli import Terminated, one_line, outcome

    try:
        try:
            raise Terminated
        except Terminated as interrupted:
            raise RuntimeError("torch's ConversionError around it") from interrupted
    except RuntimeError as wrapped:
        assert outcome(wrapped) == (143, "")
    assert outcome(ValueError("x"))[0] == 1
    assert one_line("a\nb\rc\x1b[2Jd\u2028é") == "a\\nb\\rc\\x1b[2Jd\\u2028é"


def test_files_swapped_after_the_gate_are_never_read(workspace, tmp_path) -> None:
    """A writer racing the verb: after the gate passed, a data file becomes a hard link to a file outside and
    a graph another graph. onnxruntime is handed only what was checked (``runtime/checked_session.py``)."""
    from gemma4_onnx.errors import PackageError
    from gemma4_onnx.runtime.package_files import open_package
    from gemma4_onnx.runtime.text_model import TextModel

    package, sandbox = workspace
    manifest, _ = open_package(package)
    data = package / "embed.data"
    original = data.read_bytes()
    outside = sandbox.add("weights.bin", b"\0" * len(original))
    data.unlink()
    os.link(outside, data)
    with pytest.raises(PackageError, match=r"embed\.data has 2 hard links"):
        TextModel(package, checked_manifest=manifest)
    assert not sandbox.untouched()
    data.unlink()
    data.write_bytes(original)
    graph = package / "decoder.onnx"
    graph.write_bytes((package / "embed.onnx").read_bytes())
    with pytest.raises(PackageError, match=r"decoder\.onnx changed while it was read"):
        TextModel(package, checked_manifest=manifest)
