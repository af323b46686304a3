"""Test-time registers: the training-free alternative to PH-Reg, as a baseline.

"Vision Transformers Don't Need Trained Registers" (Jiang et al., 2025) finds that a few MLP
neurons ("register neurons") put the high-norm artifacts on their tokens, and removes the
artifacts at inference by appending one token (zero-initialised, no position embedding) that
receives the register neurons' signed maximum activation (the value of largest magnitude,
sign kept) over all tokens, while the neurons are zeroed at the patches. This module locates
those neurons in a timm `VisionTransformer` and builds the modified model. As in the published
code (nickjiang2378/test-time-registers, `activate_on_registers`/`sign_max`; its CLIP tower
appends the token before `ln_pre`, its DINOv2 after the position embedding) the zero token
enters before the pre-norm (timm's `norm_pre`: CLIP's `ln_pre`, an identity elsewhere) and the
maximum runs over every token, class token and register included. Three departures: the edit
is made per image of a batch (the published hook edits the first image only); per neuron (it
writes one scalar, the signed maximum over all register neurons of the layer, to every one of
them); and the token sits right after the prefix tokens rather than last (no position term, so
the blocks treat it alike anywhere; timm's `num_prefix_tokens` then still counts the patches
from the right place). Only the first two change values.

Location (`locate`), on a handful of images:
1. patch-token norms after every block; outliers are the tokens whose norm at `detect_block`
   exceeds `threshold` (default: mean + 3 standard deviations of those norms over all images);
2. neurons are considered in blocks up to `max_block` (default: the first block at which at
   least half of those outlier tokens already stand out by the same mean + 3 sigma rule there:
   the block whose MLP creates them);
3. a neuron's score is its mean absolute activation over an image's outlier tokens, averaged
   over the images that have outliers; the `top_k` highest are the register neurons.
   `top_k="auto"` sweeps k as the paper does, until the outliers vanish: the smallest k whose
   modified model has no token above the threshold at `detect_block` on the same images
   (k doubled until one has none, then bisected, assuming more neurons never bring outliers
   back; every k tried is recorded). If none up to `max_top_k` does, the k with the fewest.

A neuron's activation is the input of its block's `mlp.fc2` (column j of fc2 is what neuron j
writes): the same place for timm's `Mlp`, `GluMlp` and `SwiGLU`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from pipeline.errors import ConfigError, PipelineError

SIGMAS = 3.0  # the outlier rule of the detection: mean + 3 sigma of patch norms


@dataclass(frozen=True)
class Neuron:
    layer: int  # block index
    index: int  # hidden unit of that block's MLP
    score: float  # mean |activation| at outlier tokens


@dataclass
class Location:
    neurons: list[Neuron]
    detect_block: int
    threshold: float
    max_block: int
    images: int
    images_with_outliers: int
    sweep: dict[int, float] | None = None  # top_k="auto": k tried -> outlier tokens per image left

    def to_dict(self) -> dict:
        return {**asdict(self), "neurons": [asdict(n) for n in self.neurons]}


def check_supported(model: nn.Module, name: str) -> None:
    if not isinstance(model, VisionTransformer) or not all(hasattr(getattr(b, "mlp", None), "fc2") for b in model.blocks):
        raise ConfigError(f"test-time registers need a timm VisionTransformer with MLP blocks (mlp.fc2); {name} is a "
                          f"{type(model).__name__}")


def outlier_threshold(norms: torch.Tensor) -> float:
    """mean + 3 sigma of a set of token norms."""
    return (norms.mean() + SIGMAS * norms.std()).item()


@torch.inference_mode()
def block_norms(model: nn.Module, x: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """(blocks, N, patches) norms of the patch tokens after every block (residual stream), on the CPU."""
    prefix, out = model.num_prefix_tokens, []
    for i in range(0, len(x), batch):
        norms = []
        hooks = [b.register_forward_hook(lambda m, a, o: norms.append(o[:, prefix:].float().norm(dim=-1).cpu()))
                 for b in model.blocks]
        try:
            model.forward_features(x[i:i + batch])
        finally:
            for h in hooks:
                h.remove()
        out.append(torch.stack(norms))
    return torch.cat(out, dim=1)


def first_outlier_block(norms: torch.Tensor, outliers: torch.Tensor) -> int:
    """The first block at which at least half of the outlier tokens exceed that block's own
    mean + 3 sigma: where they are created."""
    for b, n in enumerate(norms):
        if (n[outliers] > outlier_threshold(n)).float().mean() >= 0.5:
            return b
    return len(norms) - 1


@torch.inference_mode()
def neuron_scores(model: nn.Module, x: torch.Tensor, outliers: torch.Tensor, max_block: int, batch: int = 8) -> torch.Tensor:
    """(max_block + 1, hidden) sum over images with outliers of each neuron's mean |activation|
    over that image's outlier patch tokens."""
    prefix = model.num_prefix_tokens
    hidden = model.blocks[0].mlp.fc2.in_features
    scores = torch.zeros(max_block + 1, hidden)
    for i in range(0, len(x), batch):
        mask = outliers[i:i + batch].float()  # (B, patches)
        weights = mask / mask.sum(1, keepdim=True).clamp(min=1)  # mean over each image's outliers

        def score(layer):
            def hook(module, args):
                act = args[0][:, prefix:].abs().float().cpu()  # (B, patches, hidden)
                scores[layer] += torch.einsum("bp,bph->h", weights, act)
            return hook

        hooks = [model.blocks[b].mlp.fc2.register_forward_pre_hook(score(b)) for b in range(max_block + 1)]
        try:
            model.forward_features(x[i:i + batch])
        finally:
            for h in hooks:
                h.remove()
    return scores


def sweep_top_k(model: nn.Module, x: torch.Tensor, ranked: list[tuple[int, int]], detect_block: int, threshold: float,
                max_top_k: int) -> tuple[int, dict[int, float]]:
    """The smallest k whose top-k neurons leave no outlier at `detect_block` (module docstring),
    and the outliers per image of every k tried."""
    tried: dict[int, float] = {}

    def outliers_left(k: int) -> float:
        if k not in tried:
            trial = TestTimeRegisters(model, ranked[:k])
            try:
                tried[k] = (block_norms(trial, x)[detect_block] > threshold).sum().item() / len(x)
            finally:
                trial.remove()
        return tried[k]

    cap = min(max_top_k, len(ranked))
    high = 1
    while outliers_left(high) > 0 and high < cap:
        high = min(2 * high, cap)
    if outliers_left(high) > 0:  # none vanishes: the fewest outliers, the smallest k among equals
        return min(tried, key=lambda k: (tried[k], k)), dict(sorted(tried.items()))
    low = high // 2  # outliers_left(low) > 0, or low == 0
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if outliers_left(mid) == 0 else (mid, high)
    return high, dict(sorted(tried.items()))


def locate(model: nn.Module, x: torch.Tensor, detect_block: int = -1, threshold: float | None = None,
           max_block: int | None = None, top_k: int | str = 10, name: str = "the model", max_top_k: int = 64) -> Location:
    """The register neurons of `model`, from the images `x` (see the module docstring)."""
    check_supported(model, name)
    depth = len(model.blocks)
    try:
        detect = range(depth)[detect_block]
        if max_block is not None:
            max_block = range(depth)[max_block]
    except IndexError:
        raise ConfigError(f"test-time registers: detect_block={detect_block} / max_block={max_block}, but {name} has "
                          f"{depth} blocks") from None
    norms = block_norms(model, x)
    if threshold is None:
        threshold = outlier_threshold(norms[detect])
    outliers = norms[detect] > threshold
    with_outliers = int(outliers.any(1).sum())
    if with_outliers == 0:
        raise PipelineError(f"test-time registers: no patch token of {name} has a norm above {threshold:.2f} after block "
                            f"{detect} on {len(x)} images; lower the threshold or choose another detect_block")
    if max_block is None:
        max_block = first_outlier_block(norms, outliers)
    scores = neuron_scores(model, x, outliers, max_block) / with_outliers
    values, flat = scores.flatten().topk(min(max_top_k if top_k == "auto" else top_k, scores.numel()))
    hidden = scores.shape[1]
    neurons = [Neuron(int(f) // hidden, int(f) % hidden, float(v)) for v, f in zip(values, flat)]
    sweep = None
    if top_k == "auto":
        k, sweep = sweep_top_k(model, x, [(n.layer, n.index) for n in neurons], detect, float(threshold), max_top_k)
        neurons = neurons[:k]
    return Location(neurons, detect, float(threshold), max_block, len(x), with_outliers, sweep)


def signed_max(h: torch.Tensor) -> torch.Tensor:
    """(N, tokens, k) -> (N, k): over the tokens, the value of largest magnitude with its sign,
    the minimum on a tie (the reference's `sign_max`, per image and per neuron)."""
    top, bottom = h.amax(dim=1), h.amin(dim=1)
    return torch.where(top.abs() > bottom.abs(), top, bottom)


class TestTimeRegisters(nn.Module):
    """A timm VisionTransformer with one test-time register: a zero token inserted after the
    prefix tokens (class token, registers) before the pre-norm (`norm_pre`), where a token
    without position embedding may sit anywhere. At every register neuron, the register
    receives the neuron's signed maximum over all tokens and the patch tokens get 0; the prefix
    tokens keep theirs, as in the published method.

    It reads like the timm model it wraps (`forward_features`, `blocks`, `patch_embed`,
    `cls_token`, `num_prefix_tokens` one larger), so its patch features have the teacher's
    shape and every measurement of a timm model applies to it. The wrapped model gets hooks:
    give it a model of its own."""

    __test__ = False  # a class named Test* is not a test suite

    def __init__(self, model: nn.Module, neurons: list[tuple[int, int]], name: str = "the model"):
        super().__init__()
        check_supported(model, name)
        self.model = model
        self.at = model.num_prefix_tokens
        self.num_prefix_tokens = model.num_prefix_tokens + 1
        hidden = model.blocks[0].mlp.fc2.in_features
        by_layer: dict[int, list[int]] = {}
        for layer, index in neurons:
            if not (0 <= layer < len(model.blocks) and 0 <= index < hidden):
                raise ConfigError(f"test-time registers: neuron ({layer}, {index}) is not in {name} "
                                  f"({len(model.blocks)} blocks of {hidden} hidden units)")
            by_layer.setdefault(layer, []).append(index)
        # before norm_pre: the reference appends the token before CLIP's ln_pre, which turns it
        # into ln_pre's bias; for models without a pre-norm this is the first block's input
        self._hooks = [model.norm_pre.register_forward_pre_hook(self._insert)] + [
            model.blocks[layer].mlp.fc2.register_forward_pre_hook(self._mover(torch.tensor(sorted(set(indices)))))
            for layer, indices in sorted(by_layer.items())]
        # blocks that find the patches by a count of prefix tokens (the CLIP dense last block,
        # whose model sets `prefix` at every forward) must count the extra token too
        self._hooks += [b.register_forward_pre_hook(self._count_register) for b in model.blocks if hasattr(b, "prefix")]

    def _count_register(self, module, args):
        module.prefix = self.num_prefix_tokens

    def remove(self) -> None:
        """Take the hooks off the wrapped model: it is the plain model again."""
        for hook in self._hooks:
            hook.remove()

    @property
    def blocks(self):
        return self.model.blocks

    @property
    def patch_embed(self):
        return self.model.patch_embed

    @property
    def cls_token(self):
        return self.model.cls_token

    @property
    def embed_dim(self) -> int:
        return self.model.embed_dim

    def _insert(self, module, args):
        x = args[0]
        register = x.new_zeros(x.shape[0], 1, x.shape[2])
        return (torch.cat([x[:, :self.at], register, x[:, self.at:]], dim=1), *args[1:])

    def _mover(self, indices: torch.Tensor):
        def move(module, args):
            h = args[0].clone()  # never edit a tensor in place that autograd or the caller may still hold
            idx = indices.to(h.device)
            # over all tokens, class token and register included, as the reference's sign_max
            h[:, self.at, idx] = signed_max(h[:, :, idx])  # (N, k): per image, per neuron
            h[:, self.num_prefix_tokens:, idx] = 0
            return (h, *args[1:])
        return move

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)
