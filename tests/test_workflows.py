"""The saved workflows: structurally valid for ComfyUI's frontend, paper defaults, and runnable end to end."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import comfy_executor as ce

WORKFLOWS = sorted((ce.REPO / "workflows").glob("rectifid_*.json"))
CLASSES = ce.node_classes()
MODEL_INPUTS = {"flow_folder": "diffusers", "model_pack": "insightface", "dinov2": "dinov2", "owlvit": "owlvit",
                "clip_vision": "clip_vision"}
SEED_CONTROLS = ("fixed", "increment", "decrement", "randomize")
TINY = {"RectifIDSampler": {"width": 16, "height": 16, "iterations": 1}, "RectifIDDetectCrop": {"crop_size": 64}}


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_the_four_workflows_exist():
    assert [p.name for p in WORKFLOWS] == ["rectifid_dog_and_cat.json", "rectifid_single_face.json",
                                           "rectifid_single_object_l1.json", "rectifid_two_faces.json"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_structure_and_links(path):
    wf = load(path)
    assert wf["version"] == 0.4
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]) and wf["last_node_id"] >= max(nodes)
    assert wf["last_link_id"] >= max(link[0] for link in wf["links"])
    notes = [n for n in wf["nodes"] if n["type"] in ce.FRONTEND_ONLY]
    assert len(notes) == 1 and "models/diffusers" in notes[0]["widgets_values"][0]  # setup notes for users
    for n in wf["nodes"]:
        assert n["type"] in CLASSES or n["type"] in ce.FRONTEND_ONLY, f"unknown node type {n['type']}"
        assert {"id", "pos", "size", "inputs", "outputs", "widgets_values", "mode", "order"} <= set(n)
    for link_id, src, slot, dst, dslot, type_ in wf["links"]:
        out, inp = nodes[src]["outputs"][slot], nodes[dst]["inputs"][dslot]
        assert out["type"] == inp["type"] == type_, (link_id, out, inp)
        assert link_id in out["links"] and inp["link"] == link_id
        assert CLASSES[nodes[src]["type"]].RETURN_TYPES[slot] == type_
        assert ce.all_inputs(CLASSES[nodes[dst]["type"]])[inp["name"]][0] == type_
    for n in wf["nodes"]:
        if n["type"] in ce.FRONTEND_ONLY:
            continue
        cls = CLASSES[n["type"]]
        required = cls.INPUT_TYPES()["required"]
        linked = {i["name"] for i in n.get("inputs", []) if i.get("link") is not None}
        sockets = {k for k, s in required.items() if ce.input_kind(s) not in ce.WIDGET_TYPES}
        assert sockets <= linked, f"node {n['id']} ({n['type']}): unconnected {sockets - linked}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_widget_values_fit_their_inputs(path):
    for n in load(path)["nodes"]:
        if n["type"] in ce.FRONTEND_ONLY:
            continue
        cls = CLASSES[n["type"]]
        values = ce.map_widgets(cls, n["widgets_values"])
        flat = list(n["widgets_values"])
        i = 0
        for name, spec in ce.widget_inputs(cls):
            value, opts, kind = values[name], ce.input_options(spec), ce.input_kind(spec)
            if kind == "COMBO":
                if name in MODEL_INPUTS or (n["type"] == "LoadImage" and name == "image"):
                    assert isinstance(value, str) and value, (n["type"], name)
                else:
                    assert value in spec[0], (n["type"], name, value)
            elif kind in ("INT", "FLOAT"):
                assert isinstance(value, (int, float)) and not isinstance(value, bool), (n["type"], name)
                assert opts["min"] <= value <= opts["max"], (n["type"], name, value)
                if kind == "INT":
                    assert isinstance(value, int), (n["type"], name)
            elif kind == "STRING":
                assert isinstance(value, str), (n["type"], name)
            if ce.extra_widget_values(name, spec) and kind == "INT":
                assert flat[i + 1] in SEED_CONTROLS
            i += 1 + ce.extra_widget_values(name, spec)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_paper_defaults(path):
    wf = load(path)
    objects = any(n["type"] == "RectifIDObjectModelLoader" for n in wf["nodes"])
    (sampler,) = [n for n in wf["nodes"] if n["type"] == "RectifIDSampler"]
    v = ce.map_widgets(CLASSES["RectifIDSampler"], sampler["widgets_values"])
    assert (v["width"], v["height"], v["windows"], v["cfg"]) == (512, 512, 4, 3.0)
    assert 20 <= v["iterations"] <= 100
    assert v["guidance_scale"] == (2.0 if objects else 1.0)
    assert v["solver"] == "anchored"
    if "object_l1" in path.stem:
        (subject,) = [n for n in wf["nodes"] if n["type"] == "RectifIDSubject"]
        assert ce.map_widgets(CLASSES["RectifIDSubject"], subject["widgets_values"])["l1_weight"] == 1000.0


def _png(array: np.ndarray, path: Path) -> None:
    Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def input_dir(tmp_path_factory):
    """The reference photos the workflows load: synthetic faces the tiny detector finds, coloured objects."""
    import tiny_faces

    folder = tmp_path_factory.mktemp("input")
    for name, red in (("face_reference.png", 1.0), ("face_reference_2.png", 0.3)):
        _png(tiny_faces.face_image((640, 640), ((10, 10, 1.0, red),))[0].permute(1, 2, 0).numpy(), folder / name)
    yy, xx = np.mgrid[0:96, 0:96] / 96.0
    for name, color in (("can.png", (0.8, 0.1, 0.1)), ("dog.png", (0.6, 0.4, 0.2)), ("cat.png", (0.2, 0.2, 0.2))):
        image = np.ones((96, 96, 3)) * 0.9
        inside = ((xx - 0.5) ** 2 + (yy - 0.55) ** 2) < 0.09
        image[inside] = np.array(color) + 0.1 * xx[inside, None]
        _png(image, folder / name)
    return folder


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_runs_end_to_end(path, input_dir, monkeypatch):
    wf = load(path)
    types = {n["type"] for n in wf["nodes"]}
    kinds = ["diffusers"] + (["insightface"] if "RectifIDFaceModelLoader" in types else []) + \
        (["dinov2", "owlvit"] if "RectifIDObjectModelLoader" in types else [])
    monkeypatch.setenv("RECTIFID_MODELS_DIR", str(ce.tiny_models_dir(*kinds)))
    monkeypatch.setattr(ce.LoadImage, "input_dir", input_dir)
    monkeypatch.setattr(ce.SaveImage, "saved", [])
    torch.manual_seed(0)
    run = ce.execute(wf, TINY)

    (saved,) = ce.SaveImage.saved
    assert saved.shape == (1, 16, 16, 3) and saved.dtype == torch.float32
    assert 0.0 <= float(saved.min()) and float(saved.max()) <= 1.0 and float(saved.std()) > 0
    (sampler_id,) = [n["id"] for n in wf["nodes"] if n["type"] == "RectifIDSampler"]
    images, latent, plot = run.outputs[sampler_id]
    assert torch.equal(images, saved)
    assert latent["samples"].shape == (1, 4, 8, 8)
    assert plot.shape[0] == 1 and plot.shape[-1] == 3
    labels = [ce.map_widgets(CLASSES["RectifIDSubject"], n["widgets_values"])["label"]
              for n in wf["nodes"] if n["type"] == "RectifIDSubject"]
    text = "\n".join(run.ui[sampler_id]["text"])
    assert all(f"{label}: similarity" in text for label in labels), text
    assert text.splitlines()[-1].endswith("after 1 iteration")
