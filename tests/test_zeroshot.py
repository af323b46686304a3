"""Zero-shot segmentation math on constructed cases whose answers are known by hand."""
import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import PipelineError
from pipeline.evaluation.probes import confusion, iou_per_class, mean_iou
from pipeline.config import ZeroShotConfig
from pipeline.evaluation.zeroshot import (IMAGENET_TEMPLATES, class_queries, cosine_logits, load_class_embeddings,
                                          open_clip_text_encoder, parse_class_names, predict_classes, query_embeddings,
                                          save_class_embeddings, segment, slide_logits, text_queries_key, window_boxes)

PATCH = 8


def test_templates_are_clips_eighty():
    assert len(IMAGENET_TEMPLATES) == 80 == len(set(IMAGENET_TEMPLATES))
    assert all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES)


def test_class_names_with_synonyms():
    names, index = parse_class_names(["background", "person, person in shirt", "car"])
    assert names == ["background", "person", "person in shirt", "car"]
    assert index == [0, 1, 1, 2]
    with pytest.raises(PipelineError, match="class 1 has no name"):
        parse_class_names(["a", " , "])


@pytest.mark.parametrize("h,w,crop,stride", [(448, 597, 336, 112), (97, 61, 32, 11), (20, 50, 64, 16), (33, 33, 33, 7)])
def test_windows_cover_every_pixel_and_stay_inside(h, w, crop, stride):
    count = torch.zeros(h, w)
    boxes = window_boxes(h, w, crop, stride)
    for y0, y1, x0, x1 in boxes:
        assert 0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w
        assert y1 - y0 == min(crop, h) and x1 - x0 == min(crop, w)
        count[y0:y1, x0:x1] += 1
    assert count.min() >= 1
    # averaging the count map over windows leaves exactly one everywhere
    ones = slide_logits(lambda x: torch.ones(x.shape[0], 1, 1, 1), torch.zeros(1, 3, h, w), torch.ones(1, 1), crop, stride)
    assert torch.allclose(ones, torch.ones(1, 1, h, w), rtol=0, atol=1e-6)
    assert len(boxes) == len(set(boxes))


def test_windows_reference_count():
    # 448 x 597 with crop 336 / stride 112: ceil((448-336)/112)+1 = 2 rows, ceil((597-336)/112)+1 = 4 columns
    boxes = window_boxes(448, 597, 336, 112)
    assert len(boxes) == 8
    assert {b[2] for b in boxes} == {0, 112, 224, 261}


def planted_features(labels: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """(B, gh, gw) class per patch -> features equal to (a multiple of) that class's query."""
    return queries[labels] * 3.0


def grid_image_and_labels(labels: torch.Tensor):
    """An image whose 'pixels' carry the label so a features_fn can read the label of each patch."""
    pix = labels.repeat_interleave(PATCH, -2).repeat_interleave(PATCH, -1)
    return pix[:, None].float().expand(-1, 3, -1, -1).contiguous(), pix


def test_features_equal_to_class_embedding_give_miou_one():
    g = torch.Generator().manual_seed(0)
    queries = F.normalize(torch.randn(4, 16, generator=g), dim=-1)
    # class changes along columns only: bilinear upsampling of patch logits then keeps every
    # pixel's own patch the strongest (at a corner where three classes meet it need not be)
    labels = torch.randint(0, 4, (2, 1, 9), generator=g).expand(2, 6, 9)
    image, gt = grid_image_and_labels(labels)

    def features_fn(x):
        return planted_features(x[:, 0, ::PATCH, ::PATCH].round().long(), queries)

    pred = segment(features_fn, image, queries, torch.arange(4), 4, short_side=image.shape[-2], crop=image.shape[-2],
                   stride=PATCH * 2, logit_scale=40, prob_threshold=0.0)
    conf = confusion(pred, gt, 4, 255)
    assert mean_iou(conf) == 1.0


def test_known_confusion_gives_known_iou():
    # every patch of class 2 looks like class 1: IoU(1) = |1| / (|1| + |2|) = 6 / 18, IoU(2) = 0
    queries = torch.eye(3)
    labels = torch.tensor([[0, 0, 1, 1, 2, 2, 2, 2]]).expand(1, 3, 8)
    image, gt = grid_image_and_labels(labels)
    seen = torch.tensor([0, 1, 1])

    def features_fn(x):
        return planted_features(seen[x[:, 0, ::PATCH, ::PATCH].round().long()], queries)

    pred = segment(features_fn, image, queries, torch.arange(3), 3, short_side=image.shape[-2], crop=image.shape[-1],
                   stride=PATCH, logit_scale=40, prob_threshold=0.0)
    iou = iou_per_class(confusion(pred, gt, 3, 255))
    px = PATCH * PATCH
    assert iou[0] == 1.0
    assert iou[1] == pytest.approx((6 * px) / (18 * px))
    assert iou[2] == 0.0
    assert mean_iou(confusion(pred, gt, 3, 255)) == pytest.approx(4 / 9)


def test_synonyms_max_and_background_threshold():
    # queries: background, cat, cat (synonym), dog
    class_index = torch.tensor([0, 1, 1, 2])
    logits = torch.tensor([0.0, 0.30, 0.29, 0.295]).view(1, 4, 1, 1)
    # the two cat synonyms split cat's mass; the max over synonyms is still compared per class
    p = torch.softmax(logits.flatten() * 40, 0)
    assert predict_classes(logits, class_index, 3, 40).item() == (1 if p[1] > p[3] else 2)
    assert predict_classes(logits, class_index, 3, 40).item() == 1
    # best probability p[1] ~ 0.43: a threshold above it sends the pixel to background
    assert predict_classes(logits, class_index, 3, 40, prob_threshold=float(p[1]) + 0.01).item() == 0
    assert predict_classes(logits, class_index, 3, 40, prob_threshold=float(p[1]) - 0.01).item() == 1
    # the logit scale matters: at scale 1 every class is near 1/4, all under 0.3
    assert predict_classes(logits, class_index, 3, 1, prob_threshold=0.3).item() == 0


def test_query_embeddings_average_templates_then_normalise():
    table = {}
    g = torch.Generator().manual_seed(1)

    def encode(texts):
        return torch.stack([table.setdefault(t, torch.randn(8, generator=g)) for t in texts])

    q = query_embeddings(encode, ["cat", "dog"], ("a {}.", "the {}!"))
    expect = F.normalize(F.normalize(table["a cat."], dim=0) + F.normalize(table["the cat!"], dim=0), dim=0)
    assert torch.allclose(q[0], expect, atol=1e-6)
    assert torch.allclose(q.norm(dim=-1), torch.ones(2))


def test_open_clip_text_tower_is_seeded():
    enc = open_clip_text_encoder("ViT-B-16", None, seed=0)
    a = query_embeddings(enc, ["cat"], IMAGENET_TEMPLATES[:3])
    b = query_embeddings(open_clip_text_encoder("ViT-B-16", None, seed=0), ["cat"], IMAGENET_TEMPLATES[:3])
    assert a.shape == (1, 512) and torch.equal(a, b)


def test_text_tower_queries_are_kept_and_read_back_by_what_they_depend_on(tmp_path):
    z = ZeroShotConfig(text_model="ViT-S-16-alt", labeled="sample:labeled")  # the smallest text tower of open_clip
    saved = str(tmp_path / "text_queries")
    queries, index = class_queries(z, ["cat"], 256, None, saved=saved)
    assert queries.shape == (1, 256) and index.tolist() == [0]
    (kept,) = (tmp_path / "text_queries").iterdir()
    assert kept.name == f"{text_queries_key(z, ['cat'])}.safetensors"
    assert torch.equal(load_class_embeddings(str(kept), 1, 256)[0], queries)

    # the next evaluation of these classes reads the kept file (overwritten here, so that reading it shows)
    planted = F.normalize(torch.randn(1, 256), dim=-1)
    save_class_embeddings(str(kept), planted, [0])
    assert torch.equal(class_queries(z, ["cat"], 256, None, saved=saved)[0], planted)
    # another seed, names, tower or weights are other queries; with weights the seed is irrelevant
    tagged = z.model_copy(update={"text_pretrained": "openai"})
    keys = {text_queries_key(z, ["cat"]), text_queries_key(z.model_copy(update={"text_seed": 1}), ["cat"]),
            text_queries_key(z, ["cat", "kitten"]), text_queries_key(z.model_copy(update={"text_model": "ViT-B-16"}), ["cat"]),
            text_queries_key(tagged, ["cat"])}
    assert len(keys) == 5
    assert text_queries_key(tagged, ["cat"]) == text_queries_key(tagged.model_copy(update={"text_seed": 5}), ["cat"])


def test_class_embeddings_file_round_trip_and_refusals(tmp_path):
    path = str(tmp_path / "emb.safetensors")
    emb = torch.randn(4, 16)
    save_class_embeddings(path, emb, [0, 1, 1, 2])
    q, idx = load_class_embeddings(path, 3, 16)
    assert torch.allclose(q, F.normalize(emb, dim=-1)) and idx.tolist() == [0, 1, 1, 2]
    with pytest.raises(PipelineError, match="dimension 16, the model's features have 512"):
        load_class_embeddings(path, 3, 512)
    with pytest.raises(PipelineError, match="every class 0..3"):
        load_class_embeddings(path, 4, 16)
    assert load_class_embeddings(path, 3, None)[0].shape == (4, 16)  # width checked later, on the loaded model
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(PipelineError, match="not a readable"):
        load_class_embeddings(str(tmp_path / "bad.safetensors"), 3, 16)


def test_features_of_another_width_than_the_queries_are_refused():
    queries = F.normalize(torch.randn(3, 16), dim=-1)
    assert cosine_logits(torch.randn(2, 4, 5, 16), queries).shape == (2, 3, 4, 5)
    with pytest.raises(PipelineError, match="features have 24 dimensions, the class queries 16"):
        cosine_logits(torch.randn(2, 4, 5, 24), queries)


def test_openai_text_tower_is_built_with_quick_gelu():
    """OpenAI's CLIP weights were trained with QuickGELU; open_clip's `ViT-B-16` config has GELU
    and only warns. The activation follows the tag (weights cannot be downloaded here, so the
    tower is built from the same config without them)."""
    import open_clip
    from open_clip.transformer import QuickGELU

    from pipeline.evaluation.zeroshot import text_tower_quick_gelu

    assert text_tower_quick_gelu("ViT-B-16", "openai") is True
    assert text_tower_quick_gelu("ViT-B-16-quickgelu", "openai") is True
    assert text_tower_quick_gelu("ViT-B-16", "laion2b_s34b_b88k") is False
    assert text_tower_quick_gelu("ViT-B-16", None) is False
    tower = open_clip.create_model("ViT-B-16", pretrained=None, force_quick_gelu=text_tower_quick_gelu("ViT-B-16", "openai"))
    assert isinstance(tower.transformer.resblocks[0].mlp.gelu, QuickGELU)


def test_text_tower_with_unknown_or_contradicting_weights_is_refused():
    from pipeline.evaluation.zeroshot import text_tower_quick_gelu

    with pytest.raises(PipelineError, match="no weights 'nope'.*openai"):
        text_tower_quick_gelu("ViT-B-16", "nope")
    import open_clip
    # a registered (model, tag) pair whose activations disagree is what open_clip only warns about
    open_clip.pretrained._PRETRAINED.setdefault("ViT-B-16-quickgelu", {})["gelutesttag"] = {"quick_gelu": False}
    try:
        with pytest.raises(PipelineError, match="trained with GELU; use 'ViT-B-16'"):
            text_tower_quick_gelu("ViT-B-16-quickgelu", "gelutesttag")
    finally:
        del open_clip.pretrained._PRETRAINED["ViT-B-16-quickgelu"]["gelutesttag"]
