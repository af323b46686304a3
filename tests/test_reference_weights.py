"""The authors' DINOv2 students (HF Dinov2Model layout + registers) convert to the timm student."""
import re

import pytest
import timm
import torch

from pipeline.models.export import load_exported, max_output_difference
from pipeline.models.reference_weights import convert_phreg_dinov2, export_phreg_dinov2, phreg_dinov2_student

ARGS = dict(img_size=56, depth=2, embed_dim=64, num_heads=2, num_classes=0)


def hf_layout(model) -> dict[str, torch.Tensor]:
    """A timm student's weights in the released layout, with the class position separate from the class token."""
    s = {k: v.clone() for k, v in model.state_dict().items()}
    d = s["cls_token"].shape[-1]
    cls_pos = torch.randn(1, 1, d)
    out = {"registers": s.pop("reg_token")[0], "embeddings.mask_token": torch.zeros(1, d),
           "embeddings.cls_token": s.pop("cls_token") - cls_pos,
           "embeddings.position_embeddings": torch.cat([cls_pos, s.pop("pos_embed")], 1),
           "embeddings.patch_embeddings.projection.weight": s.pop("patch_embed.proj.weight"),
           "embeddings.patch_embeddings.projection.bias": s.pop("patch_embed.proj.bias"),
           "layernorm.weight": s.pop("norm.weight"), "layernorm.bias": s.pop("norm.bias")}
    for i in range(len(model.blocks)):
        b, h = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            q, k, v = s.pop(f"{b}attn.qkv.{kind}").chunk(3)
            out |= {f"{h}attention.attention.query.{kind}": q, f"{h}attention.attention.key.{kind}": k,
                    f"{h}attention.attention.value.{kind}": v,
                    f"{h}attention.output.dense.{kind}": s.pop(f"{b}attn.proj.{kind}")}
            for part in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                out[f"{h}{part}.{kind}"] = s.pop(f"{b}{part}.{kind}")
        out[f"{h}layer_scale1.lambda1"] = s.pop(f"{b}ls1.gamma")
        out[f"{h}layer_scale2.lambda1"] = s.pop(f"{b}ls2.gamma")
    assert not s, f"keys left unmapped: {sorted(s)}"
    return out


def wrapper_layout(model) -> dict[str, torch.Tensor]:
    """The state dict the authors' training script saves (`torch.save(student.state_dict())` of
    DINOv2_full's `RegDINOv2Base`): its own `registers` (1, R, D) first, then the HF model as
    `model.*`, then the same submodules again under the wrapper's names `embed.*`, `encoder.*`,
    `layernorm.*` (one module, two names: the same tensors twice)."""
    hf = hf_layout(model)
    out = {"registers": hf.pop("registers")[None]}
    out |= {f"model.{k}": v for k, v in hf.items()}
    out |= {re.sub(r"^embeddings\.", "embed.", k): v for k, v in hf.items()}
    return out


def test_released_layout_converts_to_the_same_outputs():
    torch.manual_seed(0)
    source = timm.create_model("vit_small_patch14_dinov2", reg_tokens=3, no_embed_class=True, **ARGS).eval()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.1 * torch.randn_like(p))  # layer scales and tokens away from their init
    student = phreg_dinov2_student(hf_layout(source), model="vit_small_patch14_dinov2",
                                   depth=2, embed_dim=64, num_heads=2)
    assert student.num_prefix_tokens == 4 and tuple(student.patch_embed.grid_size) == (4, 4)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(student.forward_features(x), source.forward_features(x))


def test_the_authors_wrapper_layout_converts_to_the_same_outputs(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("vit_small_patch14_dinov2", reg_tokens=3, no_embed_class=True, **ARGS).eval()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.1 * torch.randn_like(p))
    state = wrapper_layout(source)
    assert {k.split(".")[0] for k in state} == {"registers", "model", "embed", "encoder", "layernorm"}
    assert convert_phreg_dinov2(state).keys() == convert_phreg_dinov2(hf_layout(source)).keys()
    torch.save(state, tmp_path / "distilled_dinov2_weights_100.pth")  # saved and read back as the released file
    export_phreg_dinov2(str(tmp_path / "distilled_dinov2_weights_100.pth"), str(tmp_path / "hub"),
                        model="vit_small_patch14_dinov2", depth=2, embed_dim=64, num_heads=2)
    assert max_output_difference(load_exported(str(tmp_path / "hub")), source) < 1e-5


def test_a_wrapper_layout_whose_two_names_disagree_is_refused():
    source = timm.create_model("vit_small_patch14_dinov2", reg_tokens=2, no_embed_class=True, **ARGS)
    for alias in ("embed.cls_token", "encoder.layer.1.mlp.fc1.bias", "layernorm.weight"):
        state = wrapper_layout(source)
        state[alias] = state[alias] + 1
        with pytest.raises(ValueError, match="differ"):
            convert_phreg_dinov2(state)


def test_unknown_or_incomplete_layout_is_refused():
    source = timm.create_model("vit_small_patch14_dinov2", reg_tokens=2, no_embed_class=True, **ARGS)
    state = hf_layout(source)
    with pytest.raises(ValueError, match="unexpected key"):
        convert_phreg_dinov2({**state, "pooler.weight": torch.zeros(1)})
    del state["encoder.layer.1.attention.attention.key.bias"]
    with pytest.raises(ValueError, match="layer 1 lacks"):
        convert_phreg_dinov2(state)


def test_exported_folder_loads_through_timm_with_equal_outputs(tmp_path):
    source = timm.create_model("vit_small_patch14_dinov2", reg_tokens=2, no_embed_class=True, **ARGS).eval()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.1 * torch.randn_like(p))  # layer scales start at 1e-5: without this the blocks barely act
    torch.save(hf_layout(source), tmp_path / "student.pth")
    export_phreg_dinov2(str(tmp_path / "student.pth"), str(tmp_path / "hub"), model="vit_small_patch14_dinov2",
                        depth=2, embed_dim=64, num_heads=2)
    assert max_output_difference(load_exported(str(tmp_path / "hub")), source) < 1e-5


def test_the_import_command_writes_a_folder_evaluate_can_load(tmp_path, capsys):
    from stages.cli import main

    source = timm.create_model("vit_small_patch14_dinov2", reg_tokens=2, no_embed_class=True, **ARGS).eval()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.1 * torch.randn_like(p))
    torch.save(hf_layout(source), tmp_path / "student.pth")
    main(["import-dinov2", "--storage.run_root", str(tmp_path / "run"), "--export.checkpoint", str(tmp_path / "student.pth"),
          "--teacher.model", "vit_small_patch14_dinov2", "--teacher.model_kwargs", "{depth: 2, embed_dim: 64, num_heads: 2}"])
    folder = tmp_path / "run" / "exports" / "r16"  # the default student.name
    assert "import-dinov2:" in capsys.readouterr().out
    assert max_output_difference(load_exported(str(folder)), source) < 1e-5
    with pytest.raises(SystemExit):
        main(["import-dinov2", "--storage.run_root", str(tmp_path / "run")])
    assert "needs --export.checkpoint" in capsys.readouterr().err
