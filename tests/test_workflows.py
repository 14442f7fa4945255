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
ANY = "*"  # PreviewAny's input takes every type
# small sizes for the end-to-end runs; steps, CFG and s stay as saved (auto) and resolve from the tiny PeRFlow
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
        assert out["type"] == type_ and inp["type"] in (type_, ANY), (link_id, out, inp)
        assert link_id in out["links"] and inp["link"] == link_id
        assert CLASSES[nodes[src]["type"]].RETURN_TYPES[slot] == type_
        assert ce.all_inputs(CLASSES[nodes[dst]["type"]])[inp["name"]][0] in (type_, ANY)
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
    """The workflows leave size, steps, CFG and s on auto (the end-to-end run checks what they resolve to)."""
    wf = load(path)
    (sampler,) = [n for n in wf["nodes"] if n["type"] == "RectifIDSampler"]
    v = ce.map_widgets(CLASSES["RectifIDSampler"], sampler["widgets_values"])
    assert (v["width"], v["height"], v["steps"], v["cfg"], v["guidance_scale"]) == (0, 0, 0, 0.0, 0.0)
    assert 20 <= v["iterations"] <= 100
    assert v["solver"] == "anchored" and v["ck_mode"] == "per_window"
    if "object_l1" in path.stem:
        (subject,) = [n for n in wf["nodes"] if n["type"] == "RectifIDSubject"]
        assert ce.map_widgets(CLASSES["RectifIDSubject"], subject["widgets_values"])["l1_weight"] == 1000.0


# Geometry of ComfyUI's frontend (litegraph): a node's title bar is drawn above its pos; its side bar and top
# menus cover the left and top edges of the canvas; a node that shows an image (a loaded photo, a preview, the
# sampler's live preview) grows below its saved size to fit it: room for a 2:3 portrait at the node's width.
TITLE_HEIGHT = 30
MENU_LEFT, MENU_TOP = 80, 100  # screen pixels
CANVAS_MARGIN = 20
SHOWS_IMAGES = ("LoadImage", "PreviewImage", "SaveImage", "RectifIDSampler")


def footprint(node: dict) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of a node on the canvas, title bar and the room its images may take included."""
    (x, y), (w, h) = node["pos"], node["size"]
    grow = 1.5 * w if node["type"] in SHOWS_IMAGES else 0.0
    return x, y - TITLE_HEIGHT, x + w, y + h + grow


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_layout_nothing_overlaps_and_nothing_hides_under_the_menus(path):
    wf = load(path)
    boxes = {n["id"]: footprint(n) for n in wf["nodes"]}
    for a in boxes:
        for b in boxes:
            if a < b:
                (l1, t1, r1, b1), (l2, t2, r2, b2) = boxes[a], boxes[b]
                assert r1 <= l2 or r2 <= l1 or b1 <= t2 or b2 <= t1, f"nodes {a} and {b} overlap"
    scale, (dx, dy) = wf["extra"]["ds"]["scale"], wf["extra"]["ds"]["offset"]
    for node_id, (left, top, _, _) in boxes.items():
        assert left >= CANVAS_MARGIN and top >= CANVAS_MARGIN, f"node {node_id} touches the canvas origin"
        assert (left + dx) * scale >= MENU_LEFT and (top + dy) * scale >= MENU_TOP, \
            f"node {node_id} opens under the menus at {(left + dx) * scale, (top + dy) * scale}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_everything_the_run_relies_on_is_shown(path):
    """Every reference's detections and crops, the report and the plot are connected to a node that shows them."""
    wf = load(path)
    nodes = {n["id"]: n for n in wf["nodes"]}
    shown_by = {(src, slot): nodes[dst]["type"] for _, src, slot, dst, _, _ in wf["links"]}
    wanted = {"RectifIDSubject": {"reference_preview": "PreviewImage"}, "RectifIDDetectCrop": {"preview": "PreviewImage"},
              "RectifIDSampler": {"images": "SaveImage", "history_plot": "PreviewImage", "report": "PreviewAny"}}
    for n in wf["nodes"]:
        for output, viewer in wanted.get(n["type"], {}).items():
            slot = list(CLASSES[n["type"]].RETURN_NAMES).index(output)
            assert shown_by.get((n["id"], slot)) == viewer, f"{n['type']} {n['id']}: {output} is not shown"


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
    images, latent, plot, report = run.outputs[sampler_id]
    assert torch.equal(images, saved)
    assert latent["samples"].shape == (1, 4, 8, 8)
    assert plot.shape[0] == 1 and plot.shape[-1] == 3
    (viewer,) = [n["id"] for n in wf["nodes"] if n["type"] == "PreviewAny"]
    assert run.ui[viewer]["text"] == (report,)
    labels = [ce.map_widgets(CLASSES["RectifIDSubject"], n["widgets_values"])["label"]
              for n in wf["nodes"] if n["type"] == "RectifIDSubject"]
    lines = report.splitlines()
    objects = "RectifIDObjectModelLoader" in types
    assert lines[0].startswith(f"settings: 16 x 16 px, 4 (auto) steps, 1 iteration, guidance scale "
                               f"{2 if objects else 1} (auto), CFG 3 (auto), solver anchored"), lines[0]
    assert all(any(line.startswith(f"{label}: similarity ") for line in lines) for label in labels), report
    previews = [run.outputs[n["id"]][2] for n in wf["nodes"] if n["type"] == "RectifIDSubject"]
    assert previews and all(p.dim() == 4 and p.shape[-1] == 3 for p in previews)
