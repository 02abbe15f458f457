"""Images: pixel values, pan & scan crops and expanded prompts against transformers' Gemma 3 processors; bad images."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from conftest import gemma3_processor
from PIL import Image, ImageFile
from spm_fixture import train_tokenizer

from mlx_gemma3 import Gemma3Error
from mlx_gemma3.processing.image import open_image, pan_and_scan, preprocess, process_images
from mlx_gemma3.processing.prompt import IMAGE_MARK, expand_image_tokens, gemma_chat
from mlx_gemma3.processing.tokenizer import Tokenizer

# transformers 5.23: Gemma3ImageProcessor is the torchvision backend and falls back to Gemma3ImageProcessorPil
# without torchvision; the PIL class resizes with PIL bilinear, the reference these tests pin.
PAS = dict(pan_and_scan_min_crop_size=256, pan_and_scan_max_num_crops=4, pan_and_scan_min_ratio_to_activate=1.2)


def random_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    bands = len(Image.new(mode, (1, 1)).getbands())
    data = np.random.RandomState(seed).randint(0, 256, (height, width, bands), dtype=np.uint8)
    return Image.fromarray(data[..., 0] if bands == 1 else data)


def hf_pixels(images, size: int, **options):
    """transformers' pixel values, channels-last, and its crop counts."""
    from transformers import Gemma3ImageProcessorPil

    processor = Gemma3ImageProcessorPil(size={"height": size, "width": size})
    out = processor(images, return_tensors="np", **{**PAS, **options})
    return out["pixel_values"].transpose(0, 2, 3, 1), list(out["num_crops"])


def palette_with_transparency() -> Image.Image:
    image = random_image(45, 30).convert("P")
    image.info["transparency"] = 7
    return image


PIL_IMAGES = [
    random_image(37, 91),
    random_image(500, 301, seed=1),
    random_image(1, 1, seed=2),
    random_image(2000, 40, seed=3),
    random_image(64, 48, "L", seed=4),
    random_image(80, 50, "RGBA", seed=5),
    palette_with_transparency(),
]


@pytest.mark.parametrize("size", [896, 56])
def test_pixel_values_equal_transformers_pil_processor(size):
    expected, crops = hf_pixels(PIL_IMAGES, size)
    ours, our_crops = process_images(PIL_IMAGES, size)
    assert ours.shape == (len(PIL_IMAGES), size, size, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)
    assert our_crops == crops == [0] * len(PIL_IMAGES)
    np.testing.assert_allclose(preprocess(PIL_IMAGES[1], size), expected[1], rtol=0, atol=1e-6)


def test_numpy_arrays_equal_transformers():
    rgb = np.random.RandomState(6).randint(0, 256, (33, 70, 3), dtype=np.uint8)
    rgba = np.random.RandomState(7).randint(0, 256, (40, 25, 4), dtype=np.uint8)
    gray = np.random.RandomState(8).randint(0, 256, (20, 30), dtype=np.uint8)
    expected, _ = hf_pixels([rgb, rgba, Image.fromarray(gray)], 56)
    ours, _ = process_images([rgb, rgba, gray], 56)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)
    # Floats in 0–1 and other integer dtypes mean the same levels as uint8.
    assert np.array_equal(np.asarray(open_image(rgb / 255)), rgb)
    assert np.array_equal(np.asarray(open_image(gray.astype(np.int64)[..., None])), np.asarray(open_image(gray)))


def test_files_and_bytes_open_like_transformers(tmp_path):
    from transformers.image_transforms import convert_to_rgb
    from transformers.image_utils import load_image

    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° to stand upright
    random_image(60, 30).save(rotated, exif=exif)
    assert np.array_equal(np.asarray(open_image(rotated)), np.asarray(load_image(str(rotated))))
    assert open_image(rotated).size == (30, 60)
    transparent = tmp_path / "transparent.png"
    random_image(20, 10, "RGBA").save(transparent)
    expected = convert_to_rgb(Image.open(transparent), return_numpy=True)  # composited onto white
    assert np.array_equal(np.asarray(open_image(str(transparent))), expected)
    assert np.array_equal(np.asarray(open_image(transparent.read_bytes())), expected)


PAS_CASES = [
    (1200, 300, {}),  # wide: 4 crops
    (1001, 300, {}),  # 3 crops, the last one a pixel narrower
    (300, 1000, {}),  # tall: 3 crops in a column
    (700, 560, {}),  # aspect 1.25: 2 crops
    (500, 450, {}),  # aspect < 1.2: none
    (400, 100, {}),  # crops would be under 256: none
    (400, 100, dict(pan_and_scan_min_crop_size=100, pan_and_scan_max_num_crops=2)),
    (3000, 500, dict(pan_and_scan_max_num_crops=3, pan_and_scan_min_ratio_to_activate=2.0)),
]


@pytest.mark.parametrize("width, height, options", PAS_CASES)
def test_pan_and_scan_equals_transformers(width, height, options):
    from transformers import Gemma3ImageProcessorPil

    image = random_image(width, height, seed=width + height)
    ours_options = {k.removeprefix("pan_and_scan_"): v for k, v in {**PAS, **options}.items()}
    channels_first = np.moveaxis(np.asarray(image), -1, 0)
    expected_crops = Gemma3ImageProcessorPil().pan_and_scan(channels_first, *{**PAS, **options}.values())
    crops = pan_and_scan(image, **ours_options)
    assert [np.moveaxis(np.asarray(c), -1, 0).shape for c in crops] == [c.shape for c in expected_crops]
    assert all(np.array_equal(np.moveaxis(np.asarray(c), -1, 0), e) for c, e in zip(crops, expected_crops))

    expected, counts = hf_pixels([image], 56, do_pan_and_scan=True, **options)
    ours, our_counts = process_images([image], 56, do_pan_and_scan=True, **ours_options)
    assert our_counts == counts == [len(expected_crops)]
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def processors(tmp_path_factory):
    """Our tokenizer and transformers' Gemma3Processor on the same tiny SentencePiece, 4 tokens per image."""
    folder = tmp_path_factory.mktemp("image_prompt")
    train_tokenizer(folder)
    hf = gemma3_processor(folder, 56, 4)
    return Tokenizer(folder / "tokenizer.model"), hf


WIDE, SMALL = random_image(1200, 300), random_image(40, 30, seed=1)
CHAT = gemma_chat([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}])
PROMPTS = [
    ("Describe <start_of_image> please.", [SMALL], False),
    ("First<start_of_image>then, between: <start_of_image>\nthe end", [SMALL, WIDE], False),
    ("<start_of_image> what is it?", [WIDE], True),
    ("A <start_of_image> B <start_of_image> C", [WIDE, SMALL], True),
    (CHAT, [WIDE], True),
]


@pytest.mark.parametrize("text, images, do_pan_and_scan", PROMPTS)
def test_expanded_prompt_equals_gemma3_processor(processors, text, images, do_pan_and_scan):
    ours, hf = processors
    _, crops = process_images(images, 56, do_pan_and_scan=do_pan_and_scan)
    expanded = expand_image_tokens(text, crops, tokens_per_image=4)

    inputs = hf.image_processor(images, do_pan_and_scan=do_pan_and_scan, **PAS)
    replacements = [hf.replace_image_token(inputs, i) for i in range(len(images))]
    assert expanded == hf.get_text_with_replacements([text], replacements)[0][0]
    expected_ids = hf(text=text, images=images, do_pan_and_scan=do_pan_and_scan)["input_ids"][0]
    assert ours.encode(expanded) == list(expected_ids)


def test_placeholders_must_match_images(processors):
    _, hf = processors
    assert expand_image_tokens("no images", [], 4) == "no images"
    for text, count in [("an image but no placeholder", 1), (f"{IMAGE_MARK} and {IMAGE_MARK}", 1), ("", 1)]:
        with pytest.raises(ValueError, match="should be the same as the number of images"):
            hf(text=text, images=[SMALL] * count)
        with pytest.raises(Gemma3Error, match=f"placeholder.*{count} image") as error:
            expand_image_tokens(text, [0] * count, 4)
        assert "\n" not in str(error.value)


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width×height pixels and holds none."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def encoded(format: str) -> bytes:
    buffer = io.BytesIO()
    random_image(200, 150).save(buffer, format=format)
    return buffer.getvalue()


def assert_refused(source, match: str, **options) -> str:
    """open_image raises a one-line Gemma3Error and leaves Pillow's and the warnings module's settings alone."""
    before = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES, list(warnings.filters)
    with pytest.raises(Gemma3Error, match=match) as error:
        open_image(source, **options)
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES, list(warnings.filters)) == before
    assert "\n" not in str(error.value)
    return str(error.value)


def test_bad_files_are_refused_in_one_line(tmp_path):
    files = {
        "empty.png": (b"", "is empty"),
        "notes.png": (b"just some text, not a picture\n" * 10, "not an image"),
        "cut.png": (encoded("PNG")[: len(encoded("PNG")) // 2], "truncated or corrupt"),
        "cut.jpg": (encoded("JPEG")[: len(encoded("JPEG")) // 2], "truncated or corrupt"),
        "huge.png": (png_header(100_000, 100_000), "too large"),
        "big.png": (png_header(9000, 8000), "9000×8000 = 72,000,000 pixels, over the limit of 64,000,000"),
    }
    for name, (data, match) in files.items():
        (tmp_path / name).write_bytes(data)
        assert str(tmp_path / name) in assert_refused(tmp_path / name, match)
        if data:
            assert_refused(data, match)
    assert_refused(tmp_path / "missing.jpg", "does not exist")
    assert_refused(str(tmp_path), "not a file")
    assert_refused("https://example.com/cat.jpg", "URL")
    assert_refused(encoded("PNG"), "over the limit of 1,000", max_pixels=1000)
    assert_refused(Image.open(io.BytesIO(png_header(9000, 8000))), "over the limit")
    assert_refused(Image.open(io.BytesIO(encoded("JPEG")[:3000])), "truncated")
    assert_refused(Image.new("RGB", (0, 5)), "at least one pixel")
    assert_refused(42, "type 'int'")


def test_pillow_bomb_warning_raised_by_callers_filters_becomes_our_error():
    data = png_header(10_000, 10_000)  # over Pillow's warning limit, under its error limit
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        assert_refused(data, "too large", max_pixels=10**9)


@pytest.mark.parametrize(
    "array, match",
    [
        (np.zeros((3, 20, 20), np.uint8), "channels last"),
        (np.zeros(10, np.uint8), "not an image"),
        (np.zeros((0, 5, 3), np.uint8), "not an image"),
        (np.zeros((4, 4, 2), np.uint8), "not an image"),
        (np.zeros((4, 4, 3), bool), "dtype"),
        (np.full((4, 4, 3), 1.5), "outside 0–1"),
        (np.full((4, 4), np.nan, np.float32), "NaN"),
        (np.full((4, 4, 3), 300), "outside 0–255"),
    ],
)
def test_bad_arrays_are_refused(array, match):
    assert "numpy array" in assert_refused(array, match)


def test_bad_sizes_are_refused():
    for size in (0, -3, 56.0, True):
        with pytest.raises(Gemma3Error, match="positive integer"):
            process_images([SMALL], size)
