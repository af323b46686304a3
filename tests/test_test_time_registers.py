"""Test-time registers (pipeline/models/register_neurons.py) on the neuron-planted teacher
(pipeline/models/planted.py), whose artifacts come from 3 known MLP neurons: location finds
exactly those, the modified model loses the artifacts and keeps everything else, per image and
per neuron, and the evaluate stage measures it as one more model.
"""
import json
import os

import pytest
import timm
import torch
import torch.nn.functional as F

from pipeline.config import StudentConfig, TeacherConfig
from pipeline.errors import ConfigError, PipelineError
from pipeline.evaluation.metrics import outlier_mask, token_norms
from pipeline.evaluation.plan import Plan
from pipeline.evaluation.tasks import ModelRef
from pipeline.models.planted import NEURON_NAME, NeuronPlantedVisionTransformer
from pipeline.models.register_neurons import TestTimeRegisters, locate
from pipeline.models.vit import build_student, load_teacher, patch_features, readout
from stages import evaluate, shard
from tests.conftest import TINY, tiny_config
from tests.test_planted import photos, planted_mask

CFG = TeacherConfig(model=NEURON_NAME, img_size=96)


@pytest.fixture(scope="module")
def teacher():
    return load_teacher(CFG)


@pytest.fixture(scope="module")
def images():
    return photos(8)


def planted(model) -> set[tuple[int, int]]:
    return {(model.plant_block, j) for j in model.plant_neurons}


def per_image(features: torch.Tensor) -> list[int]:
    return outlier_mask(token_norms(features), 6).flatten(1).sum(1).tolist()


def test_the_neurons_make_the_artifacts(teacher, images):
    final, residual, _ = readout(teacher, images, -1)
    expected = planted_mask(teacher).expand(len(images), -1, -1)
    assert torch.equal(outlier_mask(token_norms(final), 6), expected)
    norms = token_norms(residual)
    assert (norms[expected] > 30).all() and (norms[~expected] < 10).all()
    # switching the neurons off removes them: they are the only source
    fc1 = teacher.blocks[teacher.plant_block].mlp.fc1
    saved = fc1.bias.clone()
    with torch.no_grad():
        fc1.bias[list(teacher.plant_neurons)] = -1e4
    try:
        assert per_image(patch_features(teacher, images)) == [0] * len(images)
    finally:
        with torch.no_grad():
            fc1.bias.copy_(saved)


def test_students_keep_the_neuron_planted_weights(teacher, images):
    same = build_student(teacher, CFG, StudentConfig(registers=0)).eval()
    assert isinstance(same, NeuronPlantedVisionTransformer)
    assert torch.equal(patch_features(same, images), patch_features(teacher, images))


def test_located_neurons_are_the_planted_ones(teacher, images):
    location = locate(teacher, images, top_k=4)
    found = [(n.layer, n.index) for n in location.neurons]
    assert set(found[:3]) == planted(teacher)
    assert location.neurons[3].score < 0.05 * location.neurons[2].score  # the next one is far behind
    assert location.detect_block == 3 and location.max_block == teacher.plant_block
    assert location.images_with_outliers == len(images)


def test_auto_top_k_sweeps_until_the_outliers_vanish(teacher, images):
    """Each of the three planted neurons writes a third of the artifact: one moved leaves tokens
    above the detection threshold, two leave them below it, so the sweep (k = 1, 2) keeps 2
    planted neurons. With a threshold above what one neuron alone writes but below what two
    write, it still keeps 2; just under one neuron's share it needs all 3 (4 tried, 3 by
    bisection). The wrapped model is left without hooks."""
    location = locate(teacher, images, top_k="auto")
    assert sorted(location.sweep) == [1, 2] and location.sweep[1] > 0 and location.sweep[2] == 0
    assert len(location.neurons) == 2 and {(n.layer, n.index) for n in location.neurons} < planted(teacher)
    assert per_image(patch_features(teacher, images)) == [3] * len(images)  # hooks removed after each trial
    strict = locate(teacher, images, top_k="auto", threshold=location.threshold / 4)
    assert sorted(strict.sweep) == [1, 2, 3, 4] and strict.sweep[2] > 0 and strict.sweep[3] == strict.sweep[4] == 0
    assert {(n.layer, n.index) for n in strict.neurons} == planted(teacher)
    capped = locate(teacher, images, top_k="auto", threshold=location.threshold / 4, max_top_k=2)
    # none vanishes below the cap: the fewest outliers left, and of equal counts the smaller k
    assert sorted(capped.sweep) == [1, 2] and capped.sweep[1] == capped.sweep[2] > 0 and len(capped.neurons) == 1


def test_the_baseline_removes_the_artifacts_and_keeps_ordinary_tokens(teacher, images):
    model = TestTimeRegisters(load_teacher(CFG), sorted(planted(teacher)))
    assert model.num_prefix_tokens == teacher.num_prefix_tokens + 1
    before, before_res, _ = readout(teacher, images, -1)
    after, after_res, attention = readout(model, images, -1)
    assert after.shape == before.shape and attention.shape == images.shape[:1] + before.shape[1:3]
    assert per_image(before) == [3] * len(images) and per_image(after) == [0] * len(images)
    assert (token_norms(after_res) < 10).all()
    ordinary = ~planted_mask(teacher)
    assert F.cosine_similarity(after[:, ordinary], before[:, ordinary], dim=-1).min() > 0.99
    # the artifact now sits on the register token
    with torch.inference_mode():
        tokens = model.forward_features(images)
    assert (tokens[:, model.at].norm(dim=-1) > 20).all()


def signed_max(h: torch.Tensor) -> torch.Tensor:
    """(N, tokens, k) -> (N, k): per image and neuron, the activation of largest magnitude over
    the tokens, its sign kept (the reference's `sign_max`: the minimum on a tie)."""
    top, bottom = h.amax(dim=1), h.amin(dim=1)
    return torch.where(top.abs() > bottom.abs(), top, bottom)


def test_each_neuron_gets_its_own_signed_maximum_over_all_tokens_in_each_image():
    """Hand-checked on a random ViT: the register holds, per image and per neuron, that neuron's
    signed maximum over all tokens (class token and register included, as the reference's
    `sign_max(output[0, :, neurons])`); the patches hold 0 there; nothing else changes. Planted:
    the class token wins at one neuron of image 0, a negative patch value at another of image 1.
    (Before: the largest value over the patches only.)"""
    model = load_teacher(TeacherConfig(model="vit_tiny_patch16_224", img_size=64, model_kwargs=TINY))
    fc2 = model.blocks[1].mlp.fc2
    neurons = [3, 17, 40]

    def plant(module, args):
        h = args[0].clone()
        h[0, 0, 3] = 50.0  # the class token of image 0
        h[1, 10, 17] = -60.0  # a patch of image 1, negative
        return (h, *args[1:])

    seen = {}
    fc2.register_forward_pre_hook(plant)
    fc2.register_forward_pre_hook(lambda m, a: seen.__setitem__("before", a[0].clone()))
    wrapped = TestTimeRegisters(model, [(1, j) for j in neurons])
    fc2.register_forward_pre_hook(lambda m, a: seen.__setitem__("after", a[0].clone()))
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        wrapped.forward_features(x)
    before, after, p = seen["before"], seen["after"], wrapped.num_prefix_tokens
    expected = signed_max(before[:, :, neurons])  # (images, neurons)
    assert expected[0, 0] == 50.0 and expected[1, 1] == -60.0  # the planted values win
    assert len(set(expected.flatten().tolist())) == expected.numel()  # a shared scalar could not pass
    assert torch.equal(after[:, wrapped.at, neurons], expected)
    assert (after[:, p:, neurons] == 0).all()
    others = [j for j in range(before.shape[-1]) if j not in neurons]
    assert torch.equal(after[..., others], before[..., others])
    assert torch.equal(after[:, :wrapped.at], before[:, :wrapped.at])  # the class token keeps its own


def test_on_clip_the_register_passes_through_ln_pre():
    """The reference appends the zero token before CLIP's `ln_pre` (timm's `norm_pre`), so the
    register enters the first block as ln_pre(0) = ln_pre's bias; the other tokens are the
    unmodified model's. (Before: inserted after norm_pre, it entered as 0.)"""
    import pipeline.models.clip  # noqa: F401  (registers the CLIP dense models with timm)

    plain = timm.create_model("vit_clip_dense_tiny_patch8", img_size=64).eval()
    with torch.no_grad():
        plain.norm_pre.weight.normal_()
        plain.norm_pre.bias.normal_()
    model = timm.create_model("vit_clip_dense_tiny_patch8", img_size=64).eval()
    model.load_state_dict(plain.state_dict())
    wrapped = TestTimeRegisters(model, [(0, 1)])
    seen = {}
    for name, m in (("plain", plain), ("wrapped", model)):
        m.blocks[0].register_forward_pre_hook(lambda mod, a, name=name: seen.__setitem__(name, a[0].clone()))
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        plain.forward_features(x)
        wrapped.forward_features(x)
    at = wrapped.at
    assert torch.allclose(seen["wrapped"][:, at], plain.norm_pre.bias.expand(2, -1))
    assert torch.allclose(seen["wrapped"][:, :at], seen["plain"][:, :at])
    assert torch.allclose(seen["wrapped"][:, at + 1:], seen["plain"][:, at:])


def test_a_batch_gives_what_each_image_gives_alone(teacher):
    model = TestTimeRegisters(load_teacher(CFG), sorted(planted(teacher)))
    x = photos(5, seed=3)
    with torch.inference_mode():
        batched = model.forward_features(x)
        alone = torch.cat([model.forward_features(x[i:i + 1]) for i in range(len(x))])
    assert torch.allclose(batched, alone, atol=1e-5)


def test_bad_requests_are_refused(teacher, images):
    with pytest.raises(PipelineError, match="no patch token"):
        locate(teacher, images, threshold=1e6)
    with pytest.raises(ConfigError, match="detect_block"):
        locate(teacher, images, detect_block=7)
    with pytest.raises(ConfigError, match="neuron"):
        TestTimeRegisters(load_teacher(CFG), [(2, 10_000)])
    with pytest.raises(ConfigError, match="VisionTransformer"):
        TestTimeRegisters(torch.nn.Linear(2, 2), [(0, 0)])


def test_bad_baseline_configs_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="baselines"):
        tiny_config(str(tmp_path), **{"evaluate.baselines": ["registers-by-magic"]})
    cfg = tiny_config(str(tmp_path), **{"evaluate.baselines": ["test-time-registers"]})
    exported = Plan("model", [ModelRef("r4", export=str(tmp_path / "export"))], None, [], None, None,
                             None, str(tmp_path / "eval"))
    with pytest.raises(ConfigError, match="not from an export folder"):
        evaluate.add_baselines(cfg, exported)


@pytest.mark.slow
def test_evaluate_measures_the_baseline_like_any_model(tmp_path, ray_local):
    """evaluate.baselines: [test-time-registers] on one model: a row in every table, a column in
    every picture, the located neurons in the report."""
    root = str(tmp_path / "run")
    cfg = tiny_config(root, **{"teacher.model": NEURON_NAME, "teacher.img_size": 96, "teacher.model_kwargs": {},
                               "shard.sample_size": 8, "evaluate.model": NEURON_NAME,
                               "evaluate.baselines": ["test-time-registers"], "evaluate.ttr.top_k": 3,
                               "evaluate.ttr.images": 8, "evaluate.num_images": 8, "evaluate.labeled": "sample:labeled"})
    shard.run(cfg)
    report = evaluate.run(cfg)
    location = report["baselines"]["test-time-registers"]
    teacher = load_teacher(CFG)
    assert {(n["layer"], n["index"]) for n in location["neurons"]} == planted(teacher)
    norms = report["norms"]
    assert norms[NEURON_NAME]["outliers_per_image"] == 3.0 and norms["test-time-registers"]["outliers_per_image"] == 0.0
    assert report["residual"]["norms"]["test-time-registers"]["norm_max"] < 10
    assert "test-time-registers" in report["probes"]["models"] and "test-time-registers" in report["attention"]
    assert "test-time-registers" in report["outlier_maps"]["final"]  # the pictures draw from the same per-model maps
    out = os.path.join(root, "eval", NEURON_NAME)
    text = open(os.path.join(out, "report.md")).read()
    assert "| test-time-registers |" in text and "## Test-time registers: register neurons" in text
    assert json.load(open(os.path.join(out, "report.json")))["baselines"] == report["baselines"]


def test_the_baseline_runs_on_the_clip_dense_recipe():
    """The CLIP recipe's last block finds the patches by a prefix count: the extra token must be
    counted there too, or the patch grid is off by one token."""
    import pipeline.models.clip  # noqa: F401  (registers the CLIP dense models with timm)

    teacher = timm.create_model("vit_clip_dense_tiny_patch8", img_size=96).eval()
    x = photos(2)
    baseline = TestTimeRegisters(timm.create_model("vit_clip_dense_tiny_patch8", img_size=96).eval(), [(0, 1), (1, 5)])
    assert patch_features(baseline, x).shape == patch_features(teacher, x).shape
