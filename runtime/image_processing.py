"""Image files → the vision encoder's inputs, as transformers' Gemma 4 image processor (PIL backend) makes them.

Gemma 4 keeps the aspect ratio instead of squashing to a square: the image is resized (up or down,
bicubic) to the largest size whose sides are multiples of patch·pooling (48 px at full size) and whose
patch count fits the soft-token budget (budget·9 patches), rescaled to [0, 1] with no mean/std
normalisation, and cut into row-major patches whose values run (row, column, channel) inside the patch
(architecture doc §3.12). Files are read like transformers' ``load_image``: EXIF orientation applied,
then converted to RGB (alpha dropped).

Bad media: an unreadable or truncated file raises ``MediaError``; images above ``MAX_IMAGE_PIXELS``
are refused from their header, before any pixel is decoded (a 20000×20000 image would need 1.2 GB).
"""

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from gemma4_onnx.errors import MediaError

SOFT_TOKEN_BUDGETS = (70, 140, 280, 560, 1120)
MAX_IMAGE_PIXELS = 100_000_000  # 10000×10000: larger images are refused, not clamped


@dataclass(frozen=True)
class ImagePatches:
    """One image: pixel_values [P, 3·p²] float32, positions [P, 2] int64 (x, y; −1 where padded)."""

    pixel_values: np.ndarray
    positions: np.ndarray
    soft_tokens: int  # valid soft tokens this image yields
    size: tuple[int, int]  # (height, width) after resizing


def target_size(height: int, width: int, patch_size: int, max_patches: int, pooling: int) -> tuple[int, int]:
    """The resized (height, width): transformers' ``get_aspect_ratio_preserving_size``."""
    target_px = max_patches * patch_size ** 2
    factor = math.sqrt(target_px / (height * width))
    side = pooling * patch_size
    new_height = math.floor(factor * height / side) * side
    new_width = math.floor(factor * width / side) * side
    if new_height == 0 and new_width == 0:
        raise MediaError(f"a {height}×{width} image cannot be resized into a {side}-pixel grid")
    longest = (max_patches // pooling ** 2) * side
    if new_height == 0:
        new_height, new_width = side, min(math.floor(width / height) * side, longest)
    elif new_width == 0:
        new_height, new_width = min(math.floor(height / width) * side, longest), side
    if new_height * new_width > target_px:
        raise MediaError(f"a {height}×{width} image does not fit {max_patches} patches of {patch_size} px")
    return new_height, new_width


def load_image(path: Path) -> Image.Image:
    """The file as an RGB image, EXIF orientation applied; ``MediaError`` for anything unreadable or huge."""
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"image {path} does not exist")
    try:
        with warnings.catch_warnings():  # sizes are checked here, below PIL's own warning threshold
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise MediaError(f"image {path} is refused: above {MAX_IMAGE_PIXELS / 1e6:.0f} MP ({width}×{height}); "
                             "downscale it first")
        image.load()
        return ImageOps.exif_transpose(image).convert("RGB")
    except MediaError:
        raise
    except Image.DecompressionBombError as exc:
        raise MediaError(f"image {path} is refused: above {MAX_IMAGE_PIXELS / 1e6:.0f} MP ({exc}); "
                         "downscale it first") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise MediaError(f"image {path} is not a readable image ({exc})") from None


def image_patches(image: Image.Image, budget: int, patch_size: int, pooling: int, pad: bool = True) -> ImagePatches:
    """Resize, rescale and patchify ``image`` for ``budget`` soft tokens; ``pad`` fills to budget·pooling²
    patches as transformers does (the vision graph also runs unpadded: pad patches never change valid ones)."""
    if budget not in SOFT_TOKEN_BUDGETS:
        raise MediaError(f"--image-budget must be one of {', '.join(map(str, SOFT_TOKEN_BUDGETS))}, got {budget}")
    max_patches = budget * pooling ** 2
    height, width = target_size(image.height, image.width, patch_size, max_patches, pooling)
    if (height, width) != (image.height, image.width):
        image = image.resize((width, height), resample=Image.Resampling.BICUBIC)
    pixels = (np.asarray(image, dtype=np.uint8).astype(np.float64) * (1 / 255)).astype(np.float32)
    rows, cols = height // patch_size, width // patch_size
    patches = pixels.reshape(rows, patch_size, cols, patch_size, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, -1)
    grid_x, grid_y = np.meshgrid(np.arange(cols), np.arange(rows), indexing="xy")
    positions = np.stack([grid_x, grid_y], axis=-1).reshape(rows * cols, 2).astype(np.int64)
    if pad and rows * cols < max_patches:
        extra = max_patches - rows * cols
        patches = np.concatenate([patches, np.zeros((extra, patches.shape[1]), np.float32)])
        positions = np.concatenate([positions, np.full((extra, 2), -1, np.int64)])
    return ImagePatches(patches, positions, rows * cols // pooling ** 2, (height, width))
