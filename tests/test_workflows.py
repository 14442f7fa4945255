"""The saved workflows: structurally valid for ComfyUI's frontend and its own validation, paper defaults, and
runnable end to end on ComfyUI 0.8.0's real engine (tests/comfyui_runtime.py; skipped without its source)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import comfy_executor as ce
import comfyui_runtime as cr

WORKFLOWS = sorted((ce.REPO / "workflows").glob("rectifid_*.json"))
# the workflows on our own loaders and RectifIDSampler (run end to end); the others sample through ComfyUI's models
OWN_LOADERS = [p for p in WORKFLOWS if p.stem not in ("rectifid_flux_schnell_face", "rectifid_single_face_checkpoint")]
SINGLE_FACE = ce.REPO / "workflows" / "rectifid_single_face.json"
# model-file inputs -> the folder under ComfyUI/models the setup note must name for them
MODEL_INPUTS = {"flow_folder": "diffusers", "model_pack": "insightface/models", "dinov2": "dinov2", "owlvit": "owlvit",
                "clip_vision": "clip_vision", "unet_name": "diffusion_models", "clip_name1": "text_encoders",
                "clip_name2": "text_encoders", "vae_name": "vae", "ckpt_name": "checkpoints"}
SEED_CONTROLS = ("fixed", "increment", "decrement", "randomize")
ANY = "*"  # PreviewAny's input takes every type
# small sizes for the end-to-end runs; steps, CFG and s stay as saved (auto) and resolve from the tiny PeRFlow
TINY = {"RectifIDSampler": {"width": 16, "height": 16, "iterations": 1}, "RectifIDDetectCrop": {"crop_size": 64}}


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def models_for(wf: dict) -> Path:
    """The tiny models a workflow loads, under the names it saved."""
    types = {n["type"] for n in wf["nodes"]}
    kinds = ["diffusers"] + (["insightface"] if "RectifIDFaceModelLoader" in types else []) + \
        (["dinov2", "owlvit"] if "RectifIDObjectModelLoader" in types else [])
    return ce.tiny_models_dir(*kinds)


@pytest.fixture(scope="module")
def definitions(comfyui):
    """The node definitions ComfyUI's server would hand the frontend (its own nodes, extras and our pack)."""
    return comfyui.node_definitions()


def test_the_six_workflows_exist():
    assert [p.name for p in WORKFLOWS] == ["rectifid_dog_and_cat.json", "rectifid_flux_schnell_face.json",
                                           "rectifid_single_face.json", "rectifid_single_face_checkpoint.json",
                                           "rectifid_single_object_l1.json", "rectifid_two_faces.json"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_structure_and_links(path, definitions):
    wf = load(path)
    assert wf["version"] == 0.4
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]) and wf["last_node_id"] >= max(nodes)
    assert wf["last_link_id"] >= max(link[0] for link in wf["links"])
    notes = [n for n in wf["nodes"] if n["type"] in cr.FRONTEND_ONLY]
    assert len(notes) == 1  # the setup note names where every model file the workflow loads goes
    for n in wf["nodes"]:
        if n["type"] not in cr.FRONTEND_ONLY:
            for name, value in cr.map_widgets(definitions[n["type"]], n["widgets_values"]).items():
                if name in MODEL_INPUTS:
                    assert f"ComfyUI/models/{MODEL_INPUTS[name]}/{value}" in notes[0]["widgets_values"][0], value
    for n in wf["nodes"]:
        assert n["type"] in definitions or n["type"] in cr.FRONTEND_ONLY, f"unknown node type {n['type']}"
        assert {"id", "pos", "size", "inputs", "outputs", "widgets_values", "mode", "order"} <= set(n)
    for link_id, src, slot, dst, dslot, type_ in wf["links"]:
        out, inp = nodes[src]["outputs"][slot], nodes[dst]["inputs"][dslot]
        assert out["type"] == type_ and inp["type"] in (type_, ANY), (link_id, out, inp)
        assert link_id in out["links"] and inp["link"] == link_id
        assert definitions[nodes[src]["type"]]["output"][slot] == type_
        target = definitions[nodes[dst]["type"]]["input"]
        assert {**target.get("required", {}), **target.get("optional", {})}[inp["name"]][0] in (type_, ANY)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_widget_values_fit_their_inputs(path, definitions):
    """Every stored value sits where the frontend reads it; ComfyUI's own validation checks ranges and choices."""
    for n in load(path)["nodes"]:
        if n["type"] in cr.FRONTEND_ONLY:
            continue
        definition = definitions[n["type"]]
        values = cr.map_widgets(definition, n["widgets_values"])
        flat, i = list(n["widgets_values"]), 0
        for name, spec in cr.widget_inputs(definition):
            value, kind = values[name], cr.input_kind(spec)
            if kind == "COMBO" and (name in MODEL_INPUTS or (n["type"] == "LoadImage" and name == "image")):
                assert isinstance(value, str) and value, (n["type"], name)
            elif kind == "INT":
                assert isinstance(value, int) and not isinstance(value, bool), (n["type"], name)
            if cr.extra_widget_values(name, spec) and kind == "INT":
                assert flat[i + 1] in SEED_CONTROLS
            i += 1 + cr.extra_widget_values(name, spec)


@pytest.mark.parametrize("path", OWN_LOADERS, ids=lambda p: p.stem)
def test_prompt_passes_comfyuis_validation(path, comfyui, input_dir):
    """The prompt the frontend would send passes execution.validate_prompt with the models and photos present."""
    wf = load(path)
    check = comfyui.validate_workflow(wf, models_dir=models_for(wf), input_dir=input_dir)
    assert check.ok, check.describe()
    nodes = {str(n["id"]): n for n in wf["nodes"] if n["type"] not in cr.FRONTEND_ONLY}
    assert set(check.prompt) == set(nodes)  # the Note is not sent
    assert sorted(check.outputs) == sorted(k for k, n in nodes.items()
                                           if n["type"] in ("SaveImage", "PreviewImage", "PreviewAny"))
    (sampler_id,) = [k for k, v in check.prompt.items() if v["class_type"] == "RectifIDSampler"]
    sampler, stored = check.prompt[sampler_id]["inputs"], nodes[sampler_id]["widgets_values"]
    control = next(i for i, value in enumerate(stored) if value in SEED_CONTROLS)  # the value after the seed
    assert (sampler["seed"], sampler["steps"]) == (stored[control - 1], stored[control + 1])
    assert stored[control] not in sampler.values() and len(sampler) == len(stored) - 1 + 2  # + flow, objective
    (flow_link,) = [link for link in wf["links"] if link[3] == int(sampler_id) and link[4] == 0]
    assert sampler["flow"] == [str(flow_link[1]), flow_link[2]]  # the first input: [source node id as str, slot]
    assert all(set(v["inputs"]) == {"image"} for v in check.prompt.values() if v["class_type"] == "LoadImage")


def test_validation_names_the_node_and_the_wrong_value(comfyui, input_dir):
    """ComfyUI's validation, not ours: a missing photo and an out-of-range value are refused, naming the node."""
    wf = load(SINGLE_FACE)
    problems = {"LoadImage": ({"image": "absent.png"}, "Invalid image file: absent.png"),
                "RectifIDSampler": ({"batch_size": 0}, "Value 0 smaller than min of 1")}
    for kind, (override, message) in problems.items():
        check = comfyui.validate_workflow(wf, overrides={kind: override}, models_dir=models_for(wf),
                                          input_dir=input_dir)
        (node_id,) = [k for k, v in check.prompt.items() if v["class_type"] == kind]
        assert not check.ok and f"node {node_id} ({kind}): " in check.describe()
        assert message in check.describe(), check.describe()
    with pytest.raises(ValueError, match="no input named"):
        comfyui.validate_workflow(wf, overrides={"RectifIDSampler": {"iteration": 1}})


@pytest.mark.parametrize("path", OWN_LOADERS, ids=lambda p: p.stem)
def test_paper_defaults(path, definitions):
    """The workflows leave size, steps, CFG and s on auto (the end-to-end run checks what they resolve to)."""
    wf = load(path)
    (sampler,) = [n for n in wf["nodes"] if n["type"] == "RectifIDSampler"]
    v = cr.map_widgets(definitions["RectifIDSampler"], sampler["widgets_values"])
    assert (v["width"], v["height"], v["steps"], v["cfg"], v["guidance_scale"]) == (0, 0, 0, 0.0, 0.0)
    assert 20 <= v["iterations"] <= 100
    assert v["solver"] == "anchored" and v["ck_mode"] == "per_window"
    if "object_l1" in path.stem:
        (subject,) = [n for n in wf["nodes"] if n["type"] == "RectifIDSubject"]
        assert cr.map_widgets(definitions["RectifIDSubject"], subject["widgets_values"])["l1_weight"] == 1000.0


# Geometry of ComfyUI's frontend (litegraph): a node's title bar is drawn above its pos; its side bar and top
# menus cover the left and top edges of the canvas; a node that shows an image (a loaded photo, a preview, the
# sampler's live preview) grows below its saved size to fit it: room for a 2:3 portrait at the node's width.
TITLE_HEIGHT = 30
MENU_LEFT, MENU_TOP = 80, 100  # screen pixels
CANVAS_MARGIN = 20
SHOWS_IMAGES = ("LoadImage", "PreviewImage", "SaveImage", "RectifIDSampler", "SamplerCustomAdvanced")


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
def test_everything_the_run_relies_on_is_shown(path, definitions):
    """Every reference's detections and crops, the report and the plot are connected to a node that shows them."""
    wf = load(path)
    nodes = {n["id"]: n for n in wf["nodes"]}
    shown_by = {(src, slot): nodes[dst]["type"] for _, src, slot, dst, _, _ in wf["links"]}
    wanted = {"RectifIDSubject": {"reference_preview": "PreviewImage"}, "RectifIDDetectCrop": {"preview": "PreviewImage"},
              "RectifIDSampler": {"images": "SaveImage", "history_plot": "PreviewImage", "report": "PreviewAny"},
              "VAEDecode": {"IMAGE": "SaveImage"}}  # after SamplerCustomAdvanced (its SAMPLER has no report output)
    for n in wf["nodes"]:
        for output, viewer in wanted.get(n["type"], {}).items():
            slot = definitions[n["type"]]["output_name"].index(output)
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


@pytest.mark.parametrize("path", OWN_LOADERS, ids=lambda p: p.stem)
def test_runs_end_to_end(path, comfyui, definitions, input_dir, tmp_path):
    """ComfyUI's PromptExecutor runs the workflow: its LoadImage reads the photos, its SaveImage writes the PNG."""
    wf = load(path)
    types = {n["type"] for n in wf["nodes"]}
    run = comfyui.run_workflow(wf, TINY, models_dir=models_for(wf), input_dir=input_dir, output_dir=tmp_path)
    assert run.error is None, run.error["traceback"]
    assert run.events("execution_success")

    (sampler_id,) = [k for k, v in run.prompt.items() if v["class_type"] == "RectifIDSampler"]
    images, latent, plot, report = run.outputs[sampler_id]
    assert images.shape == (1, 16, 16, 3) and images.dtype == torch.float32
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0 and float(images.std()) > 0
    (saved,) = run.images
    assert saved.parent == tmp_path and saved.name.startswith("RectifID_")
    with Image.open(saved) as png:
        pixels, meta = np.asarray(png), dict(png.info)
    assert np.array_equal(pixels, np.clip(255.0 * images[0].numpy(), 0, 255).astype(np.uint8))
    assert json.loads(meta["prompt"]) == run.prompt  # the hidden PROMPT input reached SaveImage
    assert latent["samples"].shape == (1, 4, 8, 8)
    assert plot.shape[0] == 1 and plot.shape[-1] == 3
    (viewer,) = [k for k, v in run.prompt.items() if v["class_type"] == "PreviewAny"]
    assert list(run.ui[viewer]["text"]) == [report]
    executed = {m["node"] for m in run.events("executed")}
    assert executed == set(run.ui) and viewer in executed
    assert any(m["node"] == sampler_id for m in run.events("progress"))
    labels = [cr.map_widgets(definitions["RectifIDSubject"], n["widgets_values"])["label"]
              for n in wf["nodes"] if n["type"] == "RectifIDSubject"]
    lines = report.splitlines()
    objects = "RectifIDObjectModelLoader" in types
    assert lines[0].startswith(f"settings: 16 x 16 px, 4 (auto) steps, 1 iteration, guidance scale "
                               f"{2 if objects else 1} (auto), CFG 3 (auto), solver anchored"), lines[0]
    assert all(any(line.startswith(f"{label}: similarity ") for line in lines) for label in labels), report
    previews = [run.outputs[k][2] for k, v in run.prompt.items() if v["class_type"] == "RectifIDSubject"]
    assert previews and all(p.dim() == 4 and p.shape[-1] == 3 for p in previews)


def test_a_failing_node_reports_through_comfyuis_execution_error(comfyui, input_dir, tmp_path):
    """A photo without a face (black: the tiny detector scores green): the executor stops at the node that raised
    and sends its message to the client."""
    wf = load(SINGLE_FACE)
    _png(np.zeros((64, 64, 3)), tmp_path / "dark.png")
    run = comfyui.run_workflow(wf, {**TINY, "LoadImage": {"image": "dark.png"}}, models_dir=models_for(wf),
                               input_dir=tmp_path, output_dir=tmp_path / "output")
    (detect_id,) = [k for k, v in run.prompt.items() if v["class_type"] == "RectifIDDetectCrop"]
    assert run.error is not None and run.error["node_id"] == detect_id, run.error
    assert run.error["exception_message"].startswith("no face found in image 1 of 1")
    assert not run.events("execution_success") and run.images == [] and not (tmp_path / "output").exists()


# FLUX.1-schnell as ComfyUI's stock nodes build it (its templates' widget values); the files are empty placeholders
STOCK_FLUX = cr.ui_workflow(
    {1: ("UNETLoader", ["flux1-schnell.safetensors", "default"]),
     2: ("DualCLIPLoader", ["t5xxl_fp8_e4m3fn.safetensors", "clip_l.safetensors", "flux", "default"]),
     3: ("VAELoader", ["ae.safetensors"]),
     4: ("CLIPTextEncode", ["a photo of a person"]),
     5: ("BasicGuider", []), 6: ("RandomNoise", [7, "randomize"]), 7: ("KSamplerSelect", ["euler"]),
     8: ("BasicScheduler", ["simple", 4, 1.0]), 9: ("EmptySD3LatentImage", [1024, 1024, 1]),
     10: ("SamplerCustomAdvanced", []), 11: ("VAEDecode", []), 12: ("SaveImage", ["flux"]),
     13: ("Note", ["the Note is not sent"]), 14: ("PrimitiveInt", [768, "fixed"])},
    [(2, 0, 4, "clip", "CLIP"), (1, 0, 5, "model", "MODEL"), (4, 0, 5, "conditioning", "CONDITIONING"),
     (1, 0, 8, "model", "MODEL"), (6, 0, 10, "noise", "NOISE"), (5, 0, 10, "guider", "GUIDER"),
     (7, 0, 10, "sampler", "SAMPLER"), (8, 0, 10, "sigmas", "SIGMAS"), (9, 0, 10, "latent_image", "LATENT"),
     (10, 0, 11, "samples", "LATENT"), (3, 0, 11, "vae", "VAE"), (11, 0, 12, "images", "IMAGE"),
     (14, 0, 9, "height", "INT")])  # a link into a widget input replaces the stored 1024
FLUX_FILES = {"diffusion_models": "flux1-schnell.safetensors", "vae": "ae.safetensors",
              "text_encoders": ("t5xxl_fp8_e4m3fn.safetensors", "clip_l.safetensors")}


def test_stock_node_workflow_validates_without_its_models(comfyui, tmp_path):
    """validate_workflow on ComfyUI's stock loaders and V3 sampling nodes: the names only have to be listed."""
    for folder, names in FLUX_FILES.items():
        (tmp_path / folder).mkdir()
        for name in [names] if isinstance(names, str) else names:
            (tmp_path / folder / name).write_bytes(b"")
    check = comfyui.validate_workflow(STOCK_FLUX, models_dir=tmp_path)
    assert check.ok, check.describe()
    assert check.outputs == ["12"] and "13" not in check.prompt
    assert check.prompt["6"]["inputs"] == {"noise_seed": 7}  # V3 Int with control_after_generate
    assert check.prompt["2"]["inputs"] == {"clip_name1": "t5xxl_fp8_e4m3fn.safetensors",
                                           "clip_name2": "clip_l.safetensors", "type": "flux", "device": "default"}
    assert check.prompt["8"]["inputs"] == {"model": ["1", 0], "scheduler": "simple", "steps": 4, "denoise": 1.0}
    assert check.prompt["9"]["inputs"] == {"width": 1024, "height": ["14", 0], "batch_size": 1}
    assert check.prompt["14"]["inputs"] == {"value": 768}
    (tmp_path / "vae" / "ae.safetensors").unlink()
    check = comfyui.validate_workflow(STOCK_FLUX, models_dir=tmp_path)
    assert not check.ok and "node 3 (VAELoader): Value not in list: vae_name: 'ae.safetensors'" in check.describe()


def test_comfyui_loads_its_node_set_and_the_pack_as_a_server_does(comfyui, definitions):
    """Only comfy_extras whose packages are missing here fail to import; the pack comes in through ComfyUI's
    custom-node loader; the stock nodes the workflows build on are there."""
    failures = comfyui.import_failures()
    assert all(reason.startswith("No module named") for reason in failures.values()), failures
    ours = {name for name, d in definitions.items() if d["python_module"] == f"custom_nodes.{cr.PACK_FOLDER}"}
    assert ours == set(ce.load_pack().NODE_CLASS_MAPPINGS)
    stock = {"LoadImage", "SaveImage", "PreviewImage", "PreviewAny", "CheckpointLoaderSimple", "UNETLoader",
             "DualCLIPLoader", "VAELoader", "CLIPTextEncode", "SamplerCustomAdvanced", "BasicGuider", "CFGGuider"}
    assert stock <= set(definitions)


# ------------------------------------------------ the workflows on ComfyUI's own loaders and the RectifID SAMPLER
COMFY_WORKFLOWS = [p for p in WORKFLOWS if p not in OWN_LOADERS]
SAMPLER_DEFAULTS = {"guidance_scale": 0.0, "iterations": 20, "memory": "auto", "solver": "anchored",
                    "ck_mode": "per_window"}  # s auto (1.0 for faces), N = 20 as the PeRFlow face workflow


def placeholder_models(wf: dict, folder: Path) -> Path:
    """A models folder with an empty file under every name the workflow's stock loaders ask for (ComfyUI's
    validation only lists them) and the tiny antelopev2 for our face loader."""
    files = {"UNETLoader": ["diffusion_models"], "DualCLIPLoader": ["text_encoders"] * 2, "VAELoader": ["vae"],
             "CheckpointLoaderSimple": ["checkpoints"]}  # their file widgets come first
    for n in wf["nodes"]:
        for kind, name in zip(files.get(n["type"], []), n["widgets_values"]):
            (folder / kind).mkdir(parents=True, exist_ok=True)
            (folder / kind / name).write_bytes(b"")
    (folder / "insightface").symlink_to(ce.tiny_models_dir("insightface") / "insightface")
    return folder


def linked(wf: dict, node_id: int, input_name: str) -> tuple[str, int]:
    """(source node type, source slot) of the link into a node's input."""
    nodes = {n["id"]: n for n in wf["nodes"]}
    (link,) = [i["link"] for i in nodes[node_id]["inputs"] if i["name"] == input_name]
    (_, src, slot, _, _, _) = next(entry for entry in wf["links"] if entry[0] == link)
    return nodes[src]["type"], slot


def only(wf: dict, kind: str) -> dict:
    (node,) = [n for n in wf["nodes"] if n["type"] == kind]
    return node


@pytest.mark.parametrize("path", COMFY_WORKFLOWS, ids=lambda p: p.stem)
def test_comfy_model_workflows_pass_comfyuis_validation(path, comfyui, input_dir, tmp_path):
    """ComfyUI's validation with empty placeholder files under the saved model names. For the FLUX.1-schnell
    workflow this is the only check on the engine: DualCLIPLoader builds T5-XXL and CLIP-L at their real sizes
    from the file (no tiny version loads), so it cannot run here. The checkpoint variant also runs end to end
    (test_checkpoint_workflow_runs_end_to_end)."""
    wf = load(path)
    check = comfyui.validate_workflow(wf, models_dir=placeholder_models(wf, tmp_path), input_dir=input_dir)
    assert check.ok, check.describe()
    nodes = {str(n["id"]): n for n in wf["nodes"] if n["type"] not in cr.FRONTEND_ONLY}
    assert set(check.prompt) == set(nodes)
    assert sorted(check.outputs) == sorted(k for k, n in nodes.items() if n["type"] in ("SaveImage", "PreviewImage"))
    (sampler,) = [v["inputs"] for v in check.prompt.values() if v["class_type"] == "RectifIDComfySampler"]
    (decode,) = [v["inputs"] for v in check.prompt.values() if v["class_type"] == "VAEDecode"]
    assert {k: v for k, v in sampler.items() if k not in ("objective", "vae")} == SAMPLER_DEFAULTS
    assert sampler["vae"] == decode["vae"]  # guidance decodes with the VAE that decodes the result
    (noise,) = [v["inputs"] for v in check.prompt.values() if v["class_type"] == "RandomNoise"]
    assert noise == {"noise_seed": 42}


def test_flux_schnell_workflow_samples_as_schnell_does(definitions):
    """FLUX.1-schnell: 4 Euler steps of ComfyUI's simple schedule, no CFG (BasicGuider), 1024 px, T5 + CLIP-L."""
    wf = load(ce.REPO / "workflows" / "rectifid_flux_schnell_face.json")
    values = {n["type"]: cr.map_widgets(definitions[n["type"]], n["widgets_values"]) for n in wf["nodes"]
              if n["type"] not in cr.FRONTEND_ONLY}
    assert values["UNETLoader"] == {"unet_name": "flux1-schnell.safetensors", "weight_dtype": "default"}
    assert values["DualCLIPLoader"] == {"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp16.safetensors",
                                        "type": "flux", "device": "default"}
    assert values["BasicScheduler"] == {"scheduler": "simple", "steps": 4, "denoise": 1.0}
    assert values["EmptySD3LatentImage"] == {"width": 1024, "height": 1024, "batch_size": 1}
    assert values["CLIPTextEncode"]["text"] == cr.map_widgets(
        definitions["RectifIDSampler"], only(load(SINGLE_FACE), "RectifIDSampler")["widgets_values"])["positive"]
    assert "CFGGuider" not in values and "KSamplerSelect" not in values
    advanced = only(wf, "SamplerCustomAdvanced")["id"]
    assert [linked(wf, advanced, name) for name in ("noise", "guider", "sampler", "sigmas", "latent_image")] == \
        [("RandomNoise", 0), ("BasicGuider", 0), ("RectifIDComfySampler", 0), ("BasicScheduler", 0),
         ("EmptySD3LatentImage", 0)]
    assert linked(wf, only(wf, "RectifIDComfySampler")["id"], "vae") == ("VAELoader", 0)
    assert linked(wf, only(wf, "RectifIDComfySampler")["id"], "objective") == ("RectifIDSubject", 1)
    assert linked(wf, only(wf, "RectifIDSubject")["id"], "model") == ("RectifIDFaceModelLoader", 0)
    assert linked(wf, only(wf, "BasicGuider")["id"], "model") == ("UNETLoader", 0)


def test_checkpoint_workflow_samples_the_checkpoint_as_its_flow(definitions):
    """Load Checkpoint -> Checkpoint Flow (perflow, auto, its 4 windows): the guider's MODEL and the sigmas come
    from the Checkpoint Flow (the raw checkpoint would be sampled as an eps model), CFG 3.0, 512 px, the
    checkpoint's CLIP for both prompts and its VAE for guidance and decoding."""
    wf = load(ce.REPO / "workflows" / "rectifid_single_face_checkpoint.json")
    own = cr.map_widgets(definitions["RectifIDSampler"], only(load(SINGLE_FACE), "RectifIDSampler")["widgets_values"])
    flow = only(wf, "RectifIDCheckpointFlow")
    assert cr.map_widgets(definitions["RectifIDCheckpointFlow"], flow["widgets_values"]) == \
        {"flow_type": "perflow", "prediction_type": "auto", "steps": 0}
    assert only(wf, "CFGGuider")["widgets_values"] == [3.0]
    assert only(wf, "EmptyLatentImage")["widgets_values"] == [512, 512, 1]
    guider = only(wf, "CFGGuider")["id"]
    assert linked(wf, guider, "model") == ("RectifIDCheckpointFlow", 0)
    assert linked(wf, flow["id"], "model") == ("CheckpointLoaderSimple", 0)
    prompts = {n["id"]: n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "CLIPTextEncode"}
    for name, text in (("positive", own["positive"]), ("negative", own["negative"])):
        (link,) = [i["link"] for i in only(wf, "CFGGuider")["inputs"] if i["name"] == name]
        source = next(entry[1] for entry in wf["links"] if entry[0] == link)
        assert prompts[source] == text and linked(wf, source, "clip") == ("CheckpointLoaderSimple", 1)
    advanced = only(wf, "SamplerCustomAdvanced")["id"]
    assert [linked(wf, advanced, name) for name in ("noise", "guider", "sampler", "sigmas", "latent_image")] == \
        [("RandomNoise", 0), ("CFGGuider", 0), ("RectifIDComfySampler", 0), ("RectifIDCheckpointFlow", 1),
         ("EmptyLatentImage", 0)]
    assert linked(wf, only(wf, "RectifIDComfySampler")["id"], "vae") == ("CheckpointLoaderSimple", 2)
    assert linked(wf, only(wf, "VAEDecode")["id"], "vae") == ("CheckpointLoaderSimple", 2)


@pytest.fixture(scope="module")
def checkpoint_models(comfyui, tmp_path_factory):
    """A models folder with a random-weight SD1.5 checkpoint under the saved name (built in ComfyUI's process: it
    needs ComfyUI's UNet key map) and the tiny antelopev2."""
    import tiny_comfy_models as tcm

    folder = tmp_path_factory.mktemp("checkpoint-models")
    comfyui.call(tcm.build_sd15_checkpoint, folder / "checkpoints" / "perflow-sd15-dreamshaper.safetensors")
    (folder / "insightface").symlink_to(ce.tiny_models_dir("insightface") / "insightface")
    return folder


CHECKPOINT_TINY = {"EmptyLatentImage": {"width": 16, "height": 16}, "RectifIDComfySampler": {"iterations": 1}}


def test_checkpoint_workflow_runs_end_to_end(comfyui, checkpoint_models, input_dir, tmp_path):
    """ComfyUI's Load Checkpoint reads a full SD1.5 file (tiny UNet; ComfyUI's fixed ViT-L text encoder and SD VAE
    at full size, random weights); the Checkpoint Flow, CFGGuider, the RectifID Sampler in SamplerCustomAdvanced
    and VAE Decode run on ComfyUI's engine and SaveImage writes the decoded image."""
    wf = load(ce.REPO / "workflows" / "rectifid_single_face_checkpoint.json")
    run = comfyui.run_workflow(wf, CHECKPOINT_TINY, models_dir=checkpoint_models, input_dir=input_dir,
                               output_dir=tmp_path)
    assert run.error is None, run.error["traceback"]
    assert run.events("execution_success")
    ids = {v["class_type"]: k for k, v in run.prompt.items()}
    output, denoised = run.outputs[ids["SamplerCustomAdvanced"]]
    assert output["samples"].shape == (1, 4, 2, 2) and torch.isfinite(output["samples"]).all()
    (images,) = run.outputs[ids["VAEDecode"]]
    assert images.shape == (1, 16, 16, 3) and float(images.std()) > 0
    (saved,) = run.images
    with Image.open(saved) as png:
        assert np.array_equal(np.asarray(png), np.clip(255.0 * images[0].numpy(), 0, 255).astype(np.uint8))
    assert any(m["node"] == ids["SamplerCustomAdvanced"] for m in run.events("progress"))
    preview = run.outputs[ids["RectifIDSubject"]][2]
    assert preview.dim() == 4 and preview.shape[-1] == 3
    assert ids["PreviewImage"] in {m["node"] for m in run.events("executed")}
