"""A teacher whose artifact tokens are known by construction: `vit_planted_tiny_patch8`.

Randomly initialised ViTs have no artifact tokens and no pretrained weights can be downloaded
on an offline machine, so the pipeline's effect cannot be shown there on a real model. This
timm model plants artifacts the way Denoising Vision Transformers (DVT) describe them: tied to
grid positions, independent of the image.

- After block `plant_block` (default: the second-to-last) a large fixed vector (norm
  `plant_norm`) is added to the residual stream of the patch tokens at a few fixed cells
  (`plant_cells`, fractions of the grid). It lives in `plant_channels` feature channels that
  the patch and position embeddings leave empty, as the "massive activations" of trained ViTs
  live in a few fixed channels.
- The final LayerNorm weighs those channels `plant_gain` times more, so the planted tokens also
  stand out in the final normed features, where the denoised targets live.
- Each cell's artifact is switched on by the position embedding: its strength is
  `relu(e - plant_off) / (plant_key - plant_off)`, `e` being that cell's position embedding in
  one "trigger" channel, initialised to `plant_key` (strength 1). A student can switch it off by
  lowering `e` below `plant_off`: the position embedding is one of PH-Reg's unlocked weights.

What it shows: that TTA denoising spreads position-fixed artifacts (each shifted view puts them
on other patches, so the average dilutes them), and that distillation on those targets removes
them. What it does not: the planted artifacts carry no global information, so nothing here
tests whether registers take over the role real artifact tokens play in a pretrained model.

It is a plain timm `VisionTransformer` (subclass), registered with timm, so it works wherever a
teacher name works: `reg_tokens`/`no_embed_class` students, timm's hub export and
`create_model('local-dir:...')` (importing `pipeline.models.vit` registers it).

`vit_neuron_planted_tiny_patch8` (below) makes the same artifacts with a few MLP neurons
instead of a hook, so that neuron-level methods such as test-time registers can find them.
"""
from __future__ import annotations

import torch
from timm.models import build_model_with_cfg, register_model
from timm.models.vision_transformer import VisionTransformer, _cfg, checkpoint_filter_fn

NAME = "vit_planted_tiny_patch8"
# Away from the border (every shifted TTA view still sees them) and farther apart than the
# largest default shift, so the views of one cell never land on another.
DEFAULT_CELLS = ((0.25, 0.25), (0.25, 0.75), (0.7, 0.45))


def planted_note(model: str) -> str | None:
    """One sentence saying that `model` (a timm name) is a planted construction, or None."""
    if "planted" not in model.split(":")[-1]:
        return None
    return (f"{model} has artifact tokens planted by construction at fixed grid cells "
            f"(pipeline/models/planted.py, docs/planted-artifacts.md): it shows the pipeline removing them, "
            f"it is not a pretrained model")


def planted_cells(grid: tuple[int, int], cells) -> list[int]:
    """Flat grid indices (row * gw + col) of cells given as (fy, fx) fractions of the grid."""
    gh, gw = grid
    flat = {min(gh - 1, int(fy * gh)) * gw + min(gw - 1, int(fx * gw)) for fy, fx in cells}
    return sorted(flat)


class PlantedVisionTransformer(VisionTransformer):
    def __init__(
        self,
        *args,
        reg_tokens: int = 0,  # named here because pipeline.models.vit finds the register argument by signature
        plant_cells=DEFAULT_CELLS,
        plant_block: int = -2,
        plant_norm: float = 50.0,
        plant_channels: int = 4,
        plant_gain: float = 4.0,
        plant_key: float = 0.05,
        plant_off: float = 0.03,
        **kwargs,
    ):
        super().__init__(*args, reg_tokens=reg_tokens, **kwargs)
        if self.dynamic_img_size:
            raise ValueError(f"{NAME} plants artifacts on a fixed grid: dynamic_img_size is not supported")
        if not 0 <= plant_off < plant_key:
            raise ValueError("plant_off must lie in [0, plant_key)")
        if plant_channels + 1 > self.embed_dim:
            raise ValueError("plant_channels must leave room for the trigger channel")
        self.plant_block = range(len(self.blocks))[plant_block]
        self.plant_key, self.plant_off = plant_key, plant_off
        self.trigger = plant_channels  # the first channel after the artifact channels
        grid = self.patch_embed.grid_size
        index = planted_cells(grid, plant_cells)
        signs = torch.tensor([(-1.0) ** i for i in range(plant_channels)])
        vector = torch.zeros(self.embed_dim)
        vector[:plant_channels] = signs * plant_norm / plant_channels**0.5
        # Not in the state dict: they are part of the architecture, rebuilt from its arguments.
        self.register_buffer("plant_index", torch.tensor(index), persistent=False)
        self.register_buffer("plant_vector", vector, persistent=False)

        first_patch = self.pos_embed.shape[1] - grid[0] * grid[1]
        with torch.no_grad():
            self.norm.weight[:plant_channels] = plant_gain  # planted tokens stand out after the final norm too
            # The artifact and trigger channels carry nothing else: ordinary tokens stay near zero there.
            self.patch_embed.proj.weight[:plant_channels + 1] = 0
            if self.patch_embed.proj.bias is not None:
                self.patch_embed.proj.bias[:plant_channels + 1] = 0
            self.pos_embed[..., :plant_channels + 1] = 0
            self.pos_embed[0, first_patch + self.plant_index, self.trigger] = plant_key
        self.blocks[self.plant_block].register_forward_hook(self._plant)

    def plant_strength(self) -> torch.Tensor:
        """(cells,) strength of each planted artifact: 1 in the teacher, 0 once switched off."""
        n = self.patch_embed.grid_size[0] * self.patch_embed.grid_size[1]
        e = self.pos_embed[0, -n:, self.trigger][self.plant_index]
        return (e - self.plant_off).clamp(min=0) / (self.plant_key - self.plant_off)

    def _plant(self, module, inputs, out: torch.Tensor) -> torch.Tensor:
        rows = self.num_prefix_tokens + self.plant_index
        add = self.plant_strength().unsqueeze(-1) * self.plant_vector
        out = out.clone()  # never modify a block's output in place: autograd may still need it
        out[:, rows] = out[:, rows] + add.to(out.dtype)
        return out


default_cfgs = {NAME: _cfg(url="", input_size=(3, 96, 96), num_classes=0, license="none")}


@register_model
def vit_planted_tiny_patch8(pretrained: bool = False, **kwargs) -> PlantedVisionTransformer:
    """ViT (depth 4, width 96, patch 8, 96 px) with artifact tokens planted at fixed cells."""
    args = dict(patch_size=8, embed_dim=96, depth=4, num_heads=3, img_size=96)
    return build_model_with_cfg(
        PlantedVisionTransformer, NAME, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **dict(args, **kwargs)
    )


# --- artifacts made by MLP neurons --------------------------------------------------------

NEURON_NAME = "vit_neuron_planted_tiny_patch8"
DEFAULT_NEURONS = (37, 150, 301)  # hidden units of the planted block's MLP (384 wide)


class NeuronPlantedVisionTransformer(VisionTransformer):
    """Artifacts made the way "Vision Transformers Don't Need Trained Registers" (Jiang et al.,
    2025) finds them in CLIP and DINOv2: a few MLP neurons of a late block ("register neurons")
    fire at the artifact positions, and their fc2 columns write one high-norm direction into the
    residual stream. Nothing is added by a hook: the artifacts are in the weights, so a
    neuron-level method can find them and a state dict carries them.

    - Position trigger: one residual channel (`trigger`) holds `plant_key` at the planted cells'
      position embeddings and 0 everywhere else; no embedding or block writes to it, so it
      reaches every block unchanged.
    - Register neurons (`plant_neurons` of block `plant_block`) read only that channel after the
      block's LayerNorm: pre-activation `plant_slope * (z - plant_fire)`, `z` the normed trigger,
      so they fire at the planted cells and stay at ~0 elsewhere (GELU of a large negative).
    - Their fc2 columns write `plant_scale` times a fixed direction in `plant_channels` artifact
      channels that nothing else writes to; the final LayerNorm weighs those channels
      `plant_gain` times, so the artifacts stand out after it too.

    The neurons' activation follows `z`, which LayerNorm divides by the token's spread, so the
    artifacts' norm varies with the image (about 40 to 80 on the residual stream with the
    defaults; ordinary tokens below 8), as real artifacts' norms do. A student switches an
    artifact off by lowering the trigger in its position embedding (one of PH-Reg's unlocked
    weights, but a far larger change than in `vit_planted_tiny_patch8`); test-time registers
    switch it off by moving the neurons' activations to an extra token."""

    def __init__(
        self,
        *args,
        reg_tokens: int = 0,
        plant_cells=DEFAULT_CELLS,
        plant_block: int = -2,
        plant_neurons=DEFAULT_NEURONS,
        plant_channels: int = 4,
        plant_key: float = 4.0,
        plant_fire: float = 1.5,
        plant_slope: float = 8.0,
        plant_scale: float = 0.4,
        plant_gain: float = 4.0,
        **kwargs,
    ):
        super().__init__(*args, reg_tokens=reg_tokens, **kwargs)
        if self.dynamic_img_size:
            raise ValueError(f"{NEURON_NAME} plants artifacts on a fixed grid: dynamic_img_size is not supported")
        if plant_channels + 1 > self.embed_dim:
            raise ValueError("plant_channels must leave room for the trigger channel")
        block = self.blocks[range(len(self.blocks))[plant_block]]
        hidden = block.mlp.fc1.out_features
        if not plant_neurons or any(not 0 <= j < hidden for j in plant_neurons):
            raise ValueError(f"plant_neurons must be indices of the MLP's {hidden} hidden units")
        self.plant_block = range(len(self.blocks))[plant_block]
        self.plant_neurons = tuple(sorted(set(plant_neurons)))
        self.trigger = plant_channels
        grid = self.patch_embed.grid_size
        self.register_buffer("plant_index", torch.tensor(planted_cells(grid, plant_cells)), persistent=False)
        first_patch = self.pos_embed.shape[1] - grid[0] * grid[1]
        c = plant_channels
        direction = torch.tensor([(-1.0) ** i for i in range(c)]) / c**0.5
        with torch.no_grad():
            self.patch_embed.proj.weight[:c + 1] = 0
            if self.patch_embed.proj.bias is not None:
                self.patch_embed.proj.bias[:c + 1] = 0
            self.pos_embed[..., :c + 1] = 0
            self.pos_embed[0, first_patch + self.plant_index, self.trigger] = plant_key
            for token in (self.cls_token, self.reg_token):
                if token is not None:
                    token[..., :c + 1] = 0
            for blk in self.blocks:  # only the register neurons write to the artifact channels, nothing to the trigger
                for linear in (blk.attn.proj, blk.mlp.fc2):
                    linear.weight[:c + 1] = 0
                    if linear.bias is not None:
                        linear.bias[:c + 1] = 0
            for j in self.plant_neurons:
                block.mlp.fc1.weight[j] = 0
                block.mlp.fc1.weight[j, self.trigger] = plant_slope
                block.mlp.fc1.bias[j] = -plant_slope * plant_fire
                block.mlp.fc2.weight[:, j] = 0
                block.mlp.fc2.weight[:c, j] = plant_scale * direction
            block.norm2.weight[self.trigger], block.norm2.bias[self.trigger] = 1.0, 0.0
            self.norm.weight[:c] = plant_gain


default_cfgs[NEURON_NAME] = _cfg(url="", input_size=(3, 96, 96), num_classes=0, license="none")


@register_model
def vit_neuron_planted_tiny_patch8(pretrained: bool = False, **kwargs) -> NeuronPlantedVisionTransformer:
    """ViT (depth 4, width 96, patch 8, 96 px) whose artifacts come from 3 MLP neurons of block 2."""
    args = dict(patch_size=8, embed_dim=96, depth=4, num_heads=3, img_size=96)
    return build_model_with_cfg(
        NeuronPlantedVisionTransformer, NEURON_NAME, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        **dict(args, **kwargs)
    )
