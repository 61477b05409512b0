"""generate wraps the prompt in the checkpoint's chat template as transformers' apply_chat_template does (same
ids), carries the template through export, and leaves it out with --raw or when the checkpoint has none."""

import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from gemma4_onnx.cli import main
from gemma4_onnx.errors import UsageError
from gemma4_onnx.exporter.package import export_package
from gemma4_onnx.graphs.manifest import read_manifest
from gemma4_onnx.runtime.chat_template import CHAT_TEMPLATE_FILE
from gemma4_onnx.runtime.generate import PackageText, chat_prompt, generate

from test_bad_inputs import reseal

# Gemma's turn format, written for the byte-level test tokenizer (its turn markers are plain text there)
TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}<start_of_turn>{{ role }}\n"
    "{{ message['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
PROMPT = "  Describe <|image|> in one word. "


@pytest.fixture(scope="module")
def chat_package(tiny_checkpoint, tmp_path_factory) -> Path:
    checkpoint = tmp_path_factory.mktemp("chat") / "checkpoint"
    shutil.copytree(tiny_checkpoint("tiny-e2b"), checkpoint)
    (checkpoint / CHAT_TEMPLATE_FILE).write_text(TEMPLATE)
    return export_package(str(checkpoint), checkpoint.parent / "package")


def package_text(package: Path) -> PackageText:
    return PackageText.read(package, read_manifest(package))


def test_template_gives_transformers_ids(chat_package: Path) -> None:
    tokenizer = Tokenizer.from_file(str(chat_package / "tokenizer.json"))
    bos, text = chat_prompt(package_text(chat_package), PROMPT)
    ours = bos + tokenizer.encode(text, add_special_tokens=False).ids
    reference = PreTrainedTokenizerFast(tokenizer_file=str(chat_package / "tokenizer.json"), bos_token="<bos>",
                                        chat_template=TEMPLATE)
    theirs = reference.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False)
    assert ours == list(theirs) and ours[0] == 2 and text.endswith("<start_of_turn>model\n")


def test_raw_and_template_free_prompts_are_sent_as_given(chat_package: Path, exported) -> None:
    assert chat_prompt(package_text(chat_package), PROMPT, raw=True) == ([], PROMPT)  # add_bos_token is false
    _, plain = exported("tiny-e2b")
    assert not (plain / CHAT_TEMPLATE_FILE).exists()
    assert chat_prompt(package_text(plain), PROMPT) == ([], PROMPT)


def test_cli_generate_uses_the_template(chat_package: Path, capsys) -> None:
    assert main(["generate", str(chat_package), "--prompt", "hi", "--max-new-tokens", "6"]) == 0
    templated = capsys.readouterr().out
    _, text = chat_prompt(package_text(chat_package), "hi")
    assert templated.strip() == generate(chat_package, text, 6, stream=False, raw=True).strip()


def test_a_broken_template_is_a_one_line_error(chat_package: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(chat_package, broken)
    (broken / CHAT_TEMPLATE_FILE).write_text("{% if %}")
    reseal(broken)
    with pytest.raises(UsageError, match="chat template does not render"):
        generate(broken, "hi", 1, stream=False)
    (broken / CHAT_TEMPLATE_FILE).write_text("{{ raise_exception('no system turns') }}")
    reseal(broken)
    with pytest.raises(UsageError, match="refused the prompt: no system turns"):
        generate(broken, "hi", 1, stream=False)
