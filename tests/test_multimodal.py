"""Multimodal prompts end to end: placeholders, the soft-token merge (PLE context redone on E-models), greedy
tokens and prefill logits against transformers, and ``gemma4-onnx generate --image/--audio``."""

import wave
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gemma4_onnx import tolerances
from gemma4_onnx.cli import main
from gemma4_onnx.errors import UsageError
from gemma4_onnx.runtime.audio_features import AudioFeatures, log_mel
from gemma4_onnx.runtime.image_processing import ImagePatches, image_patches
from gemma4_onnx.runtime.multimodal import AUDIO, IMAGE, TEXT, MultimodalModel, Prompt, build_prompt, image_blocks

TOKENS = {"boi_token_id": 250, "eoi_token_id": 251, "image_token_id": 252, "audio_token_id": 253,
          "boa_token_id": 254, "eoa_token_index": 255}
CASES = [("tiny-e2b", "image"), ("tiny-e2b", "audio"), ("tiny-31b", "image"),
         pytest.param("tiny-e4b", "image", marks=pytest.mark.slow),
         pytest.param("tiny-e4b", "audio", marks=pytest.mark.slow),
         pytest.param("tiny-26b-a4b", "image", marks=pytest.mark.slow)]


def encode(text: str) -> list[int]:
    """The tiny checkpoints' byte-level tokenizer: byte b is id b + 3."""
    return [b + 3 for b in text.encode()]


def fake_image(tokens: int) -> ImagePatches:
    return ImagePatches(np.zeros((tokens * 9, 48), np.float32), np.zeros((tokens * 9, 2), np.int64), tokens, (0, 0))


def fake_clip(tokens: int) -> AudioFeatures:
    return AudioFeatures(np.zeros((1, 4 * tokens, 128), np.float32), np.ones((1, 4 * tokens), bool), tokens, False)


def test_prompt_layout() -> None:
    marked = build_prompt(encode, [2], "a<|image|>b<|audio|>", TOKENS, [fake_image(2)], [fake_clip(1)])
    assert marked.ids == [2, *encode("a"), 250, 252, 252, 251, *encode("b"), 254, 253, 255]
    assert marked.types == [TEXT, TEXT, TEXT, IMAGE, IMAGE, TEXT, TEXT, TEXT, AUDIO, TEXT]
    unmarked = build_prompt(encode, [], "hi", TOKENS, [fake_image(1)], [fake_clip(1)])
    assert unmarked.ids == [250, 252, 251, 254, 253, 255, *encode("hi")]
    with pytest.raises(UsageError, match="marks 2 <\\|image\\|>"):
        build_prompt(encode, [], "<|image|><|image|>", TOKENS, [fake_image(1)], [])


def media(kind: str, model: MultimodalModel) -> tuple[list[ImagePatches], list[AudioFeatures]]:
    rng = np.random.default_rng(7)
    if kind == "image":
        entry = model.graphs["vision_encoder"]
        image = Image.fromarray(rng.integers(0, 256, (40, 64, 3), dtype=np.uint8))
        return [image_patches(image, 70, entry["patch_size"], entry["pooling_kernel_size"])], []
    features, mask = log_mel((rng.standard_normal(12_000) * 0.2).astype(np.float32))
    extra = -len(mask) % 4
    features = np.concatenate([features, np.zeros((extra, 128), np.float32)])[None]
    mask = np.concatenate([mask, np.zeros(extra, bool)])[None]
    return [], [AudioFeatures(features, mask, int(mask[0, ::2][::2].sum()), False)]


def reference_logits(reference, prompt: Prompt, images: list[ImagePatches], clips: list[AudioFeatures]) -> np.ndarray:
    import torch

    feeds: dict[str, torch.Tensor] = {"input_ids": torch.tensor([prompt.ids]),
                                      "mm_token_type_ids": torch.tensor([prompt.types])}
    if images:
        feeds["pixel_values"] = torch.from_numpy(np.stack([i.pixel_values for i in images]))
        feeds["image_position_ids"] = torch.from_numpy(np.stack([i.positions for i in images]))
    if clips:
        feeds["input_features"] = torch.from_numpy(clips[0].features)
        feeds["input_features_mask"] = torch.from_numpy(clips[0].mask)
    with torch.no_grad():
        return reference(**feeds).logits[0].numpy()


@pytest.fixture(scope="module")
def references():
    from gemma4_onnx.exporter.checkpoint import Checkpoint
    from gemma4_onnx.exporter.reference import load_reference_model

    loaded = {}

    def get(checkpoint: Path):
        if checkpoint not in loaded:
            loaded[checkpoint] = load_reference_model(Checkpoint.open(checkpoint))
        return loaded[checkpoint]

    return get


@pytest.mark.parametrize(("variant", "kind"), CASES)
def test_generation_matches_transformers(variant: str, kind: str, exported, references) -> None:
    """Prefill logits within the text tolerance and 32 identical greedy tokens; on 26B/31B with transformers'
    bidirectional image blocks on both sides."""
    from gemma4_onnx.exporter.multimodal_reference import greedy

    checkpoint, package = exported(variant)
    model, reference = MultimodalModel(package), references(checkpoint)
    images, clips = media(kind, model)
    prompt = build_prompt(encode, [2], "Describe: ", model.token_ids, images, clips)
    image_tokens = [model.image_soft_tokens(i) for i in images]
    audio_tokens = [model.audio_soft_tokens(c) for c in clips]
    logits = model.text.forward_embedded(model.embedded(prompt, image_tokens, audio_tokens), model.text.empty_cache(1),
                                         image_blocks(prompt.types))
    expected = reference_logits(reference, prompt, images, clips)
    assert float(np.abs(expected - logits[0]).max()) <= tolerances.TEXT_FP32_MAX_ABS_LOGIT_DIFF

    steps = tolerances.MULTIMODAL_GREEDY_STEPS
    media_feeds = {}
    if images:
        media_feeds.update(pixel_values=np.stack([i.pixel_values for i in images]),
                           positions=np.stack([i.positions for i in images]))
    if clips:
        media_feeds.update(features=clips[0].features, mask=clips[0].mask)
    assert model.greedy(prompt, image_tokens, audio_tokens, steps) == greedy(reference, prompt.ids, prompt.types,
                                                                              steps, **media_feeds)


@pytest.mark.parametrize("variant", ["tiny-31b", "tiny-26b-a4b"])
def test_image_blocks_are_what_makes_the_match(variant: str, exported, references) -> None:
    """The bidirectional image mask is needed: the same decoder run causally (image_blocks left at its
    default) misses transformers' logits by more than the tolerance on the image tokens, and E-model
    decoders do not take image_blocks (their images attend causally, as transformers does)."""
    checkpoint, package = exported(variant)
    model = MultimodalModel(package)
    images, _ = media("image", model)
    prompt = build_prompt(encode, [2], "Describe: ", model.token_ids, images, [])
    embedded = model.embedded(prompt, [model.image_soft_tokens(images[0])], [])
    causal = model.text.forward_embedded(embedded, model.text.empty_cache(1))
    expected = reference_logits(references(checkpoint), prompt, images, [])
    assert model.text.takes_image_blocks
    assert float(np.abs(expected - causal[0]).max()) > 10 * tolerances.TEXT_FP32_MAX_ABS_LOGIT_DIFF
    assert not MultimodalModel(exported("tiny-e2b")[1]).text.takes_image_blocks


def test_image_block_numbering() -> None:
    assert image_blocks([0, 0, 1, 1, 0, 1, 3, 3, 2, 2, 1, 0]).tolist() == [[-1, -1, 0, 0, -1, 1, -1, -1, 2, 2, 2, -1]]


def test_cli_generate_with_image_and_audio(exported, tmp_path: Path, capsys) -> None:
    _, package = exported("tiny-e2b")
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)).save(tmp_path / "cat.png")
    with wave.open(str(tmp_path / "hello.wav"), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(16_000)
        wav.writeframes((rng.standard_normal(8000) * 3000).astype("<i2").tobytes())
    argv = ["generate", str(package), "--prompt", "<|image|> then <|audio|>?", "--image", str(tmp_path / "cat.png"),
            "--audio", str(tmp_path / "hello.wav"), "--image-budget", "70", "--max-new-tokens", "4"]
    assert main(argv) == 0
    (tmp_path / "bad.png").write_bytes(b"not a png")
    assert main(["generate", str(package), "--prompt", "hi", "--image", str(tmp_path / "bad.png")]) == 2
    assert "is not a readable image" in capsys.readouterr().err


def test_parity_sections(exported) -> None:
    """The vision and audio sections ``gemma4-onnx parity`` reports, and their fp32 checks."""
    from gemma4_onnx.multimodal_parity import multimodal_checks, multimodal_parity

    checkpoint, package = exported("tiny-e2b")
    result = multimodal_parity(package, checkpoint, encode, [2], steps=8)
    assert [b["budget"] for b in result["vision"]["budgets"]] == [70, 140, 280, 560, 1120]
    assert "skipped" in result["vision"]["budgets"][-1]  # tiny: 64-entry position table
    assert result["audio"]["cosine"] > 0.99999
    checks = multimodal_checks(result)
    assert len(checks) == 4 and all(c["passed"] for c in checks), checks
