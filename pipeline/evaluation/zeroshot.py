"""Zero-shot open-vocabulary segmentation with CLIP-space patch features, following the
protocol of the PH-Reg / NACLIP evaluation code:

- every class has one or more names (synonyms); every name is written into CLIP's 80 ImageNet
  prompt templates, the text embeddings of a name are normalised, averaged over templates and
  normalised again (one *query* per name);
- the image's short side is resized, then sliding windows (crop, stride) cover it; each
  window's patch features are L2-normalised, their cosine to every query is upsampled
  bilinearly to the window, and overlapping windows are averaged;
- softmax over queries with a fixed logit scale (40), max over a class's synonyms, argmax;
  with a probability threshold, pixels whose best probability is below it become class 0
  (background);
- mIoU from the confusion matrix summed over the data set.

Class embeddings come from any text encoder: an open_clip text tower here, or a
`.safetensors` file holding `embeddings` (Q, D) and `class_index` (Q,) written elsewhere.
"""
from __future__ import annotations

import hashlib
import json
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load, save

from pipeline.errors import ConfigError, PipelineError
from pipeline.storage import absolute, exists, join_url, read_bytes, write_bytes_atomic

# CLIP's 80 ImageNet prompt templates (Radford et al., 2021, the released prompt-engineering
# notebook), the prompts NACLIP, SCLIP and PH-Reg use for segmentation.
IMAGENET_TEMPLATES = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
)


# --- class names and their embeddings --------------------------------------------------------

def parse_class_names(classes: Sequence[str]) -> tuple[list[str], list[int]]:
    """One entry per class, synonyms separated by commas ("person, person in shirt") ->
    (query names, class index of each query)."""
    names, index = [], []
    for c, entry in enumerate(classes):
        synonyms = [s.strip() for s in entry.split(",") if s.strip()]
        if not synonyms:
            raise PipelineError(f"zero-shot: class {c} has no name")
        names += synonyms
        index += [c] * len(synonyms)
    return names, index


def query_embeddings(encode_text: Callable[[list[str]], torch.Tensor], names: Sequence[str],
                     templates: Sequence[str] = IMAGENET_TEMPLATES) -> torch.Tensor:
    """(Q, D) unit vectors: per name, the normalised mean of its normalised template embeddings."""
    out = []
    for name in names:
        e = F.normalize(encode_text([t.format(name) for t in templates]).float(), dim=-1)
        out.append(F.normalize(e.mean(0), dim=0))
    return torch.stack(out)


def text_tower_quick_gelu(model: str, pretrained: str | None) -> bool:
    """Whether the text tower must be built with QuickGELU, the activation its weights were
    trained with. open_clip builds `ViT-B-16` with nn.GELU even for OpenAI's weights (trained
    with QuickGELU) and only warns, which shifts every class embedding; here the tag decides,
    and a model config whose activation contradicts its tag is refused."""
    import open_clip

    if pretrained is None:  # a seeded random tower: the model config's own activation
        return False
    model_quick = bool((open_clip.get_model_config(model) or {}).get("quick_gelu", False))
    tag = open_clip.get_pretrained_cfg(model, pretrained)
    if not tag:
        if "/" in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
            return model_quick  # a weights file: the model name says how it was trained
        raise PipelineError(f"zero-shot: open_clip has no weights {pretrained!r} for text_model {model!r}; "
                            f"its tags: {open_clip.list_pretrained_tags_by_model(model)}")
    tag_quick = bool(tag.get("quick_gelu", False))
    if model_quick and not tag_quick:
        raise PipelineError(f"zero-shot: text_model {model!r} uses QuickGELU but the weights {pretrained!r} were trained "
                            f"with GELU; use {model.removesuffix('-quickgelu')!r}")
    return tag_quick


def open_clip_text_encoder(model: str, pretrained: str | None, seed: int) -> Callable[[list[str]], torch.Tensor]:
    """The text tower of an open_clip model, with the activation its weights need;
    `pretrained=None` builds it from a seeded random initialisation (offline machines, tests)."""
    import open_clip

    quick_gelu = text_tower_quick_gelu(model, pretrained)
    torch.manual_seed(seed)
    clip = open_clip.create_model(model, pretrained=pretrained, force_quick_gelu=quick_gelu).eval()
    tokenizer = open_clip.get_tokenizer(model)

    @torch.no_grad()
    def encode(texts: list[str]) -> torch.Tensor:
        return clip.encode_text(tokenizer(texts))

    return encode


def save_class_embeddings(url: str, embeddings: torch.Tensor, class_index: Sequence[int], storage_options=None) -> None:
    data = save({"embeddings": embeddings.float().contiguous(), "class_index": torch.as_tensor(class_index, dtype=torch.int64)})
    write_bytes_atomic(url, data, storage_options)


def load_class_embeddings(path: str, num_classes: int, dim: int | None, storage_options=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Read precomputed queries; refuse a file that does not fit the classes or the features
    (of width `dim`; None when it is known only once a model is loaded)."""
    try:
        data = read_bytes(path, storage_options)
    except FileNotFoundError:
        raise PipelineError(f"class embeddings {path}: no such file") from None
    try:
        t = load(data)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same message
        raise PipelineError(f"class embeddings {path}: not a readable .safetensors file ({e})") from e
    if set(t) != {"embeddings", "class_index"}:
        raise PipelineError(f"class embeddings {path}: expected tensors 'embeddings' and 'class_index', found {sorted(t)}")
    emb, idx = t["embeddings"].float(), t["class_index"].long()
    if emb.ndim != 2 or idx.shape != (emb.shape[0],):
        raise PipelineError(f"class embeddings {path}: embeddings {tuple(emb.shape)} and class_index "
                            f"{tuple(idx.shape)} must be (Q, D) and (Q,)")
    if dim is not None and emb.shape[1] != dim:
        raise PipelineError(f"class embeddings {path}: dimension {emb.shape[1]}, the model's features have {dim}")
    if sorted(set(idx.tolist())) != list(range(num_classes)):
        raise PipelineError(f"class embeddings {path}: class_index must name every class 0..{num_classes - 1} "
                            f"(found {sorted(set(idx.tolist()))})")
    return F.normalize(emb, dim=-1), idx


# --- dense prediction ------------------------------------------------------------------------

def resize_short_side(image: torch.Tensor, short: int) -> torch.Tensor:
    """(B, C, H, W) resized so that min(H, W) == short, aspect kept (bilinear)."""
    h, w = image.shape[-2:]
    s = short / min(h, w)
    size = (max(1, round(h * s)), max(1, round(w * s)))
    return F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)


def window_boxes(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """(y0, y1, x0, x1) of sliding windows covering every pixel; the last window of a row or
    column is moved back to end at the border, and a crop larger than the image is the image."""
    if crop <= 0 or stride <= 0:
        raise PipelineError(f"sliding windows need crop > 0 and stride > 0 (got crop {crop}, stride {stride})")

    def starts(n):
        steps = max(n - crop + stride - 1, 0) // stride + 1
        return [max(min(i * stride + crop, n) - crop, 0) for i in range(steps)]

    return [(y, min(y + crop, height), x, min(x + crop, width)) for y in starts(height) for x in starts(width)]


def cosine_logits(features: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """(B, gh, gw, D) patch features x (Q, D) unit queries -> (B, Q, gh, gw) cosines."""
    if features.shape[-1] != queries.shape[-1]:
        raise PipelineError(f"the model's patch features have {features.shape[-1]} dimensions, the class queries "
                            f"{queries.shape[-1]}: use the text tower or class embeddings of this model's image tower")
    return torch.einsum("bhwd,qd->bqhw", F.normalize(features.float(), dim=-1), queries)


def slide_logits(features_fn: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, queries: torch.Tensor,
                 crop: int, stride: int) -> torch.Tensor:
    """(B, Q, H, W) cosines of the whole image: each window's patch cosines upsampled to the
    window, overlapping windows averaged. `features_fn` maps (B, C, h, w) -> (B, gh, gw, D)."""
    b, _, h, w = image.shape
    total = image.new_zeros((b, queries.shape[0], h, w), dtype=torch.float32)
    count = image.new_zeros((1, 1, h, w), dtype=torch.float32)
    for y0, y1, x0, x1 in window_boxes(h, w, crop, stride):
        logits = cosine_logits(features_fn(image[:, :, y0:y1, x0:x1]), queries)
        total[:, :, y0:y1, x0:x1] += F.interpolate(logits, size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False)
        count[:, :, y0:y1, x0:x1] += 1
    return total / count


def predict_classes(logits: torch.Tensor, class_index: torch.Tensor, num_classes: int, logit_scale: float,
                    prob_threshold: float = 0.0) -> torch.Tensor:
    """(B, Q, H, W) cosines -> (B, H, W) class per pixel: softmax over queries at the logit
    scale, max over each class's synonyms, argmax; below `prob_threshold` -> class 0."""
    probs = torch.softmax(logits * logit_scale, dim=1)
    per_class = probs.new_full((probs.shape[0], num_classes, *probs.shape[2:]), -1.0)
    idx = class_index.view(1, -1, 1, 1).expand_as(probs)
    per_class = per_class.scatter_reduce(1, idx, probs, reduce="amax", include_self=True)
    best, pred = per_class.max(1)
    if prob_threshold > 0:
        pred[best < prob_threshold] = 0
    return pred


def segment(features_fn: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, queries: torch.Tensor,
            class_index: torch.Tensor, num_classes: int, *, short_side: int, crop: int, stride: int,
            logit_scale: float, prob_threshold: float) -> torch.Tensor:
    """(B, C, H, W) normalised image -> (B, H, W) classes at the image's own size."""
    size = image.shape[-2:]
    logits = slide_logits(features_fn, resize_short_side(image, short_side), queries, crop, stride)
    logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return predict_classes(logits, class_index, num_classes, logit_scale, prob_threshold)


def text_queries_key(z, names: Sequence[str]) -> str:
    """Everything the text tower's queries depend on, hashed: the tower and its weights (its
    seed when random, and the libraries that initialise it), the names and the templates."""
    import open_clip

    what = {"text_model": z.text_model, "text_pretrained": z.text_pretrained,
            "text_seed": z.text_seed if z.text_pretrained is None else None, "names": list(names),
            "templates": list(IMAGENET_TEMPLATES), "open_clip": open_clip.__version__, "torch": torch.__version__}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def class_queries(z, classes: list[str], dim: int | None, so, saved: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, D) unit class embeddings and the class of each: from evaluate.embeddings,
    else from the text tower (synonyms x CLIP's 80 templates). Checked against the features'
    width `dim` here when it is known, else in the tasks.

    With `saved` (a folder), the text tower's queries are kept there, named by what they
    depend on, and read back by the next evaluation of the same classes: a benchmark's
    thousands of prompts go through the text tower once, not once per student."""
    if z.embeddings:
        return load_class_embeddings(absolute(z.embeddings), len(classes), dim, so)
    names, index = parse_class_names(classes)
    url = join_url(saved, f"{text_queries_key(z, names)}.safetensors") if saved else None
    if url and exists(url, so):
        queries, _ = load_class_embeddings(url, len(classes), None, so)
    else:
        queries = query_embeddings(open_clip_text_encoder(z.text_model, z.text_pretrained, z.text_seed), names)
        if url:
            save_class_embeddings(url, queries, index, so)
    if dim is not None and queries.shape[1] != dim:
        raise ConfigError(f"the text tower {z.text_model} embeds in {queries.shape[1]} dimensions, the models' features have "
                          f"{dim}: choose the CLIP text tower of the image tower, or evaluate.embeddings")
    return queries, torch.tensor(index)
