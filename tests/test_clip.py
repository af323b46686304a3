"""CLIP dense-feature models: the replaced last blocks, the student built from the teacher,
export through timm's hub format, and the import of the authors' released students."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import StudentConfig, TeacherConfig
from pipeline.models.clip import convert_phreg_clip, neighbourhood, phreg_clip_student
from pipeline.models.export import write_folder
from pipeline.models.vit import build_any_student, describe_teacher, load_teacher

TINY = "vit_clip_dense_tiny_patch8"


def ln(x, p, name):
    return F.layer_norm(x, x.shape[-1:], p[f"{name}.weight"], p[f"{name}.bias"], eps=1e-5)


def trunk(model, x):
    """Tokens entering the last block, through the model's own layers."""
    t = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    return model.blocks[:-1](t)


@pytest.fixture(scope="module")
def teacher_cfg():
    return TeacherConfig(model=TINY, img_size=64, init_seed=3)


def test_value_block_is_value_then_output_projection(teacher_cfg):
    model = timm.create_model(TINY, num_classes=0, dense_block="value").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        t = trunk(model, x)
        blk = model.blocks[-1]
        d = model.embed_dim
        v = F.linear(blk.norm1(t), blk.attn.qkv.weight[2 * d:], blk.attn.qkv.bias[2 * d:])
        expect = model.proj(model.norm(blk.attn.proj(v)))
        assert torch.allclose(model.forward_features(x), expect, atol=1e-5)


def test_naclip_block_is_key_key_attention_with_gaussian(teacher_cfg):
    model = timm.create_model(TINY, num_classes=0, dense_block="naclip", gaussian_std=2.0).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        t = trunk(model, x)
        blk, d, h = model.blocks[-1], model.embed_dim, model.blocks[-1].attn.num_heads
        qkv = blk.attn.qkv(blk.norm1(t))[0]
        k, v = qkv[:, d:2 * d].reshape(-1, h, d // h), qkv[:, 2 * d:].reshape(-1, h, d // h)
        out = torch.zeros(t.shape[1], d)
        for head in range(h):
            logits = k[:, head] @ k[:, head].T / math.sqrt(d // h)
            for i in range(1, 65):  # patch i at cell ((i-1)//8, (i-1)%8); class token 0 has no neighbourhood
                for j in range(1, 65):
                    dy, dx = (i - 1) // 8 - (j - 1) // 8, (i - 1) % 8 - (j - 1) % 8
                    logits[i, j] += math.exp(-(dy * dy + dx * dx) / 8.0)
            out[:, head * (d // h):(head + 1) * (d // h)] = logits.softmax(-1) @ v[:, head]
        expect = model.proj(model.norm(blk.attn.proj(out)))
        assert torch.allclose(model.forward_features(x)[0], expect, atol=1e-5)
    assert neighbourhood((2, 3), 1.0)[0, 5].item() == pytest.approx(math.exp(-(1 + 4) / 2))


def test_student_gets_value_block_registers_and_equals_value_teacher_without_registers(teacher_cfg):
    teacher = load_teacher(teacher_cfg)
    spec = describe_teacher(teacher_cfg)
    assert spec.dim == 512 and spec.grid == (8, 8)
    student, projection = build_any_student(teacher_cfg, StudentConfig(registers=0), spec, loaded_teacher=teacher)
    assert projection is None and student.blocks[-1].mode == "value" and teacher.blocks[-1].mode == "naclip"
    value_teacher = load_teacher(teacher_cfg.model_copy(update={"model_kwargs": {"dense_block": "value"}}))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(student.eval().forward_features(x), value_teacher.forward_features(x))
    with_regs, _ = build_any_student(teacher_cfg, StudentConfig(registers=4), spec, loaded_teacher=teacher)
    assert with_regs.reg_token.shape == (1, 4, 64) and with_regs.num_prefix_tokens == 5


def test_export_reloads_with_timm_and_runs_at_other_sizes(tmp_path, teacher_cfg):
    cfg = teacher_cfg.model_copy(update={"model_kwargs": {"dynamic_img_size": True}})
    teacher = load_teacher(cfg)
    student, _ = build_any_student(cfg, StudentConfig(registers=4), describe_teacher(cfg), loaded_teacher=teacher)
    write_folder(student.eval(), str(tmp_path), {})
    again = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    assert again.blocks[-1].mode == "value" and again.reg_token.shape == (1, 4, 64)
    for size in [(64, 64), (96, 80)]:
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            assert torch.equal(again.forward_features(x), student.forward_features(x))


def plain_bicubic(pos: torch.Tensor, old: tuple[int, int], new: tuple[int, int], antialias: bool = False) -> torch.Tensor:
    """(1, old cells, D) position embedding on an `old` grid -> the `new` grid as the references
    resample it: `F.interpolate(mode="bicubic", align_corners=False)`, no antialiasing."""
    grid = pos.reshape(1, *old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new, mode="bicubic", align_corners=False, antialias=antialias)
    return grid.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], -1)


@pytest.mark.parametrize("registers", [0, 2])
def test_run_time_resampling_can_be_plain_bicubic(registers):
    """dynamic_img_size on windows of another size than the model's input (the zero-shot windows:
    28x28 -> 21x21 in the recipe, 8x8 -> 5x5 here) resamples the position embedding; by default
    (`pos_embed_antialias=False`) as the references do, not with timm's antialiased bicubic.
    Teacher layout (class position in pos_embed) and student layout (registers, no_embed_class)
    alike."""
    kwargs = dict(reg_tokens=registers, no_embed_class=True) if registers else {}
    model = timm.create_model(TINY, num_classes=0, dynamic_img_size=True, **kwargs).eval()
    with torch.no_grad():
        model.pos_embed.normal_()  # a rough embedding: antialiasing has something to smooth
    prefix = model.num_prefix_tokens
    cls_pos = 0 if registers else 1  # entries of pos_embed before the patch grid
    with torch.no_grad():
        patches = model.patch_embed(torch.randn(1, 3, 40, 40))  # (1, 5, 5, D)
        tokens = model._pos_embed(patches)
        plain = plain_bicubic(model.pos_embed[:, cls_pos:], (8, 8), (5, 5))
        smooth = plain_bicubic(model.pos_embed[:, cls_pos:], (8, 8), (5, 5), antialias=True)
    torch.testing.assert_close(tokens[:, prefix:], patches.reshape(1, 25, -1) + plain)
    assert (plain - smooth).abs().max() > 0.05  # the check would not tell the two apart otherwise
    expect_cls = model.cls_token[:, 0] + (model.pos_embed[:, 0] if not registers else 0)
    torch.testing.assert_close(tokens[:, 0], expect_cls)
    # upsampling too (8x8 -> 12x12): PyTorch's antialiased bicubic is PIL's kernel (a = -0.5),
    # the plain one Keys' a = -0.75, so the two differ whichever way the grid changes
    with torch.no_grad():
        big = model.patch_embed(torch.randn(1, 3, 96, 96))
        up = model._pos_embed(big)[:, prefix:] - big.reshape(1, 144, -1)
        plain = plain_bicubic(model.pos_embed[:, cls_pos:], (8, 8), (12, 12))
        smooth = plain_bicubic(model.pos_embed[:, cls_pos:], (8, 8), (12, 12), antialias=True)
    torch.testing.assert_close(up, plain)
    assert (plain - smooth).abs().max() > 0.05


def test_load_time_resampling_can_be_plain_bicubic():
    """Weights for another grid (8x8 here; timm's openai ViT-B/16 is 14x14, resampled up to 28x28
    in the recipe) resample at load: by default with plain bicubic, with `pos_embed_antialias=True`
    as timm does (antialiased)."""
    state = timm.create_model(TINY, num_classes=0).state_dict()
    with torch.no_grad():
        state["pos_embed"].normal_()
    overlay = {"state_dict": state, "source": ""}
    plain = timm.create_model(TINY, pretrained=True, img_size=40, pretrained_cfg_overlay=overlay)
    as_timm = timm.create_model(TINY, pretrained=True, img_size=40, pos_embed_antialias=True, pretrained_cfg_overlay=overlay)
    for model, antialias in ((plain, False), (as_timm, True)):
        assert torch.equal(model.pos_embed[:, :1], state["pos_embed"][:, :1])  # the class position is kept
        expect = plain_bicubic(state["pos_embed"][:, 1:], (8, 8), (5, 5), antialias=antialias)
        torch.testing.assert_close(model.pos_embed[:, 1:].detach(), expect)
    assert (plain.pos_embed - as_timm.pos_embed).abs().max() > 0.05


def test_the_clip_recipe_uses_plain_bicubic_and_trains_the_class_position(tmp_path):
    """configs/clip.yaml: plain bicubic resampling in teacher and student (the student is built
    with the teacher's class and arguments, and its export rebuilds the same); the class token
    unlocked, which is where this project keeps the class position that the reference trains."""
    from pipeline.config import load_config

    cfg = load_config(["configs/clip.yaml"])
    assert "cls_token" in cfg.student.unlock and "pos_embed" in cfg.student.unlock
    small = TeacherConfig(model=TINY, img_size=64, model_kwargs=cfg.teacher.model_kwargs)
    teacher = load_teacher(small)
    student, _ = build_any_student(small, StudentConfig(registers=2), describe_teacher(small), loaded_teacher=teacher)
    assert teacher.pos_embed_antialias is False and student.pos_embed_antialias is False
    write_folder(student.eval(), str(tmp_path), {})
    assert timm.create_model(f"local-dir:{tmp_path}", pretrained=True).pos_embed_antialias is False


def authors_state(r=3, d=64, heads=4, depth=3, grid=8, patch=8, out=512, seed=0):
    """A state dict in the layout of the authors' StudentCLIP (OpenAI CLIP under `vit.`)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*s, std=0.05):
        return torch.randn(*s, generator=g) * std

    sd = {"register_tokens": rnd(r, d, std=0.2), "vit.class_embedding": rnd(d, std=0.2),
          "vit.positional_embedding": rnd(1, grid * grid + 1, d, std=0.2), "vit.conv1.weight": rnd(d, 3, patch, patch),
          "vit.ln_pre.weight": 1 + rnd(d), "vit.ln_pre.bias": rnd(d), "vit.ln_post.weight": 1 + rnd(d),
          "vit.ln_post.bias": rnd(d), "vit.proj": rnd(d, out, std=0.2)}
    for i in range(depth):
        p = f"vit.transformer.resblocks.{i}."
        sd.update({p + "attn.in_proj_weight": rnd(3 * d, d, std=0.2), p + "attn.in_proj_bias": rnd(3 * d),
                   p + "attn.out_proj.weight": rnd(d, d, std=0.2), p + "attn.out_proj.bias": rnd(d),
                   p + "ln_1.weight": 1 + rnd(d), p + "ln_1.bias": rnd(d), p + "ln_2.weight": 1 + rnd(d),
                   p + "ln_2.bias": rnd(d), p + "mlp.c_fc.weight": rnd(4 * d, d, std=0.2), p + "mlp.c_fc.bias": rnd(4 * d),
                   p + "mlp.c_proj.weight": rnd(d, 4 * d, std=0.2), p + "mlp.c_proj.bias": rnd(d)})
    return sd


def authors_forward(sd, x, r, heads, depth):
    """Their forward, written from their code's description: registers appended after the
    patches, ln_pre, residual blocks, last block = value path, ln_post, @ proj."""
    p = {k.removeprefix("vit."): v for k, v in sd.items()}
    t = F.conv2d(x, p["conv1.weight"], stride=p["conv1.weight"].shape[-1]).flatten(2).transpose(1, 2)
    t = torch.cat([p["class_embedding"].expand(t.shape[0], 1, -1), t], 1) + p["positional_embedding"]
    t = torch.cat([t, p["register_tokens"].expand(t.shape[0], -1, -1)], 1)
    t = ln(t, p, "ln_pre")
    d = t.shape[-1]
    for i in range(depth):
        b = f"transformer.resblocks.{i}."
        h = ln(t, p, b + "ln_1")
        if i == depth - 1:
            v = F.linear(h, p[b + "attn.in_proj_weight"][2 * d:], p[b + "attn.in_proj_bias"][2 * d:])
            t = F.linear(v, p[b + "attn.out_proj.weight"], p[b + "attn.out_proj.bias"])
            break
        mha = nn.MultiheadAttention(d, heads, batch_first=True)
        mha.load_state_dict({k[len(b + "attn."):]: v for k, v in p.items() if k.startswith(b + "attn.")})
        t = t + mha(h, h, h, need_weights=False)[0]
        m = F.linear(ln(t, p, b + "ln_2"), p[b + "mlp.c_fc.weight"], p[b + "mlp.c_fc.bias"])
        t = t + F.linear(m * torch.sigmoid(1.702 * m), p[b + "mlp.c_proj.weight"], p[b + "mlp.c_proj.bias"])
    return ln(t, p, "ln_post") @ p["proj"]


def test_authors_student_weights_convert_to_the_timm_student():
    sd = authors_state()
    model = phreg_clip_student(sd, TINY)
    assert model.patch_embed.img_size == (64, 64) and model.reg_token.shape == (1, 3, 64)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = model.forward_features(x)
        theirs = authors_forward(sd, x, r=3, heads=4, depth=3)
    # patches: theirs after the class token, ours after class token and registers
    assert torch.allclose(ours[:, 4:], theirs[:, 1:65], atol=1e-4)
    assert torch.allclose(ours[:, 0], theirs[:, 0], atol=1e-4)
    with pytest.raises(ValueError, match="unexpected key"):
        convert_phreg_clip({"module.x": torch.zeros(1), **sd})


@pytest.mark.slow
def test_clip_preset_end_to_end_with_zero_shot_segmentation(tmp_path, ray_local):
    """configs/clip.yaml on a small model of the same architecture: shard -> teacher-cache ->
    distill -> export -> evaluate with zero-shot segmentation (random text tower)."""
    import os
    import shutil

    from pipeline.config import load_config
    from stages import distill, evaluate, export, shard, teacher_cache
    from tests.conftest import tiny_config

    root = str(tmp_path / "run")
    values = tiny_config(root).model_dump(mode="json")
    overrides = {"storage.run_root": root, "storage.extra_roots": values["storage"]["extra_roots"],
                 "shard.sample_size": 8, "shard.shard_size": 4, "teacher.model": TINY, "teacher.img_size": 64,
                 "tta.counts": 4, "cache.num_actors": 1, "distill.num_workers": 1, "distill.epochs": 2,
                 "student.unlock": ["reg_token", "pos_embed", "patch_embed.proj.*", "blocks.{last}.*", "blocks.1.*"],
                 "evaluate.num_images": 2, "evaluate.pca_images": 2,
                 "evaluate.zeroshot": {"labeled": "sample:labeled", "short_side": 64, "crop": 48, "stride": 16}}
    cfg = load_config(["configs/clip.yaml"], overrides)
    assert cfg.teacher.model_kwargs == {"dynamic_img_size": True} and cfg.evaluate.zeroshot.logit_scale == 40
    shard.run(cfg)
    teacher_cache.run(cfg)
    distill.run(cfg)
    export.run(cfg)
    again = timm.create_model(f"local-dir:{cfg.export_url}", pretrained=True)
    assert again.blocks[-1].mode == "value" and again.dynamic_img_size
    report = evaluate.run(cfg)
    z = report["zeroshot"]
    assert set(z["models"]) == {"teacher", "student"} and z["images"] == 16
    for m in z["models"].values():
        assert 0 <= m["miou"] <= 1 and set(m["iou"]) == set(z["classes"])
    text = open(os.path.join(cfg.eval_url, "report.md")).read()
    assert "## Zero-shot segmentation" in text and f"{z['models']['student']['miou']:.4f}" in text
    with open(os.path.join(cfg.eval_url, "zeroshot_seg.png"), "rb") as f:
        assert f.read(4) == b"\x89PNG"

    # The exported student on its own, under a config whose teacher has another width (the
    # class queries are checked against the student's features, not the teacher's), scored on
    # a benchmark folder with no train split.
    val_only = tmp_path / "val_only"
    for part in ("val", "classes.json"):
        (shutil.copytree if part == "val" else shutil.copy)(tmp_path / "run" / "sample_labeled" / part, val_only / part)
    alone = load_config(["configs/clip.yaml"], {**overrides, "teacher.model": "vit_tiny_patch16_224",
                                                "evaluate.model": cfg.export_url, "evaluate.targets": False,
                                                "evaluate.zeroshot.labeled": str(val_only)})
    assert describe_teacher(alone.teacher).dim != 512
    z = evaluate.run(alone)["zeroshot"]
    assert list(z["models"]) == ["clip-r16"] and 0 <= z["models"]["clip-r16"]["miou"] <= 1
    assert len(os.listdir(os.path.join(root, "text_queries"))) == 1  # the first run's class queries, read back


@pytest.mark.slow
def test_planted_clip_teacher_corrupts_zero_shot_and_the_student_recovers(tmp_path, ray_local):
    """The planted cells of a CLIP-form teacher carry no image content, so zero-shot predictions
    there are wrong more often than elsewhere, and less so in the distilled student; its
    zero-shot mIoU on the labeled images (never seen in training) is higher than the teacher's."""
    import os

    from bench.clip_planted import class_prototypes, config, normalised, patch_labels
    from pipeline.evaluation.labeled import load_item, open_labeled, write_labeled_sample
    from pipeline.evaluation.zeroshot import save_class_embeddings
    from pipeline.models.export import load_exported
    from pipeline.models.vit import patch_features
    from stages import distill, evaluate, export, shard, teacher_cache

    root = str(tmp_path)
    labeled = open_labeled(write_labeled_sample(os.path.join(root, "labeled")))
    embeddings = os.path.join(root, "classes.safetensors")
    cfg = config(root, labeled.root, embeddings)
    for stage in (shard, teacher_cache, distill, export):
        stage.run(cfg)
    teacher, student = load_teacher(cfg.teacher), load_exported(cfg.export_url)
    cells = teacher.plant_index.tolist()
    queries = class_prototypes(teacher, labeled, cells)
    save_class_embeddings(embeddings, queries, list(range(len(labeled.classes))))
    z = evaluate.run(cfg)["zeroshot"]["models"]
    assert z["student"]["miou"] > z["teacher"]["miou"]

    planted = torch.zeros(144, dtype=torch.bool)
    planted[cells] = True
    right = {"teacher": torch.zeros(2), "student": torch.zeros(2)}  # correct patches: at planted cells, elsewhere
    total = torch.zeros(2)
    for item in labeled.with_masks("val"):
        img, mask, _ = load_item(item, labeled)
        labels = patch_labels(mask, 12)
        valid = labels != labeled.ignore_index
        total += torch.stack([(valid & planted).sum(), (valid & ~planted).sum()])
        for name, model in (("teacher", teacher), ("student", student)):
            with torch.no_grad():
                f = F.normalize(patch_features(model, normalised(img, teacher))[0], dim=-1).reshape(144, -1)
            ok = ((f @ queries.T).argmax(-1) == labels) & valid
            right[name] += torch.stack([(ok & planted).sum(), (ok & ~planted).sum()])
    acc = {n: (r / total).tolist() for n, r in right.items()}
    print("patch accuracy (planted cells, elsewhere):", acc, "mIoU:", {n: m["miou"] for n, m in z.items()})
    assert acc["teacher"][0] < acc["teacher"][1] - 0.1
    assert acc["student"][0] > acc["teacher"][0] + 0.2
    assert os.path.exists(os.path.join(cfg.eval_url, "zeroshot_seg.png"))


def test_timm_clip_checkpoints_load_with_the_projection_on_every_token():
    """A checkpoint of timm's CLIP layout (image projection as `head`) loads through the
    registered filter: with the last block left as it is, features are timm's tokens through
    its head; the position embedding is resampled to the model's size."""
    from functools import partial

    from timm.layers import LayerNorm
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    clip = VisionTransformer(img_size=64, patch_size=8, embed_dim=64, depth=3, num_heads=4, pre_norm=True,
                             norm_layer=partial(LayerNorm, eps=1e-5), act_layer="quick_gelu", num_classes=512).eval()
    state = clip.state_dict()
    ours = timm.create_model(TINY, pretrained=True, dense_block="none",
                             pretrained_cfg_overlay={"state_dict": state, "source": ""}).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expect = F.linear(clip.forward_features(x), clip.head.weight)
        assert torch.allclose(ours.forward_features(x), expect, atol=1e-5)
    bigger = timm.create_model(TINY, pretrained=True, img_size=96, pretrained_cfg_overlay={"state_dict": state, "source": ""})
    assert bigger.pos_embed.shape == (1, 145, 64)
