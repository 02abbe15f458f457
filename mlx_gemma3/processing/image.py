"""Images for Gemma 3: open any source as RGB, pan & scan crops, and pixel values as transformers makes them."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ..errors import Gemma3Error

__all__ = ["process_images"]

# Refused before decoding: a small file can claim a huge size (a decompression bomb).
MAX_PIXELS = 64_000_000
ONE_IMAGE_TYPES = (str, Path, bytes, bytearray, memoryview, Image.Image, np.ndarray)  # what open_image takes


def open_image(source, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An RGB PIL image from a path, bytes, a PIL image or a numpy array.

    Files and bytes are decoded in full (a truncated file is an error) and turned upright by their EXIF
    orientation. Transparency is composited onto white, as transformers' Gemma 3 processor does; an RGB
    PIL image comes back as it is.
    Arrays are channels-last: H×W (grayscale), H×W×1, H×W×3 (RGB) or H×W×4 (RGBA); integers 0–255, or
    floats 0–1 (rounded to the nearest of 256 levels).
    max_pixels guards decoding: it applies to files, bytes and PIL images not loaded yet (Image.open is
    lazy); pixels already in memory are taken as they are."""
    if isinstance(source, Image.Image):
        return _rgb(_loaded(source, "the PIL image", max_pixels))
    if isinstance(source, np.ndarray):
        return _from_array(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        return _decode(io.BytesIO(data), len(data), f"the image data ({len(data)} bytes)", max_pixels)
    if isinstance(source, (str, Path)):
        return _from_file(source, max_pixels)
    raise Gemma3Error(
        f"cannot open an image from type {type(source).__name__!r}: give a path, bytes, a PIL image or a numpy array"
    )


def _from_file(source: str | Path, max_pixels: int) -> Image.Image:
    if str(source).startswith(("http://", "https://")):
        raise Gemma3Error(f"image {source} is a URL: download it and give the file's path")
    path = Path(source).expanduser()
    if not path.exists():
        raise Gemma3Error(f"image file {path} does not exist: check the path")
    if not path.is_file():
        raise Gemma3Error(f"image {path} is not a file: give the path of an image file")
    with path.open("rb") as file:
        return _decode(file, path.stat().st_size, f"image file {path}", max_pixels)


def _decode(file, size: int, name: str, max_pixels: int) -> Image.Image:
    if size == 0:
        raise Gemma3Error(f"{name} is empty (0 bytes): re-save or re-download it")
    try:
        image = Image.open(file)
    except UnidentifiedImageError:
        raise Gemma3Error(f"{name} is not an image Pillow can read: convert it to PNG or JPEG") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Pillow's own limit (Image.MAX_IMAGE_PIXELS); the warning arrives as an error under the caller's filters.
        raise Gemma3Error(f"{name} is too large to decode safely ({_line(e)}): shrink it first") from None
    except Exception as e:  # noqa: BLE001 — a broken header raises many kinds of error
        raise Gemma3Error(f"{name} cannot be read as an image ({_line(e)}): re-save it as PNG or JPEG") from None
    image = _loaded(image, name, max_pixels)
    try:
        image = ImageOps.exif_transpose(image)
    except Exception as e:  # noqa: BLE001
        raise Gemma3Error(f"{name} has unreadable EXIF data ({_line(e)}): re-save it without metadata") from None
    return _rgb(image)


def _loaded(image: Image.Image, name: str, max_pixels: int) -> Image.Image:
    """The image with its pixels decoded, after checking the size its header claims."""
    if 0 in image.size:
        raise Gemma3Error(f"{name} is {image.width}×{image.height}: an image needs at least one pixel")
    if isinstance(image, ImageFile.ImageFile) and image.tile:  # not decoded yet
        width, height = image.size
        if width * height > max_pixels:
            raise Gemma3Error(
                f"{name} is {width}×{height} = {width * height:,} pixels, over the limit of {max_pixels:,}: "
                "shrink it, or pass a larger max_pixels to open_image if you trust the file"
            )
    try:
        image.load()  # Pillow decodes lazily; truncation shows only here
    except Exception as e:  # noqa: BLE001 — decoders raise OSError, SyntaxError, ValueError, EOFError...
        raise Gemma3Error(f"{name} is truncated or corrupt ({_line(e)}): re-save or re-download it") from None
    return image


def _rgb(image: Image.Image) -> Image.Image:
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _from_array(array: np.ndarray) -> Image.Image:
    name = f"the numpy array (shape {array.shape}, dtype {array.dtype})"
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or array.ndim == 3 and array.shape[-1] in (3, 4)) or array.size == 0:
        raise Gemma3Error(f"{name} is not an image: give H×W (grayscale), H×W×3 (RGB) or H×W×4 (RGBA), channels last")
    array = _as_uint8(array, name)
    if array.ndim == 3 and array.shape[-1] == 4:
        # transformers blends an RGBA array onto white in float64 and rounds (not Pillow's alpha_composite).
        alpha = array[..., 3:] / 255
        array = np.round(alpha * array[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    image = Image.fromarray(np.ascontiguousarray(array))
    return image if image.mode == "RGB" else image.convert("RGB")


def _as_uint8(array: np.ndarray, name: str) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.integer):
        if array.min() < 0 or array.max() > 255:
            raise Gemma3Error(f"{name} has values outside 0–255: scale it to uint8")
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all((array >= 0) & (array <= 1)):
            raise Gemma3Error(f"{name} has float values outside 0–1 (or NaN): scale floats to 0–1 or give uint8")
        return np.round(array * 255).astype(np.uint8)
    raise Gemma3Error(f"{name} has an unsupported dtype: give uint8 values 0–255 or floats 0–1")


def _line(error: Exception) -> str:
    return " ".join(str(error).split()).rstrip(".") or type(error).__name__


def preprocess(image, size: int) -> np.ndarray:
    """float32 [size, size, 3]: RGB resized to size×size (PIL bilinear, aspect not kept), scaled to [−1, 1]."""
    _check_size(size)
    resized = open_image(image).resize((size, size), Image.Resampling.BILINEAR)
    # transformers rescales in float64, casts to float32, then normalises in float32: same steps, same bits.
    pixels = (np.asarray(resized, dtype=np.float64) * (1 / 255)).astype(np.float32)
    half = np.float32(0.5)
    return (pixels - half) / half


def _check_size(size) -> None:
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
        raise Gemma3Error(f"image size must be a positive integer, got {size!r}")


def pan_and_scan(
    image, min_crop_size: int = 256, max_num_crops: int = 4, min_ratio_to_activate: float = 1.2
) -> list[Image.Image]:
    """Crops of a long image (the original not included): one row across a wide image, one column down a
    tall one, as transformers' Gemma 3 processor cuts them; none when the image is close to square or a
    crop's side would fall under min_crop_size."""
    image = open_image(image)
    width, height = image.size
    long, short = max(width, height), min(width, height)
    if long / short < min_ratio_to_activate:
        return []
    count = min(math.floor(long / short + 0.5), math.floor(long / min_crop_size))
    count = min(max_num_crops, max(2, count))
    across, down = (count, 1) if width >= height else (1, count)
    crop_w, crop_h = math.ceil(width / across), math.ceil(height / down)
    if min(crop_w, crop_h) < min_crop_size:
        return []
    # The last crop ends at the image's edge (it may be narrower), never past it.
    return [
        image.crop((x, y, min(x + crop_w, width), min(y + crop_h, height)))
        for y in range(0, crop_h * down, crop_h)
        for x in range(0, crop_w * across, crop_w)
    ]


def process_images(
    images, size: int, do_pan_and_scan: bool = False, **pan_and_scan_options
) -> tuple[np.ndarray, list[int]]:
    """Pixel values [N, size, size, 3] for every image followed by its crops, and each image's crop count."""
    _check_size(size)
    if isinstance(images, ONE_IMAGE_TYPES):
        images = [images]
    pixels, crops = [], []
    for source in images:
        image = open_image(source)
        parts = pan_and_scan(image, **pan_and_scan_options) if do_pan_and_scan else []
        pixels += [preprocess(part, size) for part in (image, *parts)]
        crops.append(len(parts))
    return np.stack(pixels) if pixels else np.zeros((0, size, size, 3), np.float32), crops
