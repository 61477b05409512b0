"""Hostile recipes, tokenizer files, chat templates, prompts, calibration text and generation bounds (issue 22):
each is refused with one line naming the file and the field (``hostile.refused``), or bounded, never an
internal error; and nothing outside the package is read. Recipes are refused before the package is read,
so the recipe fuzz runs the real ``quantize`` verb at milliseconds per example; the template and tokenizer
config fuzz runs the real ``generate`` on a copy of the tiny E2B export, resealed after each edit."""

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gemma4_onnx.cli import main
from gemma4_onnx.errors import UsageError
from gemma4_onnx.graphs.manifest import MANIFEST
from gemma4_onnx.quantize.calibration import calibration_file_text
from gemma4_onnx.quantize.recipe import ACTIVATIONS, ALGORITHMS, BITS, BLOCK_SIZES, parse_recipe
from gemma4_onnx.runtime.chat_template import CHAT_TEMPLATE_FILE, TOKENIZER_CONFIG
from gemma4_onnx.runtime.package_files import TOKENIZER

from hostile import FAST, SLOW, Sandbox, refused
from test_bad_inputs import reseal

GENERATE_FAST = settings(FAST, max_examples=8)  # each example builds the model's sessions (~1 s on 2 cores)


# ---------------------------------------------------------------- recipes

def quantize_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], recipe: Path, *extra: str) -> str:
    """``quantize`` with ``recipe`` on a package that is never reached: the recipe is checked first."""
    out = tmp_path / "out"
    return refused(["quantize", str(tmp_path / "no-package"), str(out), "--recipe", str(recipe), *extra], capsys,
                   out=out)


@pytest.mark.parametrize(("text", "problem"), [
    ("default = 5", "[default]: must be a table, got integer 5"),
    ("[default]\nblock_size = 32.0", "block_size must be one of"),
    ("[default]\nbits = 4.0", "bits must be 4, 8"),
    ("[default]\nbits = 9223372036854775807", "bits must be 4, 8"),
    ("[default]\nsymmetric = 'true'", "symmetric must be true or false, got string"),
    ("[default]\nalgorithm = ['rtn']", "algorithm must be one of"),
    ("rules = 5", "rules: must be an array of tables"),
    ("rules = [1]", "rules[0]: must be a table"),
    ("[[rules]]\nmatch = 5", "match must be a"),
    ("[[rules]]\nname = 5\nmatch = 'x'", "name must be a"),
    ("[[rules]]\nname = \"a\\nb\"\nmatch = 'x'", "name must be a printable"),
    ("[[rules]]\nmatch = 'x'\nskip = 'true'", "skip and optional must be true or false"),
    ("[[rules]]\nmatch = 'x'\noptional = 1", "skip and optional must be true or false"),
    ("[[rules]]\nmatch = 'x'\nlayer_types = [1]", "layer_types must be a list of"),
    ("[[rules]]\nmatch = 'x'\nlayer_types = [{}]", "layer_types must be a list of"),
    ("[[rules]]\nmatch = 'x'\nlayers = -1", "layers must be like"),
    ("[[rules]]\nmatch = 'x'\nlayers = '0-99999999999'", "layers must be like"),
    ("[[rules]]\nmatch = 'x'\nlayers = '0-4000000000'", "layers must be like \"0-3,7\" (indices 0 to 2147483647"),
    ("[[rules]]\nmatch = 'x'\nlayers = 1.5", "layers must be like"),
    ("description = 5", "description must be a"),
    ("budget_bits = 1e308", "budget_bits: must be a number of bits"),
    ("budget_bits = nan", "budget_bits: must be a number of bits"),
    ("budget_bits = 0", "budget_bits: must be a number of bits"),
    ("budget_bits = true", "budget_bits: must be a number of bits"),
    ("\"odd\\nkey\" = 1", "unknown key(s) 'odd\\nkey'"),
])
def test_recipe_values_of_the_wrong_type_or_range_are_one_line(tmp_path: Path, capsys, text: str,
                                                               problem: str) -> None:
    recipe = tmp_path / "mine.toml"
    recipe.write_text(text)
    err = quantize_refused(tmp_path, capsys, recipe)
    assert f"recipe file {recipe}: " in err and problem in err, err


def test_recipe_files_that_are_not_text_files_are_one_line(tmp_path: Path, capsys) -> None:
    invalid = tmp_path / "latin1.toml"
    invalid.write_bytes(b"description = \"caf\xe9\"\n")
    assert "not UTF-8 text (byte 0xe9 at offset 18)" in quantize_refused(tmp_path, capsys, invalid)
    folder = tmp_path / "folder.toml"
    folder.mkdir()
    assert "is not a regular file" in quantize_refused(tmp_path, capsys, folder)
    pipe = tmp_path / "pipe.toml"
    os.mkfifo(pipe)
    assert "is not a regular file" in quantize_refused(tmp_path, capsys, pipe)  # never opened: no blocking
    huge = tmp_path / "huge.toml"
    huge.write_text("# padding\n" * 200_000)
    assert "bytes (a recipe has at most" in quantize_refused(tmp_path, capsys, huge)
    assert "does not exist" in quantize_refused(tmp_path, capsys, tmp_path / "missing.toml")


def test_a_huge_layer_range_is_two_integers(tmp_path: Path) -> None:
    start = time.perf_counter()
    recipe = parse_recipe("test", "[[rules]]\nmatch = 'x'\nlayers = '0-2000000000,7'")
    assert time.perf_counter() - start < 0.5  # 0-4000000000 materialised 2.5 GB before failing
    layers = recipe.rules[0].layers
    assert layers is not None and 0 in layers and 2_000_000_000 in layers and 2_000_000_001 not in layers
    assert "3" not in layers and None not in layers


def toml_value(value: Any) -> str:
    """``value`` as a TOML literal (a string or an inline table where TOML has no other form)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


SCALARS = st.one_of(st.booleans(), st.integers(-(1 << 63), (1 << 63) - 1), st.floats(allow_nan=True),
                    st.sampled_from([4, 8, "float", 16, 32, 64, 256, 48, "rtn", "gptq", "hqq", "k-quant", "int8",
                                     "0-3,5", "0-4000000000", "3-1", "sliding", "full", "", ".", "(", "true"]),
                    st.text(max_size=12))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=6)
RULE_KEY = st.sampled_from(["name", "match", "layers", "layer_types", "skip", "optional", "bits", "block_size",
                            "symmetric", "algorithm", "activations", "colour"])
DECISION_KEY = st.sampled_from(["bits", "block_size", "symmetric", "algorithm", "activations", "colour"])


@st.composite
def recipe_texts(draw: st.DrawFn) -> str:
    """A recipe with [default], [[rules]] and top-level keys whose values are any TOML value, most often
    near a valid one."""
    lines = []
    for key in draw(st.lists(st.sampled_from(["description", "budget_bits", "colour"]), max_size=2, unique=True)):
        lines.append(f"{key} = {toml_value(draw(VALUES))}")
    lines.append("[default]")
    for key in draw(st.lists(DECISION_KEY, max_size=3, unique=True)):
        lines.append(f"{key} = {toml_value(draw(VALUES))}")
    for _ in range(draw(st.integers(0, 2))):
        lines.append("[[rules]]")
        lines.append(f"match = {toml_value(draw(st.sampled_from(['q_proj', 'x', '(', 5])))}")
        for key in draw(st.lists(RULE_KEY.filter(lambda k: k != "match"), max_size=3, unique=True)):
            lines.append(f"{key} = {toml_value(draw(VALUES))}")
    return "\n".join(lines) + "\n"


def check_recipe_promise(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str) -> None:
    """Refused as one line by the real ``quantize`` verb, or parsed into values of the right types."""
    recipe = tmp_path / "fuzz.toml"
    recipe.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        parsed = parse_recipe("fuzz", recipe.read_text(encoding="utf-8", errors="replace"))
    except UsageError:
        quantize_refused(tmp_path, capsys, recipe)
        return
    for decision in [parsed.default, *(rule.decide(parsed.default) for rule in parsed.rules)]:
        assert decision.bits is None or (type(decision.bits) is int and decision.bits in BITS)
        assert type(decision.block_size) is int and decision.block_size in BLOCK_SIZES
        assert type(decision.symmetric) is bool
        assert decision.algorithm in ALGORITHMS and decision.activations in ACTIVATIONS
    assert parsed.budget_bits is None or 0 < parsed.budget_bits <= 32
    for rule in parsed.rules:
        rule.matches("model.language_model.layers.3.self_attn.q_proj.weight", 3, {"sliding"})


@FAST
@given(text=recipe_texts())
def test_fuzzed_recipes_are_refused_in_one_line_or_well_typed(tmp_path: Path, capsys, text: str) -> None:
    check_recipe_promise(tmp_path, capsys, text)


@pytest.mark.slow
@SLOW
@given(text=recipe_texts())
def test_fuzzed_recipes_many(tmp_path: Path, capsys, text: str) -> None:
    check_recipe_promise(tmp_path, capsys, text)


# ---------------------------------------------------------------- calibration text

def test_calibration_paths_that_are_not_text_files_are_one_line(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    assert "is not a regular file" in quantize_refused(tmp_path, capsys, Path("int8"), "--calibration", str(folder))
    assert "does not exist" in quantize_refused(tmp_path, capsys, Path("int8"), "--calibration",
                                                str(tmp_path / "missing.txt"))


@pytest.fixture(scope="module")
def package(exported, tmp_path_factory) -> Path:
    """A copy of the tiny E2B fp32 export, edited by the tests below (each reseals what it changes)."""
    _, original = exported("tiny-e2b")
    copy = tmp_path_factory.mktemp("hostile-templates") / "package"
    shutil.copytree(original, copy)
    shutil.copyfile(original / TOKENIZER_CONFIG, copy.parent / TOKENIZER_CONFIG)
    return copy


def restore_side_files(package: Path) -> None:
    """The export's own tokenizer config, and no chat template (the tiny checkpoint has none)."""
    (package / CHAT_TEMPLATE_FILE).unlink(missing_ok=True)
    with_side_file(package, TOKENIZER_CONFIG, (package.parent / TOKENIZER_CONFIG).read_bytes())


def test_calibration_text_is_read_only_as_far_as_the_tokens_need(package: Path, tmp_path: Path) -> None:
    text = tmp_path / "big.txt"
    line = "def f(x):\n    return x * 2  # ünïcödé\n"
    text.write_text(line * (10_000_000 // len(line.encode())))  # 10 MB: read whole, 2.3 GB peak RSS
    start = time.perf_counter()
    kept = calibration_file_text(text, package, 1000)
    assert time.perf_counter() - start < 5 and len(kept) < 300_000
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(package / "tokenizer.json"))
    whole_start = tokenizer.encode(line * 20_000, add_special_tokens=False).ids[:1000]
    assert tokenizer.encode(kept, add_special_tokens=False).ids[:1000] == whole_start
    small = tmp_path / "small.txt"
    small.write_text("short")
    assert calibration_file_text(small, package, 1000) == "short"


def test_calibration_text_must_be_utf8(package: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9 au lait\n" * 10)
    out = tmp_path / "out"
    err = refused(["quantize", str(package), str(out), "--recipe", "int8", "--calibration", str(bad)], capsys,
                  out=out)
    assert "not UTF-8 text (undecodable byte at offset 3)" in err


def test_an_undecodable_byte_split_across_chunks_is_found_at_its_offset(package: Path, tmp_path: Path) -> None:
    bad = tmp_path / "split.txt"
    bad.write_bytes("é".encode() * 40_000 + b"\xff" + b"x" * 100)  # 80 000 bytes: the second chunk holds it
    with pytest.raises(UsageError, match="undecodable byte at offset 80000"):
        calibration_file_text(bad, package, 1_000_000)


# ---------------------------------------------------------------- generate: side files, templates, prompts

def with_side_file(package: Path, name: str, content: str | bytes) -> None:
    path = package / name
    path.unlink(missing_ok=True)
    path.write_bytes(content.encode("utf-8", "surrogatepass") if isinstance(content, str) else content)
    reseal(package)


def generate_refused(package: Path, capsys: pytest.CaptureFixture[str], *args: str,
                     sandbox: Sandbox | None = None) -> str:
    return refused(["generate", str(package), "--max-new-tokens", "1", *(args or ("--prompt", "hi"))], capsys,
                   sandbox=sandbox)


@pytest.mark.parametrize(("template", "problem"), [
    ("{% include 'other.jinja' %}", "uses {% include %} (line 1)"),
    ("{% import 'macros.jinja' as m %}", "uses {% import %}"),
    ("{% from 'macros.jinja' import m %}", "uses {% from … import %}"),
    ("{% extends 'base.jinja' %}", "uses {% extends %}"),
    ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "recurses too deeply"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
     "asks for a range of 100000 items"),
    ("{% set a = range(10000)|list %}{% for i in a %}{% for j in a %}{% endfor %}{% endfor %}",
     "takes more than 2 s to render"),
    ("{% for i in range(10000) %}{{ 'x' * 1000 }}{% endfor %}", "renders more than 1048576 characters"),
    ("{{ 'x' * 1000000000 }}", "repeats a string or list past"),
    ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
     "builds a value of more than"),
    ("{% set ns = namespace(x=9) %}{% for i in range(40) %}{% set ns.x = ns.x * ns.x %}{% endfor %}",
     "computes an integer of more than 4096 bits"),
    ("{{ 2 ** 100000000 }}", "computes an integer of more than 4096 bits"),
    ("{{ 'x'|center(1000000000) }}", "passes the number 1000000000 to a function"),
    ("{{ 'x'.ljust(1000000000) }}", "passes the number 1000000000 to a function"),
    ("{{ '{:>999999999}'.format(1) }}", "formats with a width above"),
    ("{{ '%999999999d' % 1 }}", "formats with a width above"),
    ("{{ range(10**30) }}", "asks for a range of over 2^63 items"),
    ("{{ 1 + 'a' }}", "does not render: TypeError"),
    ("{{ raise_exception('no\\nsystem turns') }}", "refused the prompt: no system turns"),
    ("{% if %}", "does not render"),
])
def test_hostile_templates_are_bounded_one_line_errors(package: Path, capsys, template: str, problem: str) -> None:
    with_side_file(package, CHAT_TEMPLATE_FILE, template)
    start = time.perf_counter()
    err = generate_refused(package, capsys)
    assert time.perf_counter() - start < 20  # the 2 s render limit plus the package gate, on 2 loaded cores
    assert "the package's chat template " in err and problem in err, err
    restore_side_files(package)


@pytest.mark.parametrize(("content", "problem"), [
    ("{not json", "tokenizer_config.json is not valid JSON"),
    ("[1, 2]", "tokenizer_config.json: must be a JSON object, got list"),
    ('{"bos_token": 5}', "tokenizer_config.json: bos_token must be a string or an object"),
    ('{"eos_token": {"content": 5}}', "tokenizer_config.json: eos_token must be a string or an object"),
    ('{"add_bos_token": "yes"}', "tokenizer_config.json: add_bos_token must be true or false, got str"),
    ('{"chat_template": 5}', "tokenizer_config.json: chat_template must be a string or a list"),
    ('{"chat_template": [{"name": "default"}]}', "tokenizer_config.json: chat_template[0]: chat_template must"),
    ('{"chat_template": "{% include \'x\' %}"}', "uses {% include %}"),
    ("[" * 100_000 + "]" * 100_000, "tokenizer_config.json is not valid JSON"),
    (b'{"bos_token": "\xff"}', "tokenizer_config.json is not UTF-8 text (byte 0xff at offset 15)"),
])
def test_invalid_tokenizer_configs_are_one_line(package: Path, capsys, content: str | bytes, problem: str) -> None:
    with_side_file(package, TOKENIZER_CONFIG, content)
    err = generate_refused(package, capsys)
    assert problem in err, err
    restore_side_files(package)


@pytest.mark.parametrize("name", [CHAT_TEMPLATE_FILE, TOKENIZER_CONFIG])
@pytest.mark.parametrize("listed", [True, False])
def test_side_files_linked_outside_are_never_read(package: Path, tmp_path: Path, capsys, name: str,
                                                  listed: bool) -> None:
    sandbox = Sandbox(tmp_path / "outside")
    secret = sandbox.add("secret.jinja", b"SECRET-SENTINEL {{ raise_exception('SECRET-SENTINEL') }}\n")
    (package / name).unlink(missing_ok=True)
    if not listed:
        reseal(package)
    (package / name).symlink_to(secret)
    if listed:
        reseal(package)  # lists the link's target, as an attacker who reseals would; it reads the sentinel
        sandbox.untouched()  # the sentinel's access time set again: from here on, nothing may read it
    err = generate_refused(package, capsys, sandbox=sandbox)
    assert ("symbolic link" in err) if listed else ("not listed in the manifest" in err), err
    (package / name).unlink()
    restore_side_files(package)


def test_invalid_utf8_prompts_are_one_line_and_empty_ones_unchanged(package: Path, capsys) -> None:
    undecodable = b"caf\xe9".decode("utf-8", "surrogateescape")  # what Python makes of such an argv entry
    err = generate_refused(package, capsys, "--prompt", undecodable)
    assert "--prompt is not valid UTF-8 (undecodable byte at character 3)" in err
    assert "the prompt is empty" in generate_refused(package, capsys, "--prompt", "")  # add_bos_token is false


def test_generation_stops_at_the_models_context(package: Path, tmp_path: Path, capsys) -> None:
    short = tmp_path / "short-context"
    shutil.copytree(package, short)
    manifest = json.loads((short / MANIFEST).read_text())
    manifest["text_config"]["max_position_embeddings"] = 12
    (short / MANIFEST).write_text(json.dumps(manifest))
    start = time.perf_counter()
    assert main(["generate", str(short), "--prompt", "hello", "--max-new-tokens", "1000000000"]) == 0
    captured = capsys.readouterr()
    assert time.perf_counter() - start < 60
    assert "note: --max-new-tokens 1000000000 capped at 7: the model's context is 12 tokens" in captured.err
    err = generate_refused(short, capsys, "--prompt", "x" * 12)
    assert "the prompt has 12 tokens, the model's context 12" in err


# ---------------------------------------------------------------- generate fuzz

TEMPLATE_PIECES = st.sampled_from([
    "{{ bos_token }}", "{% for m in messages %}{{ m['content'] }}{% endfor %}", "{{ messages[0].content|trim }}",
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}", "{% for i in range(N) %}x{% endfor %}",
    "{{ 'ab' * N }}", "{{ 'x'|center(N) }}", "{{ N ** N }}", "{% include 'a' %}", "{% extends 'b' %}",
    "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "{{ raise_exception('nope') }}", "{{ undefined.x }}",
    "{{ messages[5] }}", "{{ 1 / 0 }}", "{% set ns = namespace(s='x') %}", "{{ ''.__class__ }}",
    "{{ strftime_now('%Y') }}", "{{ '%dN' % 1 }}", "{% if %}", "text", "{{", "{% for %}", "\n",
])


@st.composite
def templates(draw: st.DrawFn) -> str:
    pieces = draw(st.lists(TEMPLATE_PIECES, min_size=1, max_size=4))
    number = str(draw(st.sampled_from([0, 3, 10_000, 100_000, 10**9, 10**30])))
    return "".join(p.replace("N", number) for p in pieces)


def check_generate_promise(package: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Exit 0, or the hostile-input promise (exit 2, one line, no traceback)."""
    argv = ["generate", str(package), "--prompt", "hi", "--max-new-tokens", "1"]
    start = time.perf_counter()
    code = main(argv)
    err = capsys.readouterr().err
    assert time.perf_counter() - start < 30
    assert code in (0, 2) and "internal error" not in err and "Traceback" not in err, err
    if code == 2:
        assert err.count("\n") == 1, err


@GENERATE_FAST
@given(template=templates())
def test_fuzzed_templates_render_or_fail_in_one_line(package: Path, capsys, template: str) -> None:
    with_side_file(package, CHAT_TEMPLATE_FILE, template)
    check_generate_promise(package, capsys)
    restore_side_files(package)


CONFIG_VALUES = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8),
                          st.sampled_from(["<bos>", "<eos>", "{{ bos_token }}x", "{% include 'a' %}"]),
                          st.fixed_dictionaries({"content": st.one_of(st.text(max_size=5), st.integers())}),
                          st.lists(st.fixed_dictionaries({"name": st.sampled_from(["default", 5]),
                                                          "template": st.sampled_from(["x", 5])}), max_size=2))


@GENERATE_FAST
@given(config=st.dictionaries(st.sampled_from(["bos_token", "eos_token", "add_bos_token", "chat_template",
                                               "pad_token"]), CONFIG_VALUES, max_size=4))
def test_fuzzed_tokenizer_configs_work_or_fail_in_one_line(package: Path, capsys, config: dict[str, Any]) -> None:
    with_side_file(package, TOKENIZER_CONFIG, json.dumps(config))
    check_generate_promise(package, capsys)
    restore_side_files(package)


@pytest.mark.slow
@SLOW
@given(template=templates())
def test_fuzzed_templates_many(package: Path, capsys, template: str) -> None:
    with_side_file(package, CHAT_TEMPLATE_FILE, template)
    check_generate_promise(package, capsys)
    restore_side_files(package)


def test_a_tokenizer_whose_rust_code_panics_is_one_line_on_stderr(package: Path, tmp_path: Path, capfd) -> None:
    """Oniguruma's retry limit on a pre-tokenizer regex panics in Rust, whose hook writes its own lines on
    file descriptor 2 (capfd sees them, capsys would not)."""
    original = (package / TOKENIZER).read_bytes()
    tokenizer = json.loads(original)
    tokenizer["pre_tokenizer"] = {"type": "Split", "pattern": {"Regex": "(a|aa)+$"}, "behavior": "Isolated",
                                  "invert": False}
    with_side_file(package, TOKENIZER, json.dumps(tokenizer))
    attack = "a" * 5000 + "b"
    err = generate_refused(package, capfd, "--raw", "--prompt", attack)
    assert "tokenizer.json failed on this text (Onig: Regex search error" in err and "panicked" not in err, err
    calibration = tmp_path / "calibration.txt"
    calibration.write_text(attack)
    out = tmp_path / "out"
    err = refused(["quantize", str(package), str(out), "--recipe", "int8", "--calibration", str(calibration)],
                  capfd, out=out)
    assert "failed on this text" in err and "panicked" not in err, err
    with_side_file(package, TOKENIZER, original)
