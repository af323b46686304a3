"""Teacher loading, the student (registers, unlocked set, exact conversion) and export."""
import os
import pickle

import pytest
import safetensors.torch
import timm
import torch

from pipeline.config import StudentConfig, TeacherConfig
from pipeline.errors import ConfigError, UnsafeWeightsError
from pipeline.models.export import load_exported, max_output_difference, write_folder
from pipeline.models.vit import build_student, describe_teacher, load_teacher, patch_features, unlock, weights_identity

# Small random-init ViTs of the families the pipeline must support.
FAMILIES = {
    "class-token p16": TeacherConfig(model="vit_tiny_patch16_224", img_size=64, model_kwargs={"depth": 2}),
    "no-class-token p16 (SigLIP-style)": TeacherConfig(
        model="vit_tiny_patch16_224", img_size=64, model_kwargs={"depth": 2, "class_token": False, "global_pool": "avg"}),
    "dinov2 p14": TeacherConfig(model="vit_small_patch14_dinov2", img_size=56,
                                model_kwargs={"depth": 2, "embed_dim": 64, "num_heads": 2}),
    "non-square grid": TeacherConfig(model="vit_tiny_patch16_224", img_size=(48, 80), model_kwargs={"depth": 2}),
    "eva p14": TeacherConfig(model="eva02_tiny_patch14_224", img_size=56, model_kwargs={"depth": 2}),
}


@pytest.fixture(params=list(FAMILIES), ids=list(FAMILIES))
def family(request):
    return FAMILIES[request.param]


def _x(cfg, n=2):
    return torch.randn(n, 3, *cfg.hw, generator=torch.Generator().manual_seed(1))


def test_describe_matches_real_model(family):
    spec = describe_teacher(family)
    model = load_teacher(family)
    feats = patch_features(model, _x(family))
    assert feats.shape == (2, *spec.grid, spec.dim)
    assert spec.grid == tuple(model.patch_embed.grid_size)
    assert spec.num_prefix_tokens == model.num_prefix_tokens


def test_student_with_no_registers_equals_teacher(family):
    teacher = load_teacher(family)
    student = build_student(teacher, family, StudentConfig(registers=0)).eval()
    unlock(student, [])
    assert not any(p.requires_grad for p in student.parameters())
    x = _x(family)
    assert torch.equal(patch_features(teacher, x), patch_features(student, x))


def test_student_registers_and_unlocked_set(family):
    teacher = load_teacher(family)
    student = build_student(teacher, family, StudentConfig(registers=4))
    assert student.reg_token.shape == (1, 4, teacher.embed_dim)
    assert student.num_prefix_tokens == teacher.num_prefix_tokens + 4
    std = student.reg_token.std().item()
    assert 0.5 / teacher.embed_dim**0.5 < std < 2.0 / teacher.embed_dim**0.5  # randn / sqrt(D)
    names = unlock(student, StudentConfig().unlock_patterns)
    last = len(student.blocks) - 1
    assert "reg_token" in names and "pos_embed" in names
    assert {"patch_embed.proj.weight", "patch_embed.proj.bias"} <= set(names)
    for name, param in student.named_parameters():
        expected = name in ("reg_token", "pos_embed") or name.startswith(("patch_embed.proj.", f"blocks.{last}."))
        assert param.requires_grad == expected, name
    # teacher weights were copied: the last block is identical
    for (n, a), (_, b) in zip(teacher.blocks[-1].named_parameters(), student.blocks[-1].named_parameters()):
        assert torch.equal(a, b), n


def test_unknown_unlock_pattern_is_refused():
    cfg = FAMILIES["class-token p16"]
    student = build_student(load_teacher(cfg), cfg, StudentConfig(registers=2))
    with pytest.raises(ConfigError, match="match no parameter"):
        unlock(student, ["blocks.99.*"])


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ConfigError, match="no model named"):
        describe_teacher(TeacherConfig(model="vit_does_not_exist"))


@pytest.mark.parametrize("img_size, patch_model", [
    (512, "vit_small_patch14_dinov2"),  # 512 = 36 * 14 + 8: timm would floor the grid to 36
    ((48, 70), "vit_tiny_patch16_224"),  # only the width is off
])
def test_image_size_the_patch_grid_does_not_tile_is_refused(img_size, patch_model):
    cfg = TeacherConfig(model=patch_model, img_size=img_size, model_kwargs={"depth": 1})
    with pytest.raises(ConfigError, match="not a multiple of .* patch size") as refused:
        describe_teacher(cfg)
    assert "flips would misalign" in str(refused.value)
    with pytest.raises(ConfigError, match="not a multiple"):
        load_teacher(cfg)


def test_image_size_on_the_patch_grid_is_accepted():
    spec = describe_teacher(TeacherConfig(model="vit_small_patch14_dinov2", img_size=518, model_kwargs={"depth": 1}))
    assert spec.grid == (37, 37)


def test_seeded_random_init_is_reproducible():
    cfg = FAMILIES["dinov2 p14"]
    a, b = load_teacher(cfg), load_teacher(cfg)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    other = load_teacher(cfg.model_copy(update={"init_seed": 1}))
    assert not torch.equal(a.pos_embed, other.pos_embed)


def test_weights_from_safetensors_and_pth(tmp_path):
    cfg = FAMILIES["class-token p16"]
    source = load_teacher(cfg.model_copy(update={"init_seed": 5}))
    st, pth = tmp_path / "w.safetensors", tmp_path / "w.pth"
    safetensors.torch.save_file(source.state_dict(), str(st))
    torch.save({"model": source.state_dict()}, pth)
    x = _x(cfg)
    for path in (st, pth):
        loaded = load_teacher(cfg.model_copy(update={"checkpoint": str(path)}))
        assert torch.equal(patch_features(loaded, x), patch_features(source, x))
    assert weights_identity(cfg.model_copy(update={"checkpoint": str(st)})).startswith("sha256:")


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/phreg-pwned",))


def test_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"x": _Payload()}}, f)
    cfg = FAMILIES["class-token p16"].model_copy(update={"checkpoint": str(path)})
    with pytest.raises(UnsafeWeightsError, match="refusing to load"):
        load_teacher(cfg)
    assert not os.path.exists("/tmp/phreg-pwned")


def test_export_reloads_with_plain_timm(tmp_path, family):
    teacher = load_teacher(family)
    student = build_student(teacher, family, StudentConfig(registers=3)).eval()
    with torch.no_grad():
        student.blocks[-1].mlp.fc2.bias.add_(0.5)  # the export must carry trained weights
    write_folder(student, str(tmp_path), {"test": True})
    assert {"config.json", "model.safetensors"} <= set(os.listdir(tmp_path))
    rebuilt = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    assert rebuilt.reg_token.shape[1] == 3
    assert max_output_difference(student, rebuilt) == 0.0
    assert max_output_difference(student, load_exported(str(tmp_path))) == 0.0
    assert max_output_difference(teacher, rebuilt) > 0.0
