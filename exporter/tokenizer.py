"""The byte-level tokenizer written next to random checkpoints: id 0 <pad>, 1 <eos>, 2 <bos>, and byte b
at id b + 3, the same layout as the trained fixtures. Real checkpoints bring their own tokenizer."""

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers.pre_tokenizers import ByteLevel

SPECIALS = ("<pad>", "<eos>", "<bos>")
BYTE_OFFSET = len(SPECIALS)


def byte_level_tokenizer() -> Tokenizer:
    alphabet = ByteLevel.alphabet()
    byte_to_char = {b: c for b, c in zip(range(256), _bytes_to_unicode(), strict=True)}
    assert set(byte_to_char.values()) == set(alphabet)
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    vocab.update({byte_to_char[b]: b + BYTE_OFFSET for b in range(256)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIALS))
    return tokenizer


def _bytes_to_unicode() -> list[str]:
    """GPT-2's printable stand-in for each byte, the alphabet ByteLevel pre-tokenization emits."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def write_tokenizer(directory: Path, max_length: int) -> None:
    byte_level_tokenizer().save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        '{\n "tokenizer_class": "PreTrainedTokenizerFast",\n "bos_token": "<bos>",\n "eos_token": "<eos>",\n'
        f' "pad_token": "<pad>",\n "add_bos_token": false,\n "model_max_length": {max_length}\n}}\n'
    )
