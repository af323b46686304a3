"""A small corpus of real photographs, generated from the images scikit-image ships.

The package holds about twenty public-domain photographs (an astronaut, a cat, coffee, a
rocket, a motorcycle, microscopy, the Hubble deep field, textures, ...). Random crops and
flips of them give as many distinct images as a demo or a test needs, deterministically.
"""
from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from PIL import Image

from pipeline.storage import join_url, url_to_fs, write_bytes_atomic

COLOUR = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina", "immunohistochemistry"]
GREY = ["camera", "coins", "moon", "brick", "grass", "gravel", "clock"]
BASES = COLOUR + GREY + ["motorcycle_left", "motorcycle_right"]


@lru_cache(maxsize=1)  # decoding them is most of the work of a small corpus
def base_photographs() -> list[tuple[str, np.ndarray]]:
    import skimage.data as data

    left, right, _ = data.stereo_motorcycle()
    return list(zip(BASES, [getattr(data, name)() for name in COLOUR + GREY] + [left, right]))


def file_names(n: int) -> list[str]:
    """The names `generate(n)` gives its images."""
    return [f"{i:04d}_{BASES[i % len(BASES)]}.{'png' if i % 5 == 4 else 'jpg'}" for i in range(n)]


def generate(n: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """`n` (file name, encoded bytes) pairs: crops of 45-100% of the short side, aspect 3:4 to
    4:3, some flipped, resized to at most 480 px, most JPEG and some PNG."""
    rng = np.random.default_rng(seed)
    bases = base_photographs()
    out = []
    for i, file_name in enumerate(file_names(n)):
        _, arr = bases[i % len(bases)]
        img = Image.fromarray(arr)
        w, h = img.size
        side = min(w, h) * rng.uniform(0.45, 1.0)
        aspect = rng.uniform(0.75, 4 / 3)
        cw, ch = min(w, side * aspect**0.5), min(h, side / aspect**0.5)
        x0, y0 = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
        crop = img.crop((round(x0), round(y0), round(x0 + cw), round(y0 + ch)))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        crop.thumbnail((480, 480), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        crop.save(buf, format="PNG" if file_name.endswith(".png") else "JPEG", quality=92)
        out.append((file_name, buf.getvalue()))
    return out


def write_sample_corpus(url: str, n: int, storage_options=None, seed: int = 0) -> str:
    """Write the corpus into folder `url` unless it is already there. Returns `url`."""
    fs, path = url_to_fs(url, storage_options)
    existing = sorted(p.rsplit("/", 1)[-1] for p in fs.glob(path.rstrip("/") + "/*"))
    if existing != sorted(file_names(n)):
        for name, data in generate(n, seed):
            write_bytes_atomic(join_url(url, name), data, storage_options)
    return url
