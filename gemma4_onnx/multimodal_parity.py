"""The ``vision`` and ``audio`` sections of ``parity.json``: soft tokens of the package's encoders against
transformers (every image budget; one clip), and greedy agreement after an image+text and an audio+text
prompt. Synthetic media (a seeded non-square image, a chirp), so no file is needed. On 26B-A4B/31B both
sides attend bidirectionally within the image on sliding layers.
"""

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from gemma4_onnx import tolerances
from gemma4_onnx.runtime.audio_features import AudioFeatures, log_mel
from gemma4_onnx.runtime.image_processing import SOFT_TOKEN_BUDGETS, image_patches
from gemma4_onnx.runtime.multimodal import MultimodalModel, build_prompt
from gemma4_onnx.runtime.parity import block_parity, greedy_match_steps

PROMPT = "Describe this: "


def synthetic_image(height: int = 300, width: int = 500) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(0).integers(0, 64, (height, width, 3))
    rgb = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], -1) + noise
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def synthetic_clip(seconds: float = 1.5) -> AudioFeatures:
    t = np.arange(int(16_000 * seconds)) / 16_000
    features, mask = log_mel((0.3 * np.sin(2 * np.pi * (200 + 600 * t) * t)).astype(np.float32))
    extra = -len(mask) % 4
    features = np.concatenate([features, np.zeros((extra, 128), np.float32)])[None]
    mask = np.concatenate([mask, np.zeros(extra, bool)])[None]
    return AudioFeatures(features, mask, int(mask[0, ::2][::2].sum()), False)


def multimodal_parity(model_dir: Path, checkpoint: Path, encode: Any, bos: list[int], steps: int) -> dict[str, Any]:
    """{"vision": …, "audio": …} for the towers the package has (absent ones are None)."""
    from gemma4_onnx.exporter import multimodal_reference as reference
    from gemma4_onnx.exporter.checkpoint import Checkpoint
    from gemma4_onnx.exporter.reference import load_reference_model

    model = MultimodalModel(model_dir)
    torch_model = load_reference_model(Checkpoint.open(checkpoint))
    result: dict[str, Any] = {"vision": None, "audio": None}
    if "vision_encoder" in model.graphs:
        entry = model.graphs["vision_encoder"]
        budgets = []
        for budget in SOFT_TOKEN_BUDGETS:
            patches = image_patches(synthetic_image(), budget, entry["patch_size"], entry["pooling_kernel_size"])
            if int(patches.positions.max()) >= entry.get("position_embedding_size", 1 << 30):
                budgets.append({"budget": budget, "skipped": "the patch grid exceeds the model's position table"})
                continue
            expected = reference.image_soft_tokens(torch_model, patches.pixel_values[None], patches.positions[None])[0]
            budgets.append({"budget": budget, "soft_tokens": patches.soft_tokens,
                            **_soft_token_stats(expected, model.image_soft_tokens(patches))})
        patches = image_patches(synthetic_image(), 70, entry["patch_size"], entry["pooling_kernel_size"])
        prompt = build_prompt(encode, bos, PROMPT, model.token_ids, [patches], [])
        ours = model.greedy(prompt, [model.image_soft_tokens(patches)], [], steps)
        theirs = reference.greedy(torch_model, prompt.ids, prompt.types, steps,
                                  pixel_values=patches.pixel_values[None], positions=patches.positions[None])
        result["vision"] = {"budgets": budgets, **_greedy(ours, theirs, steps)}
    if "audio_encoder" in model.graphs:
        clip = synthetic_clip()
        expected = reference.audio_soft_tokens(torch_model, clip.features, clip.mask)
        actual = model.audio_soft_tokens(clip)
        prompt = build_prompt(encode, bos, PROMPT, model.token_ids, [], [clip])
        ours = model.greedy(prompt, [], [actual], steps)
        theirs = reference.greedy(torch_model, prompt.ids, prompt.types, steps, features=clip.features,
                                  mask=clip.mask)
        result["audio"] = {"soft_tokens": clip.soft_tokens, **_soft_token_stats(expected, actual),
                           **_greedy(ours, theirs, steps)}
    return result


def _soft_token_stats(expected: np.ndarray, actual: np.ndarray) -> dict[str, Any]:
    if expected.shape != actual.shape:
        return {"max_abs_diff": float("inf"), "relative": float("inf"), "cosine": 0.0}
    stats = block_parity("soft_tokens", expected, actual)
    return {"max_abs_diff": stats["max_abs_diff"], "cosine": stats["cosine"],
            "relative": float(np.abs(expected - actual).max() / max(float(np.abs(expected).max()), 1e-30))}


def _greedy(ours: list[int], theirs: list[int], steps: int) -> dict[str, Any]:
    return {"greedy_steps": steps, "greedy_match_steps": greedy_match_steps(theirs, ours),
            "greedy_reference": theirs, "greedy_onnx": ours}


def multimodal_checks(result: dict[str, Any]) -> list[dict[str, Any]]:
    """fp32 checks of the sections (the issue's gates)."""
    checks = []
    vision, audio = result.get("vision"), result.get("audio")
    if vision:
        worst = max((b["relative"] for b in vision["budgets"] if "relative" in b), default=float("inf"))
        checks += [(f"vision.budgets[*].relative <= {tolerances.SOFT_TOKEN_FP32_RELATIVE}",
                    worst <= tolerances.SOFT_TOKEN_FP32_RELATIVE),
                   ("vision.greedy_match_steps == vision.greedy_steps",
                    vision["greedy_match_steps"] == vision["greedy_steps"])]
    if audio:
        checks += [(f"audio.relative <= {tolerances.SOFT_TOKEN_FP32_RELATIVE}",
                    audio["relative"] <= tolerances.SOFT_TOKEN_FP32_RELATIVE),
                   ("audio.greedy_match_steps == audio.greedy_steps",
                    audio["greedy_match_steps"] == audio["greedy_steps"])]
    return [{"check": name, "passed": bool(ok)} for name, ok in checks]
