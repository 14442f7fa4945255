"""Subjects and objects (OWL-ViT + DINOv2) and CLIP image guidance on tiny saved models."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import tiny_transformers
from rectifid_core.objectives import (
    ClipImageObjective,
    MultiSubjectObjective,
    SubjectIdentityObjective,
    load_clip_vision,
    load_dinov2,
    load_owlvit,
)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {
        "owl": tiny_transformers.build_owlvit(root / "owlvit"),
        "dino": tiny_transformers.build_dinov2(root / "dinov2"),
        "clip": tiny_transformers.build_clip_vision(root / "clip"),
    }


@pytest.fixture(scope="module")
def owl(folders):
    return load_owlvit(folders["owl"])


@pytest.fixture(scope="module")
def dino(folders):
    return load_dinov2(folders["dino"])


def _photo(seed, h=80, w=96):
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(1, 3, h // 8, w // 8, generator=g), size=(h, w), mode="bilinear")


def test_loaders_read_the_saved_preprocessing(folders, dino):
    cfg = json.loads((folders["dino"] / "preprocessor_config.json").read_text())
    assert dino.size == (cfg["crop_size"]["height"], cfg["crop_size"]["width"])
    torch.testing.assert_close(dino.mean, torch.tensor(cfg["image_mean"]))
    torch.testing.assert_close(dino.std, torch.tensor(cfg["image_std"]))
    x = torch.rand(1, 3, 30, 40)
    expect = (F.interpolate(x, size=dino.size, mode="bilinear") - dino.mean.view(1, 3, 1, 1)) / dino.std.view(1, 3, 1, 1)
    torch.testing.assert_close(dino.preprocess(x), expect)
    # the encoder is the saved DINOv2: CLS token of the model's last hidden state
    with torch.no_grad():
        torch.testing.assert_close(dino(x), dino.model(pixel_values=expect).last_hidden_state[:, 0])


@pytest.mark.parametrize("loader,key", [(load_owlvit, "owl"), (load_dinov2, "dino"), (load_clip_vision, "clip")])
def test_missing_files_are_listed(tmp_path, folders, loader, key):
    import shutil

    with pytest.raises(FileNotFoundError, match="folder does not exist"):
        loader(tmp_path / "nowhere")
    broken = tmp_path / key
    shutil.copytree(folders[key], broken)
    (broken / "model.safetensors").unlink()
    (broken / "config.json").unlink()
    with pytest.raises(FileNotFoundError) as err:
        loader(broken)
    msg = str(err.value)
    assert str(broken / "config.json") in msg and "model.safetensors" in msg


def test_text_then_image_guided_detection_crops_the_subject(owl, dino):
    ref = _photo(1)
    found = owl.detect_text(ref[0], "dog", threshold=0.0)
    assert len(found) and all(0 <= b[0] < b[2] <= 96 and 0 <= b[1] < b[3] <= 80 for b in found.boxes)
    assert list(found.scores) == sorted(found.scores, reverse=True)
    obj = SubjectIdentityObjective(dino, ref, detector=owl, query="dog")
    best = owl.detect_text(ref[0], "dog", threshold=0.1)
    assert obj.reference_boxes[0] == pytest.approx(list(best.box(0)))
    assert obj.reference_located[0].chosen == 0 and len(obj.reference_located[0].detections) == len(best)
    gen = _photo(2, 64, 64).requires_grad_(True)
    out = obj(gen)
    (x1, y1, x2, y2) = out.diagnostics["boxes"][0]
    guided = owl.detect_guided(gen[0].detach(), obj.reference_crops[0][0])
    assert [x1, y1, x2, y2] == pytest.approx([round(v, 1) for v in guided.box(0)], abs=0.05)
    assert out.diagnostics["whole_image_fallback"] == [False] and out.diagnostics["missing"] == [[]]
    # loss equals the independent computation on the same crop
    c = gen[:, :, round(y1) : round(y2), round(x1) : round(x2)]
    with torch.no_grad():
        cos = F.cosine_similarity(dino(c), F.normalize(dino(obj.reference_crops[0]), dim=-1))
    assert out.loss.item() == pytest.approx(100 * (1 - cos.item()), abs=1e-3)
    (g,) = torch.autograd.grad(out.loss.sum(), gen)
    inside = g[0, :, round(y1) : round(y2), round(x1) : round(x2)].abs().sum()
    assert inside > 0 and g.abs().sum() == pytest.approx(inside.item(), rel=1e-6)


def test_nothing_detected_falls_back_to_whole_image(owl, dino):
    obj = SubjectIdentityObjective(dino, _photo(1), detector=owl, query="dog", guided_threshold=1.0)
    gen = _photo(3, 64, 48).requires_grad_(True)
    out = obj(torch.cat([gen, gen]))
    assert out.diagnostics["whole_image_fallback"] == [True, True]
    assert out.diagnostics["boxes"][0] == [0.0, 0.0, 48.0, 64.0] and out.diagnostics["fallback_count"] == 2
    assert out.diagnostics["missing"] == [[], []]  # single_object.py steers the whole image: guided, not missing
    (g,) = torch.autograd.grad(out.loss.sum(), gen)
    assert torch.isfinite(out.loss).all() and g.abs().sum() > 0
    # the same loss as the whole image taken as the crop
    with torch.no_grad():
        cos = F.cosine_similarity(dino(gen), F.normalize(dino(obj.reference_crops[0]), dim=-1))
    assert out.loss[0].item() == pytest.approx(100 * (1 - cos.item()), abs=1e-3)
    skip = SubjectIdentityObjective(dino, _photo(1), detector=owl, query="dog", guided_threshold=1.0,
                                    not_found="skip")
    out = skip(torch.cat([gen, gen]))
    assert out.diagnostics["missing"] == [[0], [0]] and out.diagnostics["similarity"] == [None, None]
    (g,) = torch.autograd.grad(out.loss.sum(), gen)
    assert out.loss.abs().sum().item() == 0.0 and g.abs().sum() == 0
    with pytest.raises(ValueError, match="text query"):
        SubjectIdentityObjective(dino, _photo(1), detector=owl)


def test_label_not_found_in_a_reference_is_an_error_naming_the_photo(owl, dino, caplog):
    """single_object.py silently crops nothing (whole photo) when the label is not found; we refuse."""
    clear, unclear = _photo(2), _photo(1)
    threshold = 0.9
    assert len(owl.detect_text(clear[0], "dog", threshold)) and not len(owl.detect_text(unclear[0], "dog", threshold))
    with pytest.raises(ValueError, match=r"found no 'dog' in reference image 2 \(96x80 pixels\).*label"):
        SubjectIdentityObjective(dino, [clear, unclear], detector=owl, query="dog", text_threshold=threshold)
    with caplog.at_level("INFO", logger="rectifid_core.objectives.subjects"):
        SubjectIdentityObjective(dino, [clear, clear], detector=owl, query="dog", text_threshold=0.1)
    n = len(owl.detect_text(clear[0], "dog", 0.1))
    assert n > 1 and any(f"'dog' reference image 2: {n} found, took number 1" in r.getMessage() for r in caplog.records)


def test_l1_term_and_reference_average(dino):
    a, b = _photo(4, 56, 56), _photo(5, 56, 56)
    gen = _photo(6, 56, 56)
    plain = SubjectIdentityObjective(dino, [a, b])
    with_l1 = SubjectIdentityObjective(dino, [a, b], l1_weight=1000.0)
    l1 = ((gen - a).abs().mean() + (gen - b).abs().mean()) / 2  # crops are already at the encoder size
    assert (with_l1(gen).loss - plain(gen).loss).item() == pytest.approx(1000 * l1.item(), rel=1e-4)
    with torch.no_grad():
        ea, eb, eg = dino(a)[0], dino(b)[0], dino(gen)[0]
    ref = (F.normalize(ea, dim=0) + F.normalize(eb, dim=0)) / 2
    assert plain(gen).loss.item() == pytest.approx(100 * (1 - F.cosine_similarity(eg, ref, dim=0).item()), abs=1e-3)
    assert SubjectIdentityObjective(dino, a)(a).loss.item() == pytest.approx(0.0, abs=1e-3)


def test_two_subjects_are_matched(owl, dino):
    cat, dog = _photo(7, 64, 64), _photo(8, 64, 64)
    subjects = [SubjectIdentityObjective(dino, x, detector=owl, query=q) for x, q in ((cat, "cat"), (dog, "dog"))]
    scene = torch.cat([cat[..., :32], dog[..., 32:]], dim=-1).requires_grad_(True)
    out = MultiSubjectObjective(subjects, weights=[1.0, 0.5])(scene)
    d = out.diagnostics
    assert d["skipped"] == [False] and len(d["detection"][0]) == 2
    assert [j for j, a in enumerate(d["assignment"][0]) if a is None] == d["missing"][0]
    (g,) = torch.autograd.grad(out.loss.sum(), scene)
    assert torch.isfinite(out.loss).all() and g.abs().sum() > 0
    with pytest.raises(ValueError, match="subject 2 .* no detector"):
        MultiSubjectObjective([subjects[0], SubjectIdentityObjective(dino, dog)])


def test_clip_image_objective(folders, dino):
    clip = load_clip_vision(folders["clip"])
    ref = _photo(9, 64, 80)
    obj = ClipImageObjective(clip, ref)
    assert obj(ref).loss.item() == pytest.approx(0.0, abs=1e-3)
    gen = _photo(10, 72, 72).requires_grad_(True)
    out = obj(gen)
    with torch.no_grad():
        x = F.interpolate(gen, size=(56, 56), mode="bicubic")  # square: centre crop is the whole image
        x = (x - clip.mean.view(1, 3, 1, 1)) / clip.std.view(1, 3, 1, 1)
        e = clip.model(pixel_values=x).image_embeds
        r = clip.model(pixel_values=clip.preprocess(ref)).image_embeds
    assert out.loss.item() == pytest.approx(100 * (1 - F.cosine_similarity(e, r).item()), abs=1e-3)
    assert out.diagnostics["similarity"][0] == pytest.approx(1 - out.loss.item() / 100, abs=1e-5)
    (g,) = torch.autograd.grad(out.loss.sum(), gen)
    assert g.abs().sum() > 0
    with pytest.raises(ValueError, match="CLIP vision encoder"):
        ClipImageObjective(dino, ref)
