"""Teacher and student models: plain timm models, built from a `TeacherConfig`.

The student is the teacher's own timm architecture built with register tokens and
`no_embed_class=True`, initialised from the teacher's weights (DESIGN section 1). It is a
plain timm model, so timm's hub export and `create_model('local-dir:...')` work on it.
"""
from __future__ import annotations

import fnmatch
import hashlib
import inspect
import io
import json
import pickle
from dataclasses import asdict, dataclass, field

import safetensors.torch
import timm
import torch
from torch import nn

import pipeline.models.clip  # noqa: F401  (registers the CLIP dense-feature models with timm)
import pipeline.models.planted  # noqa: F401  (registers the planted-artifact teacher with timm)
from pipeline.config import StudentConfig, TeacherConfig
from pipeline.data.images import Preprocess
from pipeline.errors import ConfigError, PipelineError, UnsafeWeightsError
from pipeline.storage import read_bytes, url_to_fs


@dataclass(frozen=True)
class TeacherSpec:
    """What later stages must agree on, derived from the config without loading weights."""

    model: str
    weights: str  # identity of the weights: timm pretrained tag, file digest or random-init seed
    img_size: tuple[int, int]
    patch: tuple[int, int]
    grid: tuple[int, int]
    dim: int
    num_prefix_tokens: int
    preprocess: Preprocess
    # teacher.model_kwargs as JSON reads them back: they can change the features (depth, a
    # dense block, planted artifacts) where the name, weights and shapes above do not
    model_kwargs: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The spec as a store records and hashes it; no model_kwargs entry when there are none,
        so stores of teachers built without any keep the names they were made with."""
        d = asdict(self)
        d.update(img_size=list(self.img_size), patch=list(self.patch), grid=list(self.grid), preprocess=self.preprocess.to_dict())
        if not self.model_kwargs:
            del d["model_kwargs"]
        return d


def _model_kwargs(cfg: TeacherConfig, extra: dict | None = None) -> dict:
    return {"img_size": cfg.hw, "num_classes": 0, **cfg.model_kwargs, **(extra or {})}


def _create(cfg: TeacherConfig, **extra) -> nn.Module:
    try:
        return timm.create_model(cfg.model, pretrained=False, **_model_kwargs(cfg, extra))
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ConfigError(f"timm has no model named {cfg.model!r} (see timm.list_models())") from None
        raise


def load_weights(url: str, storage_options=None) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file, never executing pickled code."""
    try:
        data = read_bytes(url, storage_options)
    except FileNotFoundError:
        raise ConfigError(f"weights file not found: {url}") from None
    if url.endswith(".safetensors"):
        return safetensors.torch.load(data)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch names the offending global on a later line than its generic first one
        lines = [line for line in str(e).splitlines() if line.strip()]
        detail = next((line for line in lines if "GLOBAL" in line), lines[0] if lines else "")
        raise UnsafeWeightsError(
            f"refusing to load {url}: it contains pickled objects other than tensors "
            f"(loading it would execute code). Convert it to .safetensors. Detail: {detail}"
        ) from None
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise PipelineError(f"{url} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def weights_identity(cfg: TeacherConfig, storage_options=None) -> str:
    if cfg.checkpoint:
        fs, path = url_to_fs(cfg.checkpoint, storage_options)
        digest = hashlib.sha256()
        with fs.open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
        return f"sha256:{digest.hexdigest()}"
    if cfg.pretrained:
        with torch.device("meta"):
            pcfg = _create(cfg).pretrained_cfg
        return f"timm:{pcfg.get('hf_hub_id') or pcfg.get('url') or pcfg.get('architecture')}:{pcfg.get('tag')}"
    return f"random-init:seed={cfg.init_seed}:torch={torch.__version__.split('+')[0]}:timm={timm.__version__}"


def describe_teacher(cfg: TeacherConfig, storage_options=None) -> TeacherSpec:
    """Shapes and preprocessing of the teacher, on the meta device (no weights in memory)."""
    with torch.device("meta"):
        model = _create(cfg)
    check_vit(model, cfg.model)
    check_grid(model, cfg.hw, cfg.model)
    data = timm.data.resolve_model_data_config(model)
    return TeacherSpec(
        model=cfg.model,
        weights=weights_identity(cfg, storage_options),
        img_size=cfg.hw,
        patch=tuple(model.patch_embed.patch_size),
        grid=tuple(model.patch_embed.grid_size),
        dim=feature_dim(model),
        num_prefix_tokens=model.num_prefix_tokens,
        preprocess=Preprocess(cfg.hw, data["interpolation"], tuple(data["mean"]), tuple(data["std"])),
        model_kwargs=json.loads(json.dumps(cfg.model_kwargs, sort_keys=True, default=str)),
    )


def feature_dim(model: nn.Module) -> int:
    """Width of `patch_features`: the embedding width, or a projected one (CLIP dense models)."""
    return getattr(model, "feature_dim", model.embed_dim)


def check_vit(model: nn.Module, name: str) -> None:
    needed = ("patch_embed", "blocks", "num_prefix_tokens", "forward_features")
    missing = [a for a in needed if not hasattr(model, a)]
    if missing or not hasattr(model.patch_embed, "grid_size"):
        raise ConfigError(f"{name} is not a ViT-family timm model (missing {missing or ['patch_embed.grid_size']})")


def check_grid(model: nn.Module, img_size: tuple[int, int], name: str) -> None:
    """Refuse an input size the patch grid does not tile exactly. timm floors the grid (or pads,
    with dynamic padding), so the image's right/bottom strip maps to no token or a padded one:
    a pixel flip is then no longer a token flip (512 px with patch 14 is off by 8 px), and TTA
    recovery and joint image/target flips would silently mix neighbouring patches."""
    patch = tuple(model.patch_embed.patch_size)
    if any(s % p for s, p in zip(img_size, patch)):
        fits = " or ".join(f"{(s // p) * p}/{(s // p + 1) * p}" for s, p in zip(img_size, patch) if s % p)
        raise ConfigError(f"teacher.img_size {list(img_size)} is not a multiple of {name}'s patch size {list(patch)}: "
                          f"the patch grid would not tile the image and flips would misalign tokens; use e.g. {fits}")


def load_teacher(cfg: TeacherConfig, storage_options=None, device: str | torch.device = "cpu") -> nn.Module:
    """The frozen teacher in eval mode."""
    if cfg.checkpoint:
        state = load_weights(cfg.checkpoint, storage_options)
        # timm's own filter adapts the checkpoint (key renames, pos_embed resampling to img_size)
        model = timm.create_model(
            cfg.model, pretrained=True, pretrained_cfg_overlay={"state_dict": state, "source": ""}, **_model_kwargs(cfg)
        )
    elif cfg.pretrained:
        model = timm.create_model(cfg.model, pretrained=True, **_model_kwargs(cfg))
    else:
        with torch.random.fork_rng():
            torch.manual_seed(cfg.init_seed)
            model = _create(cfg)
    check_vit(model, cfg.model)
    check_grid(model, cfg.hw, cfg.model)
    model.requires_grad_(False)
    return model.eval().to(device)


def register_kwarg(model: nn.Module) -> str:
    params = inspect.signature(type(model).__init__).parameters
    for name in ("reg_tokens", "num_reg_tokens"):
        if name in params:
            return name
    raise ConfigError(f"{type(model).__name__} does not support register tokens in timm")


def student_skeleton(teacher_cfg: TeacherConfig, registers: int) -> nn.Module:
    """The student architecture (random weights): the teacher's, plus registers, prefix
    tokens without position embedding."""
    with torch.device("meta"):
        base = _create(teacher_cfg)
    # a recipe may give its student another architecture argument (CLIP: the value-path last block)
    extra = getattr(base, "STUDENT_KWARGS", {})
    return _create(teacher_cfg, **{register_kwarg(base): registers, "no_embed_class": True, **extra})


def build_student(teacher: nn.Module, teacher_cfg: TeacherConfig, cfg: StudentConfig) -> nn.Module:
    """The teacher's architecture with `cfg.registers` registers, initialised from the teacher."""
    if getattr(teacher, "reg_token", None) is not None:
        raise ConfigError(f"{teacher_cfg.model} already has register tokens; PH-Reg adds them to a model without")
    student = student_skeleton(teacher_cfg, cfg.registers)
    state = {k: v.clone() for k, v in teacher.state_dict().items()}
    if not getattr(teacher, "no_embed_class", True) and state.get("pos_embed") is not None:
        # Fold the class position into the class token: identical outputs, prefix without position.
        n = teacher.num_prefix_tokens
        if "cls_token" in state:
            state["cls_token"] = state["cls_token"] + state["pos_embed"][:, :1]
        state["pos_embed"] = state["pos_embed"][:, n:]
    missing, unexpected = student.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"reg_token"}:
        raise PipelineError(f"student does not match teacher: missing {missing}, unexpected {unexpected}")
    if student.reg_token is not None:
        gen = torch.Generator().manual_seed(cfg.register_seed)
        with torch.no_grad():
            student.reg_token.copy_(torch.randn(student.reg_token.shape, generator=gen) / student.embed_dim**0.5)
    return student.to(next(teacher.parameters()).device)


def student_base(teacher_cfg: TeacherConfig, cfg: StudentConfig) -> TeacherConfig:
    """The model a student is built from: the teacher itself (PH-Reg), or `student.model`."""
    if cfg.model is None:
        return teacher_cfg
    return TeacherConfig(model=cfg.model, pretrained=cfg.pretrained, checkpoint=cfg.checkpoint, img_size=teacher_cfg.img_size,
                         init_seed=teacher_cfg.init_seed, model_kwargs=cfg.model_kwargs)


def build_any_student(teacher_cfg: TeacherConfig, cfg: StudentConfig, teacher: TeacherSpec, storage_options=None,
                      loaded_teacher: nn.Module | None = None) -> tuple[nn.Module, nn.Module | None]:
    """(student, projection): the teacher's architecture with registers, or another one whose
    patch grid matches the teacher's, with a linear map to the teacher's width if it differs."""
    base_cfg = student_base(teacher_cfg, cfg)
    if cfg.model is None and loaded_teacher is not None:
        base = loaded_teacher
    else:
        base = load_teacher(base_cfg, storage_options)
    grid = tuple(base.patch_embed.grid_size)
    if grid != tuple(teacher.grid):
        raise ConfigError(
            f"student {base_cfg.model} has a {grid[0]}x{grid[1]} patch grid at img_size {base_cfg.img_size}, the teacher's "
            f"targets are {teacher.grid[0]}x{teacher.grid[1]}: choose a student whose patch size gives the same grid"
        )
    student = build_student(base, base_cfg, cfg)
    if feature_dim(student) == teacher.dim:
        return student, None
    with torch.random.fork_rng():
        torch.manual_seed(cfg.register_seed)
        return student, nn.Linear(feature_dim(student), teacher.dim)


def unlock(model: nn.Module, patterns: list[str]) -> list[str]:
    """Freeze everything, then unfreeze parameters matching the patterns. Returns their names."""
    last = str(len(model.blocks) - 1)
    patterns = [p.replace("{last}", last) for p in patterns]
    names = []
    for name, param in model.named_parameters():
        param.requires_grad_(any(fnmatch.fnmatchcase(name, p) for p in patterns))
        if param.requires_grad:
            names.append(name)
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n, _ in model.named_parameters())]
    if getattr(model, "reg_token", None) is None and "reg_token" in unmatched:
        unmatched.remove("reg_token")  # a student with 0 registers has none to unlock
    if unmatched:
        raise ConfigError(f"unlock patterns match no parameter: {unmatched}")
    return names


class PatchFeatures(nn.Module):
    """Training view of a student: forward returns its `patch_features`, mapped to the
    teacher's width by `projection` when the student is narrower. DDP must wrap a module
    whose forward is the computation, or its gradient hooks never run."""

    def __init__(self, model: nn.Module, projection: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.projection = projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = patch_features(self.model, x)
        return features if self.projection is None else self.projection(features)


def patch_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Patch tokens of the final (normed) layer, prefix tokens removed: (N, gh, gw, D)."""
    tokens = model.forward_features(x)[:, model.num_prefix_tokens:]
    gh, gw = model.patch_embed.grid_size
    return tokens.reshape(x.shape[0], gh, gw, tokens.shape[-1])


@torch.inference_mode()
def readout(model: nn.Module, x: torch.Tensor, block: int | None = None):
    """One forward pass, three views of it (used by the evaluate stage):
    - final (normed) patch features (N, gh, gw, D), as `patch_features`;
    - the residual stream after `block` (before the final norm), patch tokens (N, gh, gw, D),
      or None when `block` is None;
    - the class token's attention over the patches in the last block, mean over heads
      (N, gh, gw), or None without a class token or with another attention than timm's
      plain `Attention` (e.g. rotary position embeddings)."""
    from timm.layers import Attention

    captured: dict[str, torch.Tensor] = {}
    hooks = []
    if block is not None:
        hooks.append(model.blocks[block].register_forward_hook(lambda m, i, out: captured.__setitem__("residual", out)))
    attn = model.blocks[-1].attn
    with_attention = type(attn) is Attention and getattr(model, "cls_token", None) is not None
    if with_attention:
        hooks.append(attn.register_forward_pre_hook(lambda m, args: captured.__setitem__("attn_in", args[0])))
    try:
        final = patch_features(model, x)
    finally:
        for h in hooks:
            h.remove()
    n, gh, gw, _ = final.shape
    prefix = model.num_prefix_tokens
    residual = captured["residual"][:, prefix:].reshape(n, gh, gw, -1) if block is not None else None
    cls_attention = None
    if "attn_in" in captured:  # absent when the last block never calls its attention module (CLIP dense blocks)
        t = captured["attn_in"]
        qkv = attn.qkv(t).reshape(n, t.shape[1], 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        weights = ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (N, heads, 1, tokens)
        cls_attention = weights[:, :, 0, prefix:].mean(1).reshape(n, gh, gw)
    return final, residual, cls_attention
