"""Decoding and validating inputs; the shared preprocessing."""
import numpy as np
import pytest
import torch

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
