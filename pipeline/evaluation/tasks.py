"""The work of the evaluate stage's Ray tasks, as plain functions of their jobs.

`measure` reads a group of images of one shard (and their target rows), runs every model once
and returns small per-image arrays (token norms, attention, fidelity) plus the features and
pixels of the images to be pictured; `combine` puts the tasks' results in index order.
`probe` accumulates a linear probe's fit sums, or scores fitted weights, over labeled images;
`trained_probe` trains one model's probe head of one kind and scores it (the paper's protocol).
`zeroshot_segment` scores zero-shot segmentation (confusion matrices) over labeled images.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

from pipeline.config import TeacherConfig
from pipeline.data.images import Preprocess, crop_box, decode_rgb
from pipeline.data.manifest import Manifest
from pipeline.data.shards import read_images
from pipeline.errors import ConfigError
from pipeline.evaluation import metrics, zeroshot
from pipeline.evaluation.labeled import LabeledItem, LabeledSet, load_item
from pipeline.evaluation.probes import DepthSums, ProbeSums, confusion
from pipeline.evaluation.trained_probes import (
    TrainedProbeSettings,
    estimate_depth,
    scored_depth,
    segment,
    stride_of,
    train_depth,
    train_segmentation,
    vit_features,
)
from pipeline.models.export import load_exported_features
from pipeline.models.register_neurons import TestTimeRegisters
from pipeline.models.vit import PatchFeatures, load_teacher, readout
from pipeline.targets.store import TargetStore

TARGET = "target"
ORDER = ("teacher", TARGET, "student")  # columns, rows and colours follow this order
BATCH = 8  # images per forward inside a task


@dataclass(frozen=True)
class ModelRef:
    """A model a Ray task loads by itself: a teacher config, or an export folder."""

    name: str
    teacher: dict | None = None  # TeacherConfig as JSON
    export: str | None = None
    test_time_registers: tuple[tuple[int, int], ...] | None = None  # (block, neuron) moved to an extra token

    def load(self, storage_options=None) -> PatchFeatures:
        """The timm model (`.model`) with the projection to the teacher's width an export of a
        narrower student carries (`.projection`, else None)."""
        if self.export:
            loaded = load_exported_features(self.export, storage_options)
        else:
            model = load_teacher(TeacherConfig.model_validate(self.teacher), storage_options)
            if self.test_time_registers is not None:
                model = TestTimeRegisters(model, list(self.test_time_registers), self.name)
            loaded = PatchFeatures(model)
        if torch.cuda.is_available():  # the task was given a GPU; the projection stays with the results on the CPU
            loaded.model.cuda()
        return loaded


def chunks(items: list, n: int) -> list[list]:
    """`items` in consecutive groups of at most `n`: the work of one task each."""
    return [items[i:i + n] for i in range(0, len(items), n)]


@dataclass
class MeasureJob:
    manifest: Manifest
    shard: int
    indices: list[int]
    pictured: list[int]  # indices whose features and pixels come back for the pictures
    store: TargetStore | None
    preprocess: Preprocess
    models: list[ModelRef]
    block: int | None
    storage_options: dict


def block_index(model: nn.Module, block: int, name: str) -> int:
    """The index `evaluate.residual_block` names in this model (-2 -> depth - 2)."""
    try:
        return range(len(model.blocks))[block]
    except IndexError:
        raise ConfigError(f"evaluate.residual_block={block}, but {name} has {len(model.blocks)} blocks") from None


def batched_readout(model: nn.Module, x: torch.Tensor, block: int | None):
    """`readout` in batches on the model's device; the results on the CPU."""
    device = next(model.parameters()).device
    parts = [[None if t is None else t.cpu() for t in readout(model, x[i:i + BATCH].to(device), block)]
             for i in range(0, len(x), BATCH)]
    return [None if p[0] is None else torch.cat(p) for p in zip(*parts)]


def measure(job: MeasureJob) -> dict:
    """Norm maps (final layer, residual stream), class-token attention maps and fidelity to the
    targets of every image of the job, plus features and pixels of the pictured ones."""
    so = job.storage_options
    images = [decode_rgb(data) for data in read_images(job.manifest, job.indices, so)]
    if job.store is not None:
        boxes = job.store.read_boxes(np.array(job.indices), 0)
    else:
        boxes = [crop_box(img.width, img.height, job.preprocess.size, "center") for img in images]
    x = torch.stack([job.preprocess(img, box) for img, box in zip(images, boxes)])
    shown = [i for i, index in enumerate(job.indices) if index in job.pictured]
    h, w = job.preprocess.size
    out = {"indices": job.indices, "block": None, "final": {}, "residual": {}, "attention": {}, "cosine": {}, "mse": {}, "features": {},
           "pixels": [np.asarray(images[i].resize((w, h), box=tuple(map(float, boxes[i])))) for i in shown]}
    target = torch.from_numpy(job.store.read(np.array(job.indices), 0)) if job.store is not None else None
    if target is not None:
        out["final"][TARGET] = metrics.token_norms(target).numpy()
        out["features"][TARGET] = target[shown].numpy()
    for ref in job.models:
        loaded = ref.load(so)
        if job.block is not None:
            out["block"] = block_index(loaded.model, job.block, ref.name)
        # norms, outliers and attention are the model's own; pictures and fidelity compare in the teacher's space
        final, residual, attention = batched_readout(loaded.model, x, job.block)
        with torch.inference_mode():
            comparable = final if loaded.projection is None else loaded.projection(final)
        out["final"][ref.name] = metrics.token_norms(final).numpy()
        out["features"][ref.name] = comparable[shown].numpy()
        if residual is not None:
            out["residual"][ref.name] = metrics.token_norms(residual).numpy()
        if attention is not None:
            out["attention"][ref.name] = attention.numpy()
        if target is not None:
            out["cosine"][ref.name] = metrics.cosine_per_image(comparable, target).numpy()
            out["mse"][ref.name] = metrics.mse_per_image(comparable, target).numpy()
    return out


def combine(parts: list[dict]) -> dict:
    """Task results -> one dict of arrays in index order."""
    parts = sorted(parts, key=lambda r: r["indices"][0])
    out = {"indices": [i for r in parts for i in r["indices"]], "pixels": [px for r in parts for px in r["pixels"]],
           "block": parts[0]["block"]}
    for key in ("final", "residual", "attention", "cosine", "mse", "features"):
        names = sorted(parts[0][key], key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))
        out[key] = {name: np.concatenate([r[key][name] for r in parts]) for name in names}
    return out


@dataclass
class ProbeJob:
    labeled: LabeledSet
    items: list[LabeledItem]
    preprocess: Preprocess
    models: list[ModelRef]
    weights: dict | None  # None: accumulate fit sums; else {model: {"seg": W, "depth": W}}: score
    examples: list[str]  # item ids whose predictions come back for the pictures
    storage_options: dict


def resized(arr: np.ndarray, box, size: tuple[int, int]) -> np.ndarray:
    """A label or depth map cropped to `box` and resized to (h, w) with nearest neighbour."""
    h, w = size
    img = Image.fromarray(arr.astype(np.int32) if arr.dtype.kind in "iu" else arr.astype(np.float32))
    return np.array(img.resize((w, h), Image.Resampling.NEAREST, box=tuple(map(float, box))))


def probe(job: ProbeJob) -> dict[str, ProbeSums]:
    """Fit sums (no weights yet) or val scores of every model on the job's labeled images."""
    so, labeled, size = job.storage_options, job.labeled, job.preprocess.size
    xs, masks, depths = [], [], []
    for item in job.items:
        img, mask, depth = load_item(item, labeled, so)
        box = crop_box(img.width, img.height, size, "center")
        xs.append(job.preprocess(img, box))
        masks.append(None if mask is None else torch.from_numpy(resized(mask, box, size).astype(np.int64)))
        depths.append(None if depth is None else torch.from_numpy(resized(depth, box, size)))
    num_classes = len(labeled.classes or [])
    out = {}
    for ref in job.models:
        model = ref.load(so).model  # the probe reads the model's own features, whatever their width
        feats = batched_readout(model, torch.stack(xs), None)[0]
        sums = ProbeSums()
        for item, f, mask, depth in zip(job.items, feats, masks, depths):
            if job.weights is None:
                sums.add_fit(f, mask, depth, tuple(model.patch_embed.patch_size), num_classes, labeled.ignore_index)
            else:
                sums.add_scores(f, mask, depth, job.weights[ref.name], num_classes, labeled.ignore_index,
                                item.id if item.id in job.examples else None)
        out[ref.name] = sums
    return out


def merge_sums(sums) -> ProbeSums:
    total = ProbeSums()
    for s in sums:
        total = total.merge(s)
    return total


@dataclass
class TrainedProbeJob:
    labeled: LabeledSet
    kind: str  # "seg" or "depth"
    preprocess: Preprocess  # the window is its size; its normalisation
    model: ModelRef
    settings: TrainedProbeSettings
    examples: list[str]  # val item ids whose predictions come back for the pictures
    storage_options: dict


def labeled_pixels(items: list[LabeledItem], labeled: LabeledSet, kind: str, storage_options):
    """(item, (3, H, W) pixels in [0, 1], (H, W) long labels or float depth) at the original resolution."""
    for item in items:
        img, mask, depth = load_item(item, labeled, storage_options)
        pixels = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        yield item, pixels, torch.from_numpy(mask if kind == "seg" else depth)


def trained_probe(job: TrainedProbeJob) -> ProbeSums:
    """Train one model's probe head of one kind on the train split and score it on the val
    split against the ground truth at each val image's own resolution (segmentation predicts at
    short side `settings.short_side` and resizes its logits back; scores and pictured predictions
    as `probe`)."""
    so, labeled, s, window, seg = job.storage_options, job.labeled, job.settings, job.preprocess.size, job.kind == "seg"
    pick = labeled.with_masks if seg else labeled.with_depth
    model = job.model.load(so).model.eval()
    device = next(model.parameters()).device
    features = vit_features(model)
    dim = features(torch.zeros(1, 3, *window, device=device))[0].shape[1]
    mean, std = job.preprocess.mean_tensor(), job.preprocess.std_tensor()
    train = [(x, y) for _, x, y in labeled_pixels(pick("train"), labeled, job.kind, so)]
    if seg:
        head = train_segmentation(features, dim, train, len(labeled.classes), labeled.ignore_index, window, mean, std, s, device)
    else:
        head = train_depth(features, dim, train, window, mean, std, s, device)
    stride, sums = stride_of(window, s.stride), ProbeSums()
    for item, x, y in labeled_pixels(pick("val"), labeled, job.kind, so):
        image = (x - mean) / std
        if seg:
            pred = segment(head, features, image, window, stride, s.short_side)
            conf = confusion(pred, y, len(labeled.classes), labeled.ignore_index)
            sums.seg_conf = conf if sums.seg_conf is None else sums.seg_conf + conf
        else:
            pred = estimate_depth(head, features, image, window, stride, s)
            sums.depth = sums.depth or DepthSums()
            sums.depth.add(pred, scored_depth(y, s))
        if item.id in job.examples:  # pictured at the model's input pixels, as the ridge probe's predictions
            box = crop_box(x.shape[-1], x.shape[-2], window, "center")
            sums.examples[item.id] = {job.kind: resized(pred.numpy(), box, window)}
    return sums


@dataclass
class ZeroShotJob:
    labeled: LabeledSet
    items: list[LabeledItem]
    preprocess: Preprocess  # its normalisation; the size comes from `params`
    models: list[ModelRef]
    queries: torch.Tensor  # (Q, D) unit class embeddings
    class_index: torch.Tensor  # (Q,) class of each query
    params: dict  # short_side, crop, stride, logit_scale, prob_threshold
    examples: list[str]  # item ids whose predictions come back for the pictures
    storage_options: dict


def dense_features(model: nn.Module, name: str):
    """(B, C, h, w) -> (B, h/p, w/p, D) patch features at any input size the model accepts."""
    ph, pw = model.patch_embed.patch_size
    device = next(model.parameters()).device
    fixed = None if getattr(model, "dynamic_img_size", False) else tuple(model.patch_embed.img_size)

    def features(x: torch.Tensor) -> torch.Tensor:
        if fixed is not None and tuple(x.shape[-2:]) != fixed:
            raise ConfigError(f"zero-shot segmentation runs {name} on {x.shape[-2]}x{x.shape[-1]} windows, its input is "
                              f"{fixed[0]}x{fixed[1]}: build it with teacher.model_kwargs: {{dynamic_img_size: true}} "
                              "(configs/clip.yaml does) or set evaluate.zeroshot.crop and short_side to its input size")
        with torch.inference_mode():
            tokens = model.forward_features(x.to(device))[:, model.num_prefix_tokens:].float().cpu()
        return tokens.reshape(x.shape[0], x.shape[-2] // ph, x.shape[-1] // pw, -1)

    return features


def zeroshot_segment(job: ZeroShotJob) -> dict[str, dict]:
    """Per model: the confusion matrix over the job's images and the predictions of the
    pictured ones (at the image's size)."""
    so, labeled = job.storage_options, job.labeled
    num_classes = len(labeled.classes)
    mean, std = job.preprocess.mean_tensor(), job.preprocess.std_tensor()
    loaded = [(item, *load_item(item, labeled, so)[:2]) for item in job.items]
    out = {}
    for ref in job.models:
        features = dense_features(ref.load(so).model, ref.name)
        conf, examples = np.zeros((num_classes, num_classes), dtype=np.int64), {}
        for item, img, mask in loaded:
            x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)[None] / 255.0
            pred = zeroshot.segment(features, (x - mean) / std, job.queries, job.class_index, num_classes, **job.params)[0]
            conf += confusion(pred, torch.from_numpy(mask), num_classes, labeled.ignore_index)
            if item.id in job.examples:
                examples[item.id] = pred.numpy().astype(np.int32)
        out[ref.name] = {"confusion": conf, "examples": examples}
    return out
