"""Image decoding, validation and the one preprocessing every stage shares.

The shard stage turns any input into an upright RGB JPEG (`normalize_image`); the teacher
cache and the student then both see exactly `Preprocess(img, box)` of that JPEG, so a
cached target always describes the pixels the student is trained on.

torch is imported by the methods that use it: the shard stage's driver imports this module
(through `ingest`) and, planning millions of names, should not also hold torch (~400 MB).
"""
from __future__ import annotations

import functools
import io
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


class Rejected(Exception):
    """An input that is not a usable image. `reason` is a short stable code for statistics."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _flatten_alpha(img: Image.Image) -> Image.Image:
    # Transparent pixels become white, the same colour as the TTA infill.
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode: 16-bit and float scaled to their range, alpha over white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = (0.0, 65535.0) if img.mode.startswith("I;16") else (float(arr.min()), float(arr.max()))
        arr = np.clip((arr - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
        return Image.fromarray((arr * 255.0 + 0.5).astype(np.uint8), mode="L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        return _flatten_alpha(img)
    return img.convert("RGB")


def normalize_image(data: bytes, *, max_pixels: int, min_side: int, max_side: int | None) -> tuple[Image.Image, dict]:
    """Decode, validate and normalise one input. Raises `Rejected` with a reason."""
    if not data:
        raise Rejected("empty", "zero-byte file")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise Rejected("not_an_image", "no image format recognised") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise Rejected("too_many_pixels", str(e)) from None
        except Exception as e:  # corrupt headers raise many types
            raise Rejected("corrupt", f"{type(e).__name__}: {e}") from None
        width, height = img.size
        if width * height > max_pixels:
            raise Rejected("too_many_pixels", f"{width}x{height} exceeds {max_pixels} pixels")
        source = {"format": img.format, "mode": img.mode, "width": width, "height": height}
        try:
            img.load()
            img = ImageOps.exif_transpose(img)
            img = to_rgb(img)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise Rejected("too_many_pixels", str(e)) from None
        except Exception as e:  # truncated or corrupt data
            raise Rejected("truncated", f"{type(e).__name__}: {e}") from None
    if min(img.size) < min_side:
        raise Rejected("too_small", f"{img.size[0]}x{img.size[1]} is below min_side={min_side}")
    if max_side is not None and min(img.size) > max_side:
        scale = max_side / min(img.size)
        size = (max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale)))
        img = img.resize(size, Image.Resampling.LANCZOS)
    return img, source


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode_rgb(data: bytes) -> Image.Image:
    """Decode an image written by the shard stage (or an img2dataset shard)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return to_rgb(ImageOps.exif_transpose(img))


# Why an image of a shard can no longer be used, though it passed the shard stage's checks
# (its file was cut short or overwritten since).
BAD_IMAGE = {1: "the shard's file ends before its bytes (truncated)", 2: "its bytes no longer decode"}


def decode_stored(data: bytes, size: int) -> tuple[Image.Image | None, int, str]:
    """An image read back from a shard, as `decode_rgb` gives it, or None with its BAD_IMAGE
    code and what the decoder said; `size` is its length in the manifest."""
    if len(data) != size:
        return None, 1, ""
    try:
        return decode_rgb(data), 0, ""
    except Exception as e:  # noqa: BLE001 - whatever the decoder says, the image is unusable
        return None, 2, f": {type(e).__name__}: {e}"


def crop_box(width: int, height: int, out_hw: tuple[int, int], mode: str, rng: np.random.Generator | None = None):
    """The largest box of the output's aspect ratio inside the image, centred or at a random
    offset along the free axis. Returned as (left, top, right, bottom) in pixels (floats)."""
    out_h, out_w = out_hw
    if width * out_h >= height * out_w:  # image is wider than the output: slide horizontally
        bw, bh = height * out_w / out_h, float(height)
    else:
        bw, bh = float(width), width * out_h / out_w
    free_x, free_y = width - bw, height - bh
    if mode == "center":
        fx = fy = 0.5
    elif mode == "random":
        if rng is None:
            raise ValueError("random crops need a generator")
        fx, fy = rng.random(), rng.random()
    else:
        raise ValueError(f"unknown crop mode {mode!r}")
    left, top = free_x * fx, free_y * fy
    return (left, top, left + bw, top + bh)


@functools.lru_cache(maxsize=32)
def _constant(values: tuple[float, float, float], device: str) -> torch.Tensor:
    """Per-channel statistics (3, 1, 1) on `device`, made once: every copy of a fresh host
    tensor to a GPU would wait for all the work queued on it."""
    import torch

    return torch.tensor(values, dtype=torch.float32).view(3, 1, 1).to(device)


@dataclass(frozen=True)
class Preprocess:
    """Crop a box, resize it to the model's input and normalise with the model's statistics."""

    size: tuple[int, int]  # (height, width)
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, img: Image.Image, box) -> torch.Tensor:
        return self.normalize(self.pixels(img, box))

    def pixels(self, img: Image.Image, box) -> torch.Tensor:
        """The box resized to the model's input: (3, H, W) uint8. Readers hand these to the
        device, a quarter of the bytes of float32, and `normalize` runs there."""
        import torch

        h, w = self.size
        resized = img.resize((w, h), INTERPOLATIONS[self.interpolation], box=tuple(float(b) for b in box))
        return torch.from_numpy(np.ascontiguousarray(np.asarray(resized, dtype=np.uint8).transpose(2, 0, 1)))

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels (..., 3, H, W) on any device -> float32 with the model's statistics."""
        import torch

        x = pixels.to(torch.float32) / 255.0
        return (x - _constant(tuple(self.mean), str(x.device))) / _constant(tuple(self.std), str(x.device))

    def mean_tensor(self) -> torch.Tensor:
        import torch

        return torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)

    def std_tensor(self) -> torch.Tensor:
        import torch

        return torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)

    def white(self) -> torch.Tensor:
        """A white pixel (1.0 before normalisation) after normalisation: the TTA infill."""
        return ((1.0 - self.mean_tensor()) / self.std_tensor()).view(3)

    def to_dict(self) -> dict:
        return {"size": list(self.size), "interpolation": self.interpolation, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        return cls(tuple(d["size"]), d["interpolation"], tuple(d["mean"]), tuple(d["std"]))
