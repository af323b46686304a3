"""Decoding and validating inputs, and the shared preprocessing: which inputs are accepted or
rejected and why, then the normalised pixels checked one by one against transforms written out
here in numpy, on images where every pixel differs (a uniform image passes any rotation or crop)."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.images import Preprocess, Rejected, crop_box, decode_rgb, normalize_image
from tests.corpus import awkward_files, exif_rotated

LIMITS = dict(max_pixels=50_000_000, min_side=16, max_side=1024)


@pytest.mark.parametrize("name", list(awkward_files()))
def test_each_awkward_input_is_accepted_or_rejected_with_its_reason(name):
    data, reason = awkward_files()[name]
    if reason is None:
        img, source = normalize_image(data, **LIMITS)
        assert img.mode == "RGB" and min(img.size) >= 16
        assert source["width"] > 0
    else:
        with pytest.raises(Rejected) as info:
            normalize_image(data, **LIMITS)
        assert info.value.reason == reason


def test_exif_orientation_is_applied():
    img, source = normalize_image(exif_rotated(), **LIMITS)
    assert (source["width"], source["height"]) == (96, 64)  # as stored
    assert img.size == (64, 96)  # as displayed


def test_alpha_is_composited_over_white():
    import io

    from PIL import Image

    clear = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    buf = io.BytesIO()
    clear.save(buf, format="PNG")
    img, _ = normalize_image(buf.getvalue(), **LIMITS)
    assert np.asarray(img).min() == 255


def test_large_images_are_downscaled_keeping_aspect():
    from tests.corpus import encode, photo

    img, _ = normalize_image(encode(photo((400, 200)), "PNG"), max_pixels=10**8, min_side=16, max_side=100)
    assert img.size == (200, 100)


def test_crop_boxes():
    assert crop_box(300, 200, (100, 100), "center") == (50.0, 0.0, 250.0, 200.0)
    assert crop_box(200, 300, (100, 100), "center") == (0.0, 50.0, 200.0, 250.0)
    assert crop_box(300, 200, (50, 100), "center") == (0.0, 25.0, 300.0, 175.0)  # wide output
    rng = np.random.default_rng(0)
    for _ in range(20):
        left, top, right, bottom = crop_box(300, 200, (100, 100), "random", rng)
        assert top == 0 and bottom == 200 and 0 <= left <= 100 and right - left == pytest.approx(200)


def test_preprocess_normalises_with_model_statistics():
    from PIL import Image

    white = Image.new("RGB", (40, 30), (255, 255, 255))
    pre = Preprocess((16, 16), "bicubic", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    x = pre(white, crop_box(40, 30, (16, 16), "center"))
    assert x.shape == (3, 16, 16)
    assert torch.allclose(x, torch.full_like(x, 2.0)) and torch.allclose(pre.white(), torch.full((3,), 2.0))


def test_decode_rgb_of_a_written_jpeg():
    from pipeline.data.images import encode_jpeg
    from tests.corpus import photo

    assert decode_rgb(encode_jpeg(photo(), 90)).size == (96, 64)


# --- pixel values -------------------------------------------------------------------------

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (24, 40, 3), dtype=np.uint8)  # (height, width): not square, not symmetric


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _normalised(data: bytes) -> np.ndarray:
    img, _ = normalize_image(data, **LIMITS)
    assert img.mode == "RGB"
    return np.asarray(img)


# EXIF orientation -> what a viewer displays, from the stored array (TIFF/EXIF 2.3 definitions)
DISPLAYED = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],                   # mirrored left-right
    3: lambda a: a[::-1, ::-1],                # rotated 180
    4: lambda a: a[::-1],                      # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),         # mirrored along the main diagonal
    6: lambda a: np.rot90(a, k=-1),            # stored rotated 90 counter-clockwise: turn clockwise
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # mirrored along the other diagonal
    8: lambda a: np.rot90(a, k=1),             # turn counter-clockwise
}


@pytest.mark.parametrize("orientation", sorted(DISPLAYED))
def test_exif_orientation_by_pixel_values(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _png(Image.fromarray(RGB), exif=exif.tobytes())
    assert np.array_equal(_normalised(data), DISPLAYED[orientation](RGB))
    assert np.array_equal(np.asarray(decode_rgb(data)), DISPLAYED[orientation](RGB))  # readers agree


def test_rgba_is_alpha_blended_over_white():
    alpha = RNG.integers(0, 256, (24, 40, 1), dtype=np.uint8)
    data = _png(Image.fromarray(np.concatenate([RGB, alpha], -1), mode="RGBA"))
    a = alpha.astype(np.float64) / 255
    want = RGB * a + 255 * (1 - a)
    assert np.abs(_normalised(data).astype(np.float64) - want).max() <= 1.0


def test_sixteen_bit_grey_is_scaled_to_its_full_range():
    grey = RNG.integers(0, 65536, (24, 40), dtype=np.uint16)
    data = _png(Image.fromarray(grey))
    want = np.round(grey / 65535 * 255).astype(np.uint8)
    got = _normalised(data)
    assert np.abs(got.astype(int) - want[..., None].astype(int)).max() <= 1
    assert np.array_equal(got[..., 0], got[..., 1]) and np.array_equal(got[..., 0], got[..., 2])


def test_palette_entries_are_looked_up():
    palette = RNG.integers(0, 256, (256, 3), dtype=np.uint8)
    index = RNG.integers(0, 256, (24, 40), dtype=np.uint8)
    img = Image.fromarray(index, mode="P")
    img.putpalette(palette.ravel().tolist())
    assert np.array_equal(_normalised(_png(img)), palette[index])


def test_palette_with_a_transparent_entry_goes_over_white():
    palette = RNG.integers(0, 256, (256, 3), dtype=np.uint8)
    index = RNG.integers(0, 256, (24, 40), dtype=np.uint8)
    img = Image.fromarray(index, mode="P")
    img.putpalette(palette.ravel().tolist())
    want = palette[index].copy()
    want[index == 7] = 255
    assert np.array_equal(_normalised(_png(img, transparency=7)), want)


def test_cmyk_matches_pil_conversion():
    cmyk = RNG.integers(0, 256, (24, 40, 4), dtype=np.uint8)
    img = Image.fromarray(cmyk, mode="CMYK")
    buf = io.BytesIO()
    img.save(buf, format="TIFF")  # lossless, keeps CMYK
    c, m, y, k = (cmyk[..., i].astype(np.float64) / 255 for i in range(4))
    # Pillow's CMYK -> RGB is the reference; the subtractive model beside it rules out a
    # reference that is itself inverted or has its channels swapped
    want = np.asarray(img.convert("RGB"))
    got = _normalised(buf.getvalue())
    assert np.array_equal(got, want)
    approx = np.stack([(1 - c) * (1 - k), (1 - m) * (1 - k), (1 - y) * (1 - k)], -1) * 255
    assert np.corrcoef(got.ravel(), approx.ravel())[0, 1] > 0.8


@pytest.mark.parametrize("box", [(0, 0, 16, 16), (7, 3, 23, 19), (24, 8, 40, 24), (5, 2, 37, 18)])
def test_preprocess_crops_the_box_it_is_given(box):
    """At one output pixel per box pixel, bicubic resampling hits pixel centres exactly: the
    output is the box's pixels, normalised."""
    left, top, right, bottom = box
    pre = Preprocess((bottom - top, right - left), "bicubic", (0.5, 0.25, 0.75), (0.2, 0.3, 0.4))
    x = pre(Image.fromarray(RGB), box).numpy()
    want = RGB[top:bottom, left:right].astype(np.float32) / 255
    want = (want - np.array(pre.mean, np.float32)) / np.array(pre.std, np.float32)
    assert np.abs(x.transpose(1, 2, 0) - want).max() < 1e-4


def test_preprocess_resizes_a_box_by_averaging_its_own_pixels():
    left, top = 8, 4
    pre = Preprocess((8, 8), "box", (0.0,) * 3, (1.0,) * 3)
    x = pre(Image.fromarray(RGB), (left, top, left + 16, top + 16)).numpy().transpose(1, 2, 0)
    block = RGB[top:top + 16, left:left + 16].astype(np.float64).reshape(8, 2, 8, 2, 3).mean((1, 3)) / 255
    assert np.abs(x - block).max() <= 1.001 / 255  # PIL rounds the mean to 8 bits
