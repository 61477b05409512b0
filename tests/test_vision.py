"""Vision: preprocessing against transformers' Gemma 4 image processor, ``vision_encoder.onnx`` against the
reference at every soft-token budget, bad image files, and the full-size tower structure."""

import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gemma4_onnx import tolerances
from gemma4_onnx.errors import MediaError, UsageError
from gemma4_onnx.runtime.image_processing import SOFT_TOKEN_BUDGETS, image_patches, load_image
from gemma4_onnx.runtime.multimodal import Encoders, MultimodalModel

# tiny-e4b and tiny-26b-a4b carry the same tower configs as tiny-e2b and tiny-31b (clipped vs standardised).
VARIANTS = ["tiny-e2b", "tiny-31b", pytest.param("tiny-e4b", marks=pytest.mark.slow),
            pytest.param("tiny-26b-a4b", marks=pytest.mark.slow)]
SHAPES = {"tall": (2000, 300), "wide": (300, 2000), "tiny": (3, 5), "huge": (4000, 3000), "one-pixel-high": (1, 700)}


def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def relative(expected: np.ndarray, actual: np.ndarray) -> float:
    return float(np.abs(expected - actual).max() / np.abs(expected).max())


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("patch_size", [16, 4])
def test_preprocessing_matches_transformers(shape: tuple[int, int], patch_size: int) -> None:
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    image = random_image(*shape)
    for budget in SOFT_TOKEN_BUDGETS:
        expected = Gemma4ImageProcessorPil(max_soft_tokens=budget, patch_size=patch_size)(image, return_tensors="np")
        ours = image_patches(image, budget, patch_size, 3)
        np.testing.assert_array_equal(ours.pixel_values, expected["pixel_values"][0])
        np.testing.assert_array_equal(ours.positions, expected["image_position_ids"][0])
        assert ours.soft_tokens == expected["num_soft_tokens_per_image"][0]


def test_files_load_like_transformers(tmp_path: Path) -> None:
    """EXIF orientation and alpha handled as transformers' load_image does (RGBA PNG, rotated JPEG)."""
    from transformers.image_utils import load_image as hf_load_image

    rgba = Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 50, 4), dtype=np.uint8), "RGBA")
    rgba.save(tmp_path / "alpha.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90°
    random_image(30, 50).save(tmp_path / "rotated.jpg", exif=exif)
    for name in ("alpha.png", "rotated.jpg"):
        ours, theirs = load_image(tmp_path / name), hf_load_image(str(tmp_path / name))
        assert ours.size == theirs.size
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(("content", "message"), [
    (b"", "not a readable image"),
    (b"\x89PNG\r\n\x1a\n garbage", "not a readable image"),
    (None, "not a readable image"),  # a real PNG cut in half
    (_png_header_only(20000, 20000), "refused: above 100 MP"),
], ids=["zero-byte", "corrupt", "truncated", "20000x20000"])
def test_bad_images_are_refused(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "bad.png"
    if content is None:
        random_image(64, 64).save(path)
        content = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(content)
    with pytest.raises(MediaError, match=message):
        load_image(path)


def test_bad_budget_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(MediaError, match="does not exist"):
        load_image(tmp_path / "absent.png")
    with pytest.raises(MediaError, match="must be one of 70, 140, 280, 560, 1120"):
        image_patches(random_image(10, 10), 100, 16, 3)


def check_soft_tokens(model: Encoders, reference, budgets: tuple[int, ...], shape: tuple[int, int]) -> None:
    """Per budget, a non-square image (both orientations), padded as transformers feeds it and unpadded as
    the runtime does: the reference's soft tokens within the fp32 tolerance."""
    from gemma4_onnx.exporter.multimodal_reference import image_soft_tokens

    entry = model.graphs["vision_encoder"]
    for index, budget in enumerate(budgets):
        image = random_image(*(shape if index % 2 else shape[::-1]), seed=index)
        padded = image_patches(image, budget, entry["patch_size"], entry["pooling_kernel_size"])
        expected = image_soft_tokens(reference, padded.pixel_values[None], padded.positions[None])[0]
        unpadded = image_patches(image, budget, entry["patch_size"], entry["pooling_kernel_size"], pad=False)
        for patches in (padded, unpadded):
            actual = model.image_soft_tokens(patches)
            assert actual.shape == expected.shape == (padded.soft_tokens, expected.shape[1])
            assert relative(expected, actual) <= tolerances.SOFT_TOKEN_FP32_RELATIVE, budget


@pytest.mark.parametrize("variant", VARIANTS)
def test_soft_tokens_match_transformers(variant: str, exported) -> None:
    """The packaged tower at the budgets whose patch grids fit the tiny configs' 64-entry position table."""
    from gemma4_onnx.exporter.checkpoint import Checkpoint
    from gemma4_onnx.exporter.reference import load_reference_model

    checkpoint, package = exported(variant)
    model = MultimodalModel(package)
    assert model.graphs["vision_encoder"]["soft_token_budgets"] == list(SOFT_TOKEN_BUDGETS)
    check_soft_tokens(model, load_reference_model(Checkpoint.open(checkpoint)), (70, 140, 280), (37, 52))
    too_wide = image_patches(random_image(23, 41), 560, 4, 3, pad=False)
    with pytest.raises(UsageError, match="more than 64 patches on a side"):
        model.image_soft_tokens(too_wide)


def widened_checkpoint(source: Path, out: Path, size: int) -> Path:
    """``source`` with a ``size``-entry position table (fresh random rows): room for 560/1120-token grids."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, out)
    config = json.loads((out / "config.json").read_text())
    config["vision_config"]["position_embedding_size"] = size
    (out / "config.json").write_text(json.dumps(config))
    name = "model.vision_tower.patch_embedder.position_embedding_table"
    for shard in out.glob("model-*.safetensors"):
        tensors = load_file(shard)
        if name in tensors:
            generator = torch.Generator().manual_seed(0)
            tensors[name] = torch.randn(2, size, tensors[name].shape[-1], generator=generator)
            save_file(tensors, shard, metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("variant", ["tiny-e2b", pytest.param("tiny-31b", marks=pytest.mark.slow)],
                         ids=["clipped", "standardized"])
def test_soft_tokens_at_large_budgets(variant: str, tiny_checkpoint, tmp_path: Path) -> None:
    """560 and 1120 soft tokens need grids of up to ~115 patches a side: the tower alone, exported from a
    checkpoint whose position table has 128 rows."""
    from gemma4_onnx.exporter.checkpoint import Checkpoint
    from gemma4_onnx.exporter.package import _Writer
    from gemma4_onnx.exporter.reference import load_reference_model
    from gemma4_onnx.exporter.towers import export_towers
    from gemma4_onnx.exporter.weights import CheckpointWeights
    from gemma4_onnx.graphs.manifest import write_manifest

    checkpoint = widened_checkpoint(tiny_checkpoint(variant), tmp_path / "checkpoint", 128)
    weights = CheckpointWeights(checkpoint)
    package = tmp_path / "package"
    package.mkdir()
    writer = _Writer(package, structure_only=False, target="portable")
    graphs = export_towers(weights, package, writer)
    writer.close()
    manifest = write_manifest(package, {"graphs": graphs})
    reference = load_reference_model(Checkpoint.open(checkpoint))
    check_soft_tokens(Encoders(package, manifest), reference, (560, 1120), (40, 50))


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["e2b", "31b"])
def test_full_size_tower_structure(variant: str, tmp_path: Path) -> None:
    """Full-size towers trace and their graphs carry the right shapes (structure only: no weight data)."""
    import onnx

    from gemma4_onnx.exporter.package import _Writer
    from gemma4_onnx.exporter.towers import export_towers
    from gemma4_onnx.exporter.weights import RandomWeights

    weights = RandomWeights(variant)
    writer = _Writer(tmp_path, structure_only=True, target="portable")
    graphs = export_towers(weights, tmp_path, writer)
    writer.close()
    vision = graphs["vision_encoder"]
    assert vision["inputs"][0]["shape"] == ["images", "patches", 768]
    assert vision["outputs"][0]["shape"] == ["images", "soft_slots", weights.config["text_config"]["hidden_size"]]
    names = {t.name for t in onnx.load(tmp_path / vision["file"], load_external_data=False).graph.initializer}
    assert "model.vision_tower.encoder.layers.0.self_attn.q_proj.linear.weight" in names
    assert ("audio_encoder" in graphs) == (variant == "e2b")
