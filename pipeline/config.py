"""Typed configuration: one section per stage, one YAML file for a whole run.

A run is described by a `Config`. Files are merged in order (later files win), then
`--section.field value` overrides from the command line are applied, then everything is
validated. Unknown keys are errors, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.errors import ConfigError
from pipeline.storage import absolute, inside, join_url


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StorageConfig(Section):
    run_root: str = Field("runs/demo", description="Folder or URL (s3://, gs://, ...) under which every stage writes by default.")
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options for every URL (e.g. {client_kwargs: {endpoint_url: ...}}). "
        "Never put credentials here: use the environment or instance roles.",
    )
    extra_roots: list[str] = Field(
        default_factory=list,
        description="Folders or URLs outside run_root where stages may also write (e.g. a cache shared by several runs). "
        "An output location anywhere else is refused.",
    )


class ShardConfig(Section):
    input: list[str] = Field(
        default_factory=lambda: ["sample:photos"],
        description="Image sources: folders, fsspec globs (s3://b/raw/**/*.jpg) or 'sample:photos' for the bundled sample corpus.",
    )
    output: str | None = Field(None, description="Where shards and the manifest go. Default: <run_root>/shards.")
    shard_size: int = Field(256, ge=1, description="Images per WebDataset shard (its slot of global indices). For input tars: at least their largest sample count.")
    unit_rows: int = Field(
        256, ge=1, description="Most images per unit of work (one teacher-cache task, one Zarr shard of targets): "
        "the largest divisor of the shard size up to this."
    )
    mode: Literal["incremental", "extend", "overwrite"] = Field(
        "incremental", description="incremental: build missing shards of the same plan; extend: keep existing shards "
        "and add new inputs as new shards; overwrite: delete the shard folder and start over."
    )
    max_side: int | None = Field(
        1024, ge=16, description="Downscale images whose shorter side exceeds this (keeps aspect). None keeps the original size."
    )
    min_side: int = Field(16, ge=1, description="Reject images whose shorter side is below this many pixels.")
    jpeg_quality: int = Field(95, ge=50, le=100, description="Quality of the JPEG written for each accepted image.")
    max_pixels: int = Field(
        100_000_000, ge=1, description="Reject images that declare more pixels than this (decompression-bomb guard)."
    )
    max_reject_fraction: float = Field(
        0.5, ge=0.0, le=1.0, description="Abort the run when more than this fraction of the inputs is rejected."
    )
    sample_size: int = Field(48, ge=1, description="Number of images generated for 'sample:photos'.")


class TeacherConfig(Section):
    model: str = Field("vit_small_patch14_dinov2", description="timm model name (any ViT-family model timm can build).")
    pretrained: bool = Field(False, description="Load timm's pretrained weights for the model (hub or timm cache).")
    checkpoint: str | None = Field(
        None, description="Weights file (.safetensors, or .pth/.pt loaded without executing pickled code). Path or URL."
    )
    img_size: int | tuple[int, int] = Field(224, description="Input resolution: one side, or [height, width].")
    init_seed: int = Field(0, description="Seed of the random initialisation used when no weights are given.")
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra keyword arguments for timm.create_model.")

    @field_validator("img_size")
    @classmethod
    def _positive(cls, v):
        sides = (v, v) if isinstance(v, int) else v
        if min(sides) < 1:
            raise ValueError("img_size must be positive")
        return v

    @property
    def hw(self) -> tuple[int, int]:
        return (self.img_size, self.img_size) if isinstance(self.img_size, int) else tuple(self.img_size)


class TTAConfig(Section):
    counts: int = Field(10, ge=1, description="Views per image (view 0 is the identity).")
    shift_frac: float = Field(0.15, ge=0.0, lt=1.0, description="Largest shift, as a fraction of the patch grid.")
    flip: bool = Field(True, description="Flip views horizontally at random (never view 0).")
    seed: int = Field(0, description="Seed of the views; an image's views depend only on (seed, global index, variant).")
    fps_start: Literal["origin", "random"] = Field(
        "origin", description="Farthest-point sampling of the shifts starts at the identity ('origin'), or at a random "
        "candidate with view 0 then set to the identity ('random', as the reference implementation does)."
    )


class Resources(Section):
    """What each teacher-cache actor or distill worker reserves on the cluster and how its
    batches are read ahead of the model: the same shape in both stages."""

    use_gpu: bool | None = Field(
        None, description="One GPU each. Default: when the cluster has GPUs as the stage starts (set true, with "
        "cluster.autoscaling, on a cluster that starts without GPU nodes)."
    )
    cpus: float = Field(1.0, gt=0, description="Logical CPUs each reserves (fractions allowed), its readers' cores included.")
    threads: int | None = Field(None, ge=1, description="torch threads each uses on the CPU. Default: cpus, at least 1.")
    readers: int | None = Field(
        None, ge=0, description="Reader processes each runs to read (and, where needed, decode and crop) its batches "
        "ahead of the model (0: one thread); the batches are the same whatever the number. Default with a GPU: cpus "
        "minus one (at least 2); on the CPU 0, where the model's threads already use the cores. Each reader keeps about "
        "one CPU core busy: reserve them in cpus."
    )
    prefetch: int = Field(2, ge=1, description="Batches each reader prepares ahead of the model.")


class DistillResources(Resources):
    """`Resources` with the distill workers' default read-ahead: a training step is shorter
    than a teacher batch, so each reader keeps more batches ready."""

    prefetch: int = Field(4, ge=1, description="Batches each reader prepares ahead of the model.")


def _resource_keys(per: str) -> dict[str, tuple[str, str]]:
    """The flat resource keys a stage had before `resources` (per: "actor" or "worker")."""
    return {"use_gpu": ("resources", "use_gpu"), f"cpus_per_{per}": ("resources", "cpus"),
            f"threads_per_{per}": ("resources", "threads"), "readers": ("resources", "readers"),
            "prefetch": ("resources", "prefetch")}


def _moved(section: str, data, renames: dict[str, tuple[str, str]]):
    """Flat keys of configs written before a section's options were grouped: each still loads
    into its new place, with a warning naming it."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    for old, (group, key) in renames.items():
        if old in data:
            warnings.warn(f"{section}.{old} is now {section}.{group}.{key}", FutureWarning, stacklevel=2)
            nested = data.get(group) or {}
            data[group] = {**(nested if isinstance(nested, dict) else nested.model_dump(exclude_unset=True)), key: data.pop(old)}
    return data


class CacheConfig(Section):
    shards: str | None = Field(None, description="Shard folder holding manifest.json. Default: the shard stage's output.")
    root: str | None = Field(None, description="Root of the target stores. Default: <run_root>/cache.")
    dtype: Literal["float32", "float16", "bfloat16", "int8"] = Field(
        "float16", description="Storage type of the targets; int8 uses a per-token scale."
    )
    variants: int = Field(1, ge=1, description="Targets per image, each with its own crop and views; epoch e uses variant e mod V.")
    crop: Literal["center", "random"] | None = Field(
        None, description="Crop of the stored views: 'center', or 'random' along the long side. Default: center for V=1, random otherwise."
    )
    batch_images: int = Field(4, ge=1, description="Images per teacher forward (times `counts` views).")
    num_actors: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="Teacher actors. auto: one per GPU, else one per resources.cpus CPUs. A number the cluster "
        "cannot place is refused before any compute."
    )
    resources: Resources = Field(default_factory=lambda: Resources(), description="What each teacher actor reserves and "
                                 "how its images are read: a mapping of the options of Resources.")
    codec: Literal["none", "lz4", "zstd"] = Field(
        "none", description="Compression of a new store's targets. Dense features barely compress (zstd saves about a "
        "tenth of float16 targets) and undoing zstd costs a reader more than decoding the image (BENCHMARKS.md, Data "
        "path). An existing store keeps the codec it was made with."
    )
    on_bad_image: Literal["fail", "skip"] = Field(
        "fail", description="An image of a shard that no longer decodes (a file cut short or overwritten after sharding): "
        "'fail' stops the stage naming the shard, unit and image; 'skip' records it as rejected in its unit's marker "
        "(its rows zero, never trained on) and goes on. Online distillation (distill.targets: online) reads the shards "
        "itself and follows the same choice: 'skip' trains on the unit's next image instead, and logs the one skipped."
    )
    compile: bool = Field(
        False, description="torch.compile the teacher's forward (fixed batch shapes: one compilation per actor). Worth it "
        "on a GPU; on the CPU it only adds compile time."
    )
    store_crops: bool = Field(
        True, description="Store each image's uint8 crop beside its targets (ViT-B/14 at 518 px: 805 KB beside 2.1 MB of "
        "float16 targets), so distillation reads pixels instead of decoding and resizing JPEGs, and sees exactly the "
        "pixels the teacher saw. Off: less storage, students decode the shards' images. An existing store keeps what "
        "it was made with."
    )
    units_per_task: int | None = Field(
        None, ge=1, description="Units handed to an actor at once (its reader and writer overlap across them). "
        "Default: about four tasks per actor, at most 16 units each."
    )
    lease_seconds: float = Field(
        60.0, gt=0, description="A run holds a lease on its store; a second run is refused until the lease is released "
        "or this long without a heartbeat (at once when the holder was a dead process on the same host)."
    )

    @property
    def crop_mode(self) -> str:
        return self.crop or ("center" if self.variants == 1 else "random")

    @model_validator(mode="before")
    @classmethod
    def _flat_resources(cls, data):
        return _moved("cache", data, _resource_keys("actor"))


PHREG_UNLOCK = ["reg_token", "pos_embed", "patch_embed.proj.*", "blocks.{last}.*"]


class StudentConfig(Section):
    name: str = Field("r16", pattern=r"^[A-Za-z0-9_.-]+$", description="Name of this student; its run folder and export use it.")
    registers: int = Field(16, ge=0, description="Register tokens added to the student.")
    unlock: list[str] | None = Field(
        None,
        description="Trainable parameters (fnmatch patterns on parameter names; {last} is the last block's index). "
        f"Default: {PHREG_UNLOCK} for a copy of the teacher, ['*'] for a student of another architecture.",
    )
    register_seed: int = Field(0, description="Seed of the registers' initialisation (randn / sqrt(D)).")
    model: str | None = Field(
        None, description="Another timm architecture for the student (e.g. a ViT-S for a ViT-B teacher); its patch grid "
        "at teacher.img_size must equal the teacher's. A learned linear projection maps its width to the teacher's. "
        "Default: the teacher's own architecture and weights (PH-Reg)."
    )
    pretrained: bool = Field(False, description="With student.model: start from timm's pretrained weights of that model.")
    checkpoint: str | None = Field(None, description="With student.model: start from this weights file.")
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="With student.model: extra timm.create_model arguments.")

    @property
    def unlock_patterns(self) -> list[str]:
        if self.unlock is not None:
            return self.unlock
        return PHREG_UNLOCK if self.model is None else ["*"]


class DistillConfig(Section):
    targets: Literal["cached", "online"] = Field(
        "cached", description="cached: read the teacher-cache store. online: run the teacher's TTA inside every step with "
        "new crops and views each epoch, as the reference implementation does (no store needed; ~counts x slower)."
    )
    store: str | None = Field(None, description="Target store URL. Default: the store of this config's teacher under cache.root.")
    epochs: int = Field(100, ge=1, description="Passes over the cached targets.")
    batch_size: int = Field(8, ge=1, description="Images per step on each worker.")
    lr: float = Field(1e-4, gt=0, description="Initial AdamW learning rate.")
    final_lr: float = Field(5e-6, gt=0, description="Learning rate reached at the end of the exponential decay.")
    lr_decay: Literal["step", "epoch"] = Field(
        "step", description="step: the rate decays smoothly every step. epoch: it is held through each epoch and "
        "decays between epochs, as the reference implementation's per-epoch ExponentialLR: epoch e trains at "
        "lr * (final_lr / lr) ** ((e + 1) / epochs), the last one at final_lr."
    )
    weight_decay: float = Field(1e-2, ge=0, description="AdamW weight decay.")
    mse_scale: float = Field(1.0, ge=0, description="Weight of the MSE term next to (1 - cosine).")
    num_workers: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="Ray Train workers (DDP ranks). auto: one per GPU when training on GPUs, else 1. A number the "
        "cluster cannot place (GPUs, or resources.cpus per worker) is refused before any compute."
    )
    resources: DistillResources = Field(default_factory=lambda: DistillResources(), description="What each worker "
                                 "reserves and how its batches are read: a mapping of the options of DistillResources.")
    checkpoint_every: int = Field(200, ge=1, description="Steps between checkpoints (one is always written at the end).")
    keep_last: int = Field(2, ge=1, description="Latest checkpoints kept for resuming (older ones are deleted).")
    keep_every_epochs: int | None = Field(
        None, ge=1, description="Also keep the student at the end of every N-th epoch, for choosing an epoch afterwards "
        "(the paper evaluates epochs 30 and 70): <student run>/epochs/epoch_NNNN, weights and state. See export.epoch."
    )
    log_every: int = Field(20, ge=1, description="Steps between metric reports.")
    max_failures: int = Field(2, ge=0, description="Worker failures Ray Train recovers from (restarting at the last checkpoint).")
    seed: int = Field(0, description="Seed of the data order and of the student-side flips.")
    hflip: float = Field(0.0, ge=0.0, le=1.0, description="Probability of mirroring image and cached target together.")
    compile: bool = Field(
        False, description="torch.compile the student's forward and loss (fixed batch shapes: one compilation, paid by "
        "the first step). Worth it on a GPU; on the CPU it only adds compile time."
    )
    output: str | None = Field(None, description="Folder of the student runs. Default: <run_root>/students.")

    @model_validator(mode="before")
    @classmethod
    def _flat_resources(cls, data):
        return _moved("distill", data, _resource_keys("worker"))


class ExportConfig(Section):
    checkpoint: str | None = Field(None, description="Checkpoint folder to export. Default: the student's latest checkpoint.")
    epoch: int | None = Field(
        None, ge=1, description="Export the student kept at the end of this epoch (distill.keep_every_epochs) instead of "
        "the latest checkpoint; the default output is then <run_root>/exports/<student.name>-epoch<N>."
    )
    output: str | None = Field(None, description="Export folder. Default: <run_root>/exports/<student.name>.")


class ZeroShotConfig(Section):
    """Zero-shot open-vocabulary segmentation (docs/clip-zeroshot.md); defaults: the PH-Reg /
    NACLIP protocol for most benchmarks."""

    labeled: str | None = Field(
        None, description="Labeled set whose classes.json names are the prompts (synonyms comma-separated, class 0 = "
        "background where prob_threshold > 0), or 'sample:labeled'. Default: no zero-shot segmentation.",
    )
    split: Literal["train", "val"] = Field("val", description="Split of the labeled set that is scored.")
    text_model: str = Field("ViT-B-16", description="open_clip model whose text tower embeds the prompts.")
    text_pretrained: str | None = Field(
        None, description="open_clip weights tag of the text tower (e.g. 'openai'); null: a seeded random tower (offline).")
    text_seed: int = Field(0, description="Seed of a random text tower.")
    embeddings: str | None = Field(
        None, description=".safetensors of precomputed class embeddings ('embeddings' (Q, D), 'class_index' (Q,)) from any "
        "text encoder; replaces the text tower.",
    )
    short_side: int = Field(448, ge=1, description="Images are resized to this short side (336 for VOC20/COCO-Object, 560 "
                            "for Cityscapes).")
    crop: int = Field(336, ge=1, description="Sliding-window size in pixels (224 for Cityscapes).")
    stride: int = Field(112, ge=1, description="Sliding-window stride in pixels.")
    logit_scale: float = Field(40.0, gt=0, description="Cosines are multiplied by this before the softmax over queries.")
    prob_threshold: float = Field(0.0, ge=0, le=1, description="Pixels whose best class probability is below this become "
                                  "class 0 (background): 0.1 for VOC21, Context60, COCO-Object; 0 disables.")


class TestTimeRegistersConfig(Section):
    """Where the test-time-registers baseline (evaluate.baselines) finds its register neurons."""

    images: int = Field(16, ge=1, description="Images the register neurons are located on (from the "
        "training shards when they exist, else the evaluated shards).")
    detect_block: int = Field(-1, description="Block whose output norms define the outlier tokens "
        "(published: -1 for CLIP, -2 for DINOv2-L).")
    threshold: float | None = Field(None, gt=0, description="Norm above which a token at "
        "detect_block is an outlier. Default: mean + 3 sigma of the patch norms there.")
    max_block: int | None = Field(None, description="Last block whose neurons are considered. "
        "Default: the first block where the outlier tokens stand out.")
    top_k: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="Register neurons moved. 'auto' sweeps k until the outliers at "
        "detect_block vanish on the location images, as the paper does (it found 10 for OpenCLIP-B/16, 45 for DINOv2-L).")
    max_top_k: int = Field(64, ge=1, description="Largest k the 'auto' sweep tries.")


class ProbeConfig(Section):
    """Dense linear probes (evaluate.labeled): ridge, or the trained protocols of DINOv2 / PH-Reg."""

    ridge: float = Field(1e-3, ge=0, description="Ridge penalty of the linear probes, relative to the mean feature energy.")
    protocol: Literal["ridge", "trained"] = Field(
        "ridge", description="'ridge': closed-form ridge probes on patch-level targets (fast, not comparable with published "
        "tables). 'trained': the DINOv2 / PH-Reg linear protocols: a 1x1-conv head trained with AdamW on augmented crops "
        "(segmentation: BatchNorm + conv, cross-entropy, poly schedule, scored with sliding windows at short side "
        "short_side; depth: conv alone, 256 bins on patch + class tokens, SigLog + gradient loss, cosine schedule with "
        "warm-up, sliding windows at each val image's own resolution). One Ray task per model and kind.",
    )
    iterations: int = Field(
        300, ge=1, description="Trained probes: training steps of each head (one frozen forward of batch_size windows "
        "each). The default suits a CPU check; the published protocols train 40k (VOC, ADE20K) to 80k steps on a GPU.",
    )
    batch_size: int = Field(8, ge=1, description="Trained probes: augmented windows per training step.")
    lr: float = Field(
        1e-3, gt=0, description="Trained segmentation probe: AdamW learning rate (weight decay 1e-4), decayed to 0 by mmseg's "
        "poly schedule of power 0.9 (PH-Reg's ADE20K config).",
    )
    stride: float = Field(
        2 / 3, gt=0, le=1, description="Trained probes: sliding-window stride at inference, as a fraction of the window "
        "(the model's input); mmseg's 341 of 512 px.",
    )
    short_side: Annotated[int, Field(ge=1)] | Literal["window"] | None = Field(
        "window", description="Trained segmentation probe: each val image is resized to this short side (px; the long side "
        "at most 4x it) before the sliding windows, and the logits back to its own pixels for scoring (mmseg's Resize + "
        "slide inference). 'window': the window's short side, the model's input (PH-Reg: 518 px windows at short side 518); "
        "null: each image at its own resolution.",
    )
    depth_lr: float = Field(
        5e-3, gt=0, description="Trained depth probe: AdamW learning rate (DINOv2's linear depth head, PH-Reg's NYUv2 config).",
    )
    depth_weight_decay: float = Field(1e-2, ge=0, description="Trained depth probe: AdamW weight decay (DINOv2, PH-Reg: 0.01).")
    depth_warmup: float = Field(
        12800 / 30000, ge=0, lt=1, description="Trained depth probe: fraction of iterations spent in mmcv's linear "
        "warm-up (from 1e-3 of the lr) of the cosine schedule (to 1e-8 of the lr); PH-Reg: 12,800 of 30,000 iterations.",
    )
    depth_bins: int = Field(256, ge=2, description="Trained depth probe: linear depth bins the head classifies into.")
    min_depth: float = Field(
        0.001, gt=0, description="Trained depth probe: first bin centre (metres); ground truth at or below it is not scored.",
    )
    max_depth: float = Field(
        10.0, gt=0, description="Trained depth probe: last bin centre (metres); ground truth at or above it is not scored "
        "(NYUv2: 10, KITTI: 80).",
    )
    siglog_lambda: float = Field(
        0.85, ge=0, le=1, description="Trained depth probe: lambda of the SigLog loss sqrt(mean g^2 - lambda mean(g)^2) "
        "(1 = fully scale-invariant; DINOv2 and BinsFormer use 0.85).",
    )
    gradient_weight: float = Field(
        0.5, ge=0, description="Trained depth probe: weight of the multi-scale gradient loss beside SigLog (DINOv2: 0.5).",
    )
    eigen_crop: bool = Field(
        False, description="Trained depth probe: score only inside Eigen's NYUv2 crop (rows 45-471, columns 41-601 of "
        "480x640, scaled to the image). Turn on for NYUv2; the generated set has no such border.",
    )

    @model_validator(mode="after")
    def _depth_range(self):
        if self.min_depth >= self.max_depth:
            raise ValueError("evaluate.probes.min_depth must be below evaluate.probes.max_depth")
        return self


class EvaluateConfig(Section):
    # What is evaluated
    shards: str | None = Field(
        None, description="Shard folder (with manifest.json) of the evaluated images, e.g. a held-out set sharded with its own "
        "shard.output; run teacher-cache with cache.shards=<it> for its targets. Default: the training shards, which the "
        "student was trained on (the report says so).",
    )
    num_images: int = Field(8, ge=1, description="Images evaluated, spread evenly over the evaluated shards.")
    student: str | None = Field(None, description="Exported student folder. Default: this config's export output.")
    epoch: int | None = Field(
        None, ge=1, description="Evaluate the student exported from this epoch (export.epoch): <run_root>/exports/"
        "<student.name>-epoch<N>, reported under <run_root>/eval/<student.name>-epoch<N>."
    )
    targets: bool = Field(True, description="Compare with the denoised targets (needs the target store of the evaluated images).")
    store: str | None = Field(
        None, description="Target store of the evaluated images. Default: the store of this config's teacher and TTA settings "
        "for evaluate.shards under cache.root.",
    )
    # `model` and `labeled` are not in PATH_FIELDS (a timm name or 'sample:labeled' must stay as it is): the
    # evaluate stage makes their paths absolute.
    model: str | None = Field(
        None, description="Evaluate this one model instead of teacher/targets/student: a timm name (built like the teacher: "
        "teacher.img_size, teacher.model_kwargs, teacher.init_seed) or an export folder (config.json + model.safetensors).",
    )
    checkpoint: str | None = Field(None, description="Weights file for evaluate.model (.safetensors, or .pth/.pt without pickled code).")
    pretrained: bool = Field(False, description="Load timm's pretrained weights for evaluate.model.")
    # Baselines: what a user would pick instead of distilling
    baselines: list[Literal["test-time-registers"]] = Field(
        default_factory=list, description="Also evaluate these training-free alternatives built from the teacher (or "
        "evaluate.model): 'test-time-registers' (Jiang et al. 2025: register neurons' activations moved to one extra token).",
    )
    ttr: TestTimeRegistersConfig = Field(
        default_factory=lambda: TestTimeRegistersConfig(), description="How the test-time-registers baseline locates its "
        "register neurons: a mapping of the options of TestTimeRegistersConfig.")
    # Artifact tokens
    outlier_k: float = Field(6.0, gt=0, description="A token is an outlier when its norm exceeds median + k * MAD of its image.")
    min_mad: float = Field(
        0.05, ge=0, description="Floor of the MAD as a fraction of the median: nearly constant norms (after a LayerNorm) would "
        "otherwise make noise outliers. With k=6 an outlier is at least 30% above its image's median.",
    )
    residual_block: int | None = Field(
        -1, description="Block whose output (the residual stream, before the final norm) is also measured for the teacher and "
        "the student: -1 = last, -2 = second-to-last (where DINOv2-L/g artifacts are usually counted); null skips it.",
    )
    abs_threshold: float | None = Field(
        None, gt=0, description="Also count residual-stream tokens whose norm exceeds this value (registers literature: about "
        "150 for DINOv2-L/g at the second-to-last block, about 30 for CLIP-B at the last).",
    )
    abs_threshold_final: float | None = Field(None, gt=0, description="Also count final-layer tokens whose norm exceeds this value.")
    # Dense linear probes
    labeled: str | None = Field(
        None, description="Labeled set for linear probes (segmentation masks and/or depth maps, layout in docs/evaluation.md), or "
        "'sample:labeled' for the small generated one. Default: no probes.",
    )
    probes: ProbeConfig = Field(default_factory=lambda: ProbeConfig(), description="Dense linear probes on the labeled "
                                "set: a mapping of the options of ProbeConfig (docs/evaluation.md).")
    zeroshot: ZeroShotConfig = Field(default_factory=ZeroShotConfig, description="Zero-shot segmentation with CLIP-space "
                                     "features: a mapping of the options of ZeroShotConfig (docs/clip-zeroshot.md).")
    # Running and writing
    pca_images: int = Field(4, ge=1, description="Images shown in the pictures (PCA feature maps, norm and attention maps).")
    images_per_task: int = Field(8, ge=1, description="Images per Ray task (each task loads the models once).")
    output: str | None = Field(
        None, description="Report folder. Default: <run_root>/eval/<student.name>, or <run_root>/eval/<model> with evaluate.model.",
    )

    @model_validator(mode="before")
    @classmethod
    def _flat_names(cls, data):
        if not isinstance(data, dict):
            return data
        renames = {k: ("ttr", k[len("ttr_"):]) for k in data if k.startswith("ttr_")}
        renames |= {k: ("probes", k[len("probe_"):]) for k in data if k.startswith("probe_")}
        return _moved("evaluate", data, renames)


class TrackingConfig(Section):
    tensorboard: bool = Field(True, description="Write TensorBoard event files into each student's run folder (<run>/tensorboard).")
    mlflow_uri: str | None = Field(
        None, description="MLflow tracking URI (e.g. http://mlflow:5000): a run per student with its metrics, config and "
        "export, and the teacher-cache throughput. Default: MLFLOW_TRACKING_URI from the environment; unset: no MLflow."
    )
    mlflow_experiment: str = Field("phreg", description="MLflow experiment the runs go into.")


class ClusterConfig(Section):
    autoscaling: bool = Field(
        False, description="The Ray cluster adds nodes on demand (KubeRay, `ray up` autoscaler): workers and actors beyond "
        "what it has now are requested, not refused. Off: a request the cluster cannot place is refused before compute."
    )


class Config(Section):
    storage: StorageConfig = Field(default_factory=StorageConfig, description="Where a run writes, and the fsspec options of every URL.")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig, description="What the Ray cluster may do to place a run's workers.")
    shard: ShardConfig = Field(default_factory=ShardConfig, description="The shard stage: images to WebDataset shards and a manifest.")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="The frozen teacher: timm model, weights, input size.")
    tta: TTAConfig = Field(default_factory=TTAConfig, description="Test-time augmentation that denoises the teacher's targets.")
    cache: CacheConfig = Field(
        default_factory=CacheConfig, description="The teacher-cache stage: how targets are stored, and the actors that compute them."
    )
    student: StudentConfig = Field(
        default_factory=StudentConfig, description="The student: registers, trainable parameters, optionally another architecture."
    )
    distill: DistillConfig = Field(
        default_factory=DistillConfig, description="The distill stage: optimisation, Ray Train workers, readers, checkpoints."
    )
    export: ExportConfig = Field(default_factory=ExportConfig, description="The export stage: a student checkpoint to a timm hub folder.")
    evaluate: EvaluateConfig = Field(
        default_factory=EvaluateConfig, description="The evaluate stage: what is evaluated, baselines, artifact-token rules, "
        "linear probes, zero-shot segmentation, report."
    )
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="TensorBoard event files and MLflow runs.")
    students: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Several students from one cache: each entry overrides sections of this config, e.g. "
        "[{student: {name: r4, registers: 4}}, {student: {name: r8, registers: 8}, distill: {lr: 2.0e-4}}]. "
        "distill, export and evaluate then run for every entry.",
    )

    @model_validator(mode="after")
    def _checks(self):
        if self.distill.final_lr > self.distill.lr:
            raise ValueError("distill.final_lr must not exceed distill.lr")
        # Workers run in other folders (and on other machines): local paths become absolute.
        for section, name in PATH_FIELDS:
            part = getattr(self, section)
            value = getattr(part, name)
            if isinstance(value, str):
                object.__setattr__(part, name, absolute(value))
        object.__setattr__(self.shard, "input", [s if s.startswith("sample:") else absolute(s) for s in self.shard.input])
        object.__setattr__(self.storage, "extra_roots", [absolute(r) for r in self.storage.extra_roots])
        roots = [self.storage.run_root, *self.storage.extra_roots]
        for section, name in OUTPUT_FIELDS:
            value = getattr(getattr(self, section), name)
            if value is not None and not any(inside(value, root) for root in roots):
                raise ValueError(f"{section}.{name}={value} is outside storage.run_root ({self.storage.run_root}); "
                                 f"add a root that contains it to storage.extra_roots to allow writing there")
        return self

    # Derived locations: one place decides where each stage reads and writes.
    def under_root(self, *parts: str) -> str:
        return join_url(self.storage.run_root, *parts)

    @property
    def shards_url(self) -> str:
        return self.shard.output or self.under_root("shards")

    @property
    def cache_shards_url(self) -> str:
        return self.cache.shards or self.shards_url

    @property
    def cache_root(self) -> str:
        return self.cache.root or self.under_root("cache")

    @property
    def students_url(self) -> str:
        return self.distill.output or self.under_root("students")

    @property
    def export_url(self) -> str:
        return self.export.output or self.epoch_export_url(self.export.epoch)

    def epoch_export_url(self, epoch: int | None) -> str:
        """The default export folder of the student's latest checkpoint (None) or of a kept epoch."""
        return self.under_root("exports", self.student.name + (f"-epoch{epoch}" if epoch else ""))

    @property
    def eval_url(self) -> str:
        epoch = f"-epoch{self.evaluate.epoch}" if self.evaluate.epoch else ""
        return self.evaluate.output or self.under_root("eval", self.student.name + epoch)


OUTPUT_FIELDS = [("shard", "output"), ("cache", "root"), ("distill", "output"), ("export", "output"), ("evaluate", "output")]
PATH_FIELDS = [
    ("storage", "run_root"), ("shard", "output"), ("teacher", "checkpoint"), ("student", "checkpoint"),
    ("cache", "shards"), ("cache", "root"),
    ("distill", "store"), ("distill", "output"), ("export", "checkpoint"), ("export", "output"),
    ("evaluate", "student"), ("evaluate", "output"), ("evaluate", "shards"), ("evaluate", "store"), ("evaluate", "checkpoint"),
]


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """Set one option by its dotted name. A mapping merges into the section it names (as a
    later YAML file would), so `--evaluate.zeroshot '{text_pretrained: openai}'` keeps the
    section's other keys; a key is reset by giving it its default (or null where allowed)."""
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {dotted!r}: {part!r} is not a section")
    if isinstance(value, dict) and isinstance(node.get(leaf), dict):
        value = deep_merge(node[leaf], value)
    node[leaf] = value


def load_config(paths: list[str | Path] = (), overrides: dict[str, Any] | None = None) -> Config:
    """Merge YAML files in order, apply dotted overrides, validate."""
    tree: dict = {}
    for path in paths:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        tree = deep_merge(tree, data)
    for dotted, value in (overrides or {}).items():
        set_dotted(tree, dotted, value)
    try:
        return Config.model_validate(tree)
    except Exception as e:  # pydantic's message lists every bad field with its location
        raise ConfigError(f"invalid configuration:\n{e}") from None


def expand_students(cfg: Config) -> list[Config]:
    """One config per entry of `students` (the config itself when the list is empty)."""
    if not cfg.students:
        return [cfg]
    base = cfg.model_dump(mode="json", exclude={"students"})
    configs = []
    for entry in cfg.students:
        try:
            configs.append(Config.model_validate(deep_merge(base, entry)))
        except Exception as e:
            raise ConfigError(f"invalid entry in students: {entry}\n{e}") from None
    names = [c.student.name for c in configs]
    if len(set(names)) != len(names):
        raise ConfigError(f"students need distinct student.name values, got {names}")
    return configs


SECRET_WORDS = ("key", "secret", "token", "password", "credential", "session")


def redacted(value: Any) -> Any:
    """A copy with the values of secret-looking keys replaced, for anything written or logged."""
    if isinstance(value, dict):
        return {k: "<redacted>" if any(w in str(k).lower() for w in SECRET_WORDS) and not isinstance(v, dict) else redacted(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [redacted(v) for v in value]
    return value


def dump_config(cfg: Config) -> str:
    """The config as YAML, storage options redacted (credentials never reach a file)."""
    data = cfg.model_dump(mode="json")
    data["storage"]["storage_options"] = redacted(data["storage"]["storage_options"])
    return yaml.safe_dump(data, sort_keys=False)
