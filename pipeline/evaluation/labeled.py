"""Labeled sets for the dense linear probes: the folder layout, reading it, and a small
generated set made from the photographs scikit-image ships.

Layout (a local folder or any fsspec URL):

    classes.json              segmentation classes: a list of names (index = label value), or
                              {"classes": [...], "ignore_index": 255, "reduce_zero_label": false}
    train/images/<id>.jpg     any image format PIL reads (.jpg, .png, ...)
    train/masks/<id>.png      label per pixel (8-bit grey or palette PNG, as VOC writes them);
                              ignore_index marks pixels that are not scored
    train/depth/<id>.npy      float depth in metres, (H, W); <= 0 or non-finite = no ground truth
    val/...                   the same

Masks and depth maps have the size of their image. An image may have a mask, a depth map,
both or neither; each probe uses the images that have its label. With "reduce_zero_label"
(ADE20K's convention) label 0 is ignored and every other label is lowered by one.
"""
from __future__ import annotations

import io
import json
import posixpath
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.data.images import decode_rgb
from pipeline.data.sample_corpus import base_photographs
from pipeline.errors import PipelineError
from pipeline.storage import absolute, exists, join_url, list_names, read_bytes, read_json, write_bytes_atomic, write_json

SPLITS = ("train", "val")
SAMPLE = "sample:labeled"
LAYOUT_HINT = "expected <root>/{train,val}/images/<id>.<ext> with masks/<id>.png and/or depth/<id>.npy (see docs/evaluation.md, 'Labeled set layout')"


@dataclass(frozen=True)
class LabeledItem:
    id: str
    image: str  # URLs
    mask: str | None
    depth: str | None


@dataclass(frozen=True)
class LabeledSet:
    root: str
    splits: dict[str, list[LabeledItem]]
    classes: list[str] | None
    ignore_index: int = 255
    reduce_zero_label: bool = False

    def with_masks(self, split: str) -> list[LabeledItem]:
        return [it for it in self.splits[split] if it.mask]

    def with_depth(self, split: str) -> list[LabeledItem]:
        return [it for it in self.splits[split] if it.depth]


def _stems(url: str, storage_options) -> dict[str, str]:
    return {posixpath.splitext(n)[0]: join_url(url, n) for n in list_names(url, storage_options) if not n.startswith(".")}


def open_labeled(root: str, storage_options=None, splits: tuple[str, ...] = SPLITS) -> LabeledSet:
    """Read the layout of the `splits` a caller uses (zero-shot scoring needs no train split);
    refuse, saying what is missing, a folder that does not follow it."""
    names, splits = splits, {}
    for split in names:
        images = _stems(join_url(root, split, "images"), storage_options)
        if not images:
            raise PipelineError(f"labeled set {root}: no images in {split}/images; {LAYOUT_HINT}")
        masks = _stems(join_url(root, split, "masks"), storage_options)
        depth = _stems(join_url(root, split, "depth"), storage_options)
        splits[split] = [LabeledItem(i, images[i], masks.get(i), depth.get(i)) for i in sorted(images)]
    has_masks = any(it.mask for items in splits.values() for it in items)
    if not any(it.mask or it.depth for items in splits.values() for it in items):
        raise PipelineError(f"labeled set {root}: no masks or depth maps; {LAYOUT_HINT}")
    classes, ignore, reduce_zero = None, 255, False
    if has_masks:
        try:
            meta = read_json(join_url(root, "classes.json"), storage_options)
        except FileNotFoundError:
            raise PipelineError(f"labeled set {root} has masks but no classes.json (a list of class names)") from None
        if isinstance(meta, dict):
            classes, ignore, reduce_zero = meta.get("classes"), int(meta.get("ignore_index", 255)), bool(meta.get("reduce_zero_label", False))
        else:
            classes = meta
        if not isinstance(classes, list) or not classes:
            raise PipelineError(f"labeled set {root}: classes.json must list the class names")
    return LabeledSet(root, splits, classes, ignore, reduce_zero)


def load_mask(url: str, labeled: LabeledSet, size: tuple[int, int], storage_options=None) -> np.ndarray:
    """Labels (H, W) uint8/int64; palette PNGs give their indices (never converted to RGB)."""
    img = Image.open(io.BytesIO(read_bytes(url, storage_options)))
    if img.mode not in ("L", "P", "I", "I;16"):
        raise PipelineError(f"mask {url} has mode {img.mode}: expected one label per pixel (grey or palette PNG)")
    mask = np.asarray(img).astype(np.int64)
    if mask.shape != size:
        raise PipelineError(f"mask {url} is {mask.shape[::-1]} but its image is {size[::-1]} (width x height)")
    if labeled.reduce_zero_label:
        mask = np.where(mask == 0, labeled.ignore_index, mask - 1)
    bad = (mask != labeled.ignore_index) & ((mask < 0) | (mask >= len(labeled.classes)))
    if bad.any():
        raise PipelineError(f"mask {url} holds labels {sorted(set(mask[bad].tolist()))[:5]} outside the "
                            f"{len(labeled.classes)} classes of classes.json (ignore_index {labeled.ignore_index})")
    return mask


def load_depth(url: str, size: tuple[int, int], storage_options=None) -> np.ndarray:
    depth = np.load(io.BytesIO(read_bytes(url, storage_options)), allow_pickle=False)
    if depth.ndim == 3 and depth.shape[-1] == 1:
        depth = depth[..., 0]
    if depth.shape != size:
        raise PipelineError(f"depth {url} is {depth.shape} but its image is {size} (height, width)")
    return depth.astype(np.float32)


def load_item(item: LabeledItem, labeled: LabeledSet, storage_options=None):
    """(RGB image, labels (H, W) or None, depth (H, W) or None)."""
    img = decode_rgb(read_bytes(item.image, storage_options))
    size = (img.height, img.width)
    mask = load_mask(item.mask, labeled, size, storage_options) if item.mask else None
    depth = load_depth(item.depth, size, storage_options) if item.depth else None
    return img, mask, depth


# --- the generated sample set --------------------------------------------------------------

SEG_CLASSES = ["background", "astronaut", "cat", "coffee", "rocket", "coins"]
_SEG_SOURCES = {"astronaut": "astronaut", "cat": "chelsea", "coffee": "coffee", "rocket": "rocket", "coins": "coins"}
_BACKGROUNDS = ["brick", "grass", "gravel", "moon"]
# Middlebury 2014 "motorcycle", calibration of the 4x down-sampled copy in scikit-image.
_FOCAL_PX, _BASELINE_M, _DOFFS_PX = 994.978, 0.193001, 31.086
SAMPLE_VERSION = 1
SAMPLE_COUNTS = {"seg": {"train": 32, "val": 16}, "depth": {"train": 24, "val": 12}}


def _rgb(arr: np.ndarray) -> Image.Image:
    img = Image.fromarray(arr)
    return img.convert("RGB")


def _random_crop(img: Image.Image, rng: np.random.Generator, lo: float, hi: float) -> Image.Image:
    w, h = img.size
    side = min(w, h) * rng.uniform(lo, hi)
    x0, y0 = rng.uniform(0, w - side), rng.uniform(0, h - side)
    return img.crop((round(x0), round(y0), round(x0 + side), round(y0 + side)))


def segmentation_sample(rng: np.random.Generator, photos: dict[str, Image.Image]) -> tuple[Image.Image, np.ndarray]:
    """A texture background with 2-3 pasted photo crops (ellipses or rectangles); labels from
    SEG_CLASSES, a 1-pixel ignore band (255) around every pasted shape, as VOC has."""
    from PIL import ImageDraw, ImageFilter

    w, h = int(rng.integers(128, 200)), int(rng.integers(128, 200))
    background = _random_crop(photos[_BACKGROUNDS[rng.integers(len(_BACKGROUNDS))]], rng, 0.4, 0.9)
    canvas = background.resize((w, h), Image.Resampling.BICUBIC)
    labels = np.zeros((h, w), dtype=np.uint8)
    band = np.zeros((h, w), dtype=bool)
    for _ in range(int(rng.integers(2, 4))):
        cls = int(rng.integers(1, len(SEG_CLASSES)))
        ow, oh = int(w * rng.uniform(0.3, 0.6)), int(h * rng.uniform(0.3, 0.6))
        piece = _random_crop(photos[SEG_CLASSES[cls]], rng, 0.35, 0.8).resize((ow, oh), Image.Resampling.BICUBIC)
        shape = Image.new("L", (ow, oh), 0)
        draw = ImageDraw.Draw(shape)
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((0, 0, ow - 1, oh - 1), fill=255)
        x0, y0 = int(rng.integers(0, w - ow)), int(rng.integers(0, h - oh))
        canvas.paste(piece, (x0, y0), shape)
        full = Image.new("L", (w, h), 0)
        full.paste(shape, (x0, y0))
        inside = np.asarray(full) > 0
        labels[inside] = cls
        edge = np.asarray(full.filter(ImageFilter.MaxFilter(3))) != np.asarray(full.filter(ImageFilter.MinFilter(3)))
        band = (band & ~inside) | edge
    labels[band] = 255
    return canvas, labels


def motorcycle_depth() -> tuple[Image.Image, np.ndarray]:
    """The left view of scikit-image's stereo pair and its depth in metres (0 = unknown),
    from the ground-truth disparity: depth = focal * baseline / (disparity + doffs)."""
    import skimage.data as data

    left, _, disparity = data.stereo_motorcycle()
    with np.errstate(divide="ignore", invalid="ignore"):
        depth = _FOCAL_PX * _BASELINE_M / (disparity.astype(np.float64) + _DOFFS_PX)
    depth[~np.isfinite(disparity)] = 0.0
    return Image.fromarray(left), depth.astype(np.float32)


def depth_sample(rng: np.random.Generator, image: Image.Image, depth: np.ndarray, split: str):
    """A crop of the motorcycle scene: train crops come from the left 62% of the columns, val
    crops from the rest, so the splits share no pixel."""
    w, h = image.size
    cut = int(0.62 * w)
    x_lo, x_hi = (0, cut) if split == "train" else (cut, w)
    cw = min(x_hi - x_lo, int(h * rng.uniform(0.45, 0.6)))
    ch = min(h, int(cw * rng.uniform(1.0, 1.3)))
    x0, y0 = int(rng.integers(x_lo, x_hi - cw + 1)), int(rng.integers(0, h - ch + 1))
    box = (x0, y0, x0 + cw, y0 + ch)
    out = (160, round(160 * ch / cw))
    img = image.crop(box).resize(out, Image.Resampling.BICUBIC)
    d = Image.fromarray(depth).crop(box).resize(out, Image.Resampling.NEAREST)
    img, d = (img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), d.transpose(Image.Transpose.FLIP_LEFT_RIGHT)) \
        if rng.random() < 0.5 else (img, d)
    return img, np.asarray(d, dtype=np.float32)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def write_labeled_sample(url: str, storage_options=None, seed: int = 0) -> str:
    """Write the generated labeled set into folder `url` unless it is already there. The
    segmentation part pastes crops of five photographs on textures (six classes); the depth
    part crops the Middlebury motorcycle scene. Small, for tests and demos: real numbers need
    a real set (docs/evaluation.md: VOC, ADE20K, NYUv2). Returns `url`."""
    marker = join_url(url, "sample.json")
    if exists(marker, storage_options) and read_json(marker, storage_options).get("version") == SAMPLE_VERSION:
        return url
    names = set(_SEG_SOURCES.values()) | set(_BACKGROUNDS)
    photos = {name: _rgb(arr) for name, arr in base_photographs() if name in names}
    photos.update({cls: photos[src] for cls, src in _SEG_SOURCES.items()})
    scene, scene_depth = motorcycle_depth()
    write_bytes_atomic(join_url(url, "classes.json"), json.dumps({"classes": SEG_CLASSES, "ignore_index": 255}).encode(),
                       storage_options)
    for split in SPLITS:
        rng = np.random.default_rng([seed, SPLITS.index(split)])
        for i in range(SAMPLE_COUNTS["seg"][split]):
            img, labels = segmentation_sample(rng, photos)
            write_bytes_atomic(join_url(url, split, "images", f"seg_{i:04d}.png"), _png(img), storage_options)
            write_bytes_atomic(join_url(url, split, "masks", f"seg_{i:04d}.png"), _png(Image.fromarray(labels)), storage_options)
        for i in range(SAMPLE_COUNTS["depth"][split]):
            img, d = depth_sample(rng, scene, scene_depth, split)
            write_bytes_atomic(join_url(url, split, "images", f"depth_{i:04d}.png"), _png(img), storage_options)
            write_bytes_atomic(join_url(url, split, "depth", f"depth_{i:04d}.npy"), _npy(d), storage_options)
    write_json(marker, {"version": SAMPLE_VERSION, "seed": seed, "counts": SAMPLE_COUNTS}, storage_options)
    return url


def labeled_url(value: str, sample_url: str, storage_options=None) -> str:
    """The labeled set a config names: `SAMPLE` is the generated one, written at `sample_url`
    on first use; anything else is a folder or storage URL."""
    return write_labeled_sample(sample_url, storage_options) if value == SAMPLE else absolute(value)
