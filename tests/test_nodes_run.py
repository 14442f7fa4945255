"""The nodes executed as ComfyUI executes them (under torch.inference_mode()) on tiny real-format models."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

import comfy_executor as ce
import tiny_faces
from rectifid_core.guidance import GuidanceConfig
from rectifid_core.objectives.base import ObjectiveOutput
from rectifid_core.pipeline import PersonalizeSettings, personalize

PACK = ce.load_pack()
N = PACK.NODE_CLASS_MAPPINGS
bridge = PACK.nodes.comfy_bridge
common = PACK.nodes.common


def comfy(fn, *args, **kwargs):
    """Call a node function the way ComfyUI's executor does."""
    with torch.inference_mode():
        return fn(*args, **kwargs)


def as_comfy_image(image: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] -> ComfyUI IMAGE, created as an inference tensor like LoadImage's output in ComfyUI."""
    with torch.inference_mode():
        return image.permute(0, 2, 3, 1).contiguous().clone()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = ce.tiny_models_dir("diffusers", "insightface")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RECTIFID_MODELS_DIR", str(root))
        (flow,) = comfy(N["RectifIDFlowLoader"]().load, ce.MODEL_NAMES["diffusers"], "auto", "auto", "auto", "cpu")
        (faces,) = comfy(N["RectifIDFaceModelLoader"]().load, "antelopev2", "cpu", "cpu")
    return flow, faces


def face_photo(*faces) -> torch.Tensor:
    return as_comfy_image(tiny_faces.face_image((640, 640), faces))


def test_loaded_weights_can_take_gradients(models):
    flow, faces = models
    params = list(flow.components.unet.parameters()) + list(flow.components.vae.parameters())
    params += list(faces.models["faces"].recognizer.parameters()) + list(faces.models["faces"].recognizer.buffers())
    assert params and not any(p.is_inference() for p in params)
    assert not any(p.requires_grad for p in params)  # frozen: gradients only reach the latent
    assert faces.kind == "face" and "CPUExecutionProvider" in faces.description


def test_flow_type_names_users_know(models, monkeypatch):
    monkeypatch.setenv("RECTIFID_MODELS_DIR", str(ce.tiny_models_dir("diffusers")))
    loader = N["RectifIDFlowLoader"]()
    assert models[0].__class__.__name__ == "PeRFlow"  # auto-detected from the scheduler config
    (euler,) = comfy(loader.load, ce.MODEL_NAMES["diffusers"], "2-rectified flow", "auto", "fp32", "cpu")
    assert type(euler).__name__ == "EulerVelocityFlow" and euler.window_gammas() is None
    with pytest.raises(ValueError, match="unknown flow type 'rf2'"):
        comfy(loader.load, ce.MODEL_NAMES["diffusers"], "rf2", "auto", "fp32", "cpu")


def test_sampler_node_equals_the_pipeline_and_its_latent_decodes_to_its_images(models):
    flow, faces = models
    subject, bundle, _ = comfy(N["RectifIDSubject"]().build, faces, face_photo((10, 10, 1.0, 1.0)), "alice",
                               "largest", 0, 0.0)
    assert bundle.labels == ["alice"] and subject.kind == "face"
    args = dict(positive="a photo of a person", negative="", width=16, height=24, seed=11, steps=0, iterations=1,
                guidance_scale=1.0, cfg=1.0, ck_mode="per_window", solver="anchored", memory="store", batch_size=2)
    images, latent, plot, report = comfy(N["RectifIDSampler"]().sample, flow, bundle, **args)
    assert images.shape == (2, 24, 16, 3) and latent["samples"].shape == (2, 4, 12, 8)
    expected = personalize(flow, bundle.objective, PersonalizeSettings(
        prompt=args["positive"], width=16, height=24, seed=11, batch_size=2, cfg_scale=1.0, num_steps=None,
        guidance=GuidanceConfig(scale=1.0, iterations=1)), labels=["alice"])
    torch.testing.assert_close(images, expected.images.permute(0, 2, 3, 1))
    with torch.no_grad():  # ComfyUI's VAE Decode hands LATENT to the decoder as it is, unscaled
        decoded = flow.components.vae.decode(latent["samples"]).sample.div(2).add(0.5).clamp(0, 1)
    torch.testing.assert_close(decoded.permute(0, 2, 3, 1), images, atol=1e-5, rtol=0)
    scaling = flow.components.vae.config.scaling_factor
    torch.testing.assert_close(latent["samples"] * scaling, expected.latent)  # diffusers' latent is scaled
    assert plot.shape[0] == 1 and plot.shape[-1] == 3
    lines = report.splitlines()
    used = expected.settings
    assert lines[0] == (f"settings: 16 x 24 px, {used.num_steps} (auto) steps, 1 iteration, guidance scale 1, CFG 1, "
                        f"solver anchored, c_k per_window, memory store, seed 11, batch 2")
    final = expected.final_similarities["alice"]
    assert lines[1].startswith(f"alice: similarity {'not found in the output' if final is None else f'{final:.3f}'}")
    assert [line for line in lines if line.startswith("warning: ")] == [f"warning: {w}" for w in expected.warnings]
    assert bridge.last_progress["value"] == 1 and bridge.last_progress["total"] == 1
    assert bridge.last_progress["preview"].size == (16, 24)


def test_sampler_node_resolves_memory_partial_and_reports_the_steps_it_recomputes(models):
    """memory 'partial' on the CPU (no free-VRAM count) recomputes one step: the stored images, 'partial:1' reported."""
    flow, faces = models
    _, bundle, _ = comfy(N["RectifIDSubject"]().build, faces, face_photo((10, 10, 1.0, 1.0)), "alice", "largest", 0,
                         0.0)
    args = dict(positive="a photo of a person", negative="", width=16, height=24, seed=11, steps=0, iterations=2,
                guidance_scale=1.0, cfg=1.0, ck_mode="per_window", solver="anchored", batch_size=1)
    stored, *_ = comfy(N["RectifIDSampler"]().sample, flow, bundle, memory="store", **args)
    partial, _, _, report = comfy(N["RectifIDSampler"]().sample, flow, bundle, memory="partial", **args)
    torch.testing.assert_close(partial, stored, rtol=0, atol=1e-5)  # fp32: same math, recomputed
    assert ", memory partial:1 (partial), " in report.splitlines()[0]


def test_cancel_ends_a_slow_iteration_within_one_model_call(models, monkeypatch):
    """Cancel pressed (the bridge's fallback flag) while a model call runs: no further model call starts."""
    flow, _ = models
    calls = []
    step = flow.step

    def pressing_cancel(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second window of the first iteration
            bridge.request_interrupt()
        return step(*args, **kwargs)

    monkeypatch.setattr(flow, "step", pressing_cancel)
    bundle = common.ObjectiveBundle(lambda image: ObjectiveOutput(image.mean(dim=(1, 2, 3))), ["x"])
    args = dict(positive="a photo", negative="", width=16, height=16, seed=0, steps=0, iterations=50,
                guidance_scale=1.0, cfg=1.0, ck_mode="per_window", solver="anchored", memory="store", batch_size=1)
    with pytest.raises(bridge.ProcessingInterrupted):
        comfy(N["RectifIDSampler"]().sample, flow, bundle, **args)
    assert len(calls) == 2  # the iteration's remaining windows, decode and backward never ran
    bridge.check_interrupt()  # the flag was consumed, the next run is not cancelled


def test_unsteered_subject_is_a_warning_in_the_report_and_the_log(models, caplog):
    """A subject the objective never found is not a silent success: the report and ComfyUI's console say so."""
    flow, _ = models

    def never_found(image: torch.Tensor) -> ObjectiveOutput:
        return ObjectiveOutput(0.0 * image.mean(dim=(1, 2, 3)), {"missing": [[0]] * image.shape[0]})

    args = dict(positive="a photo", negative="", width=16, height=16, seed=0, steps=0, iterations=2,
                guidance_scale=0.0, cfg=0.0, ck_mode="per_window", solver="anchored", memory="store", batch_size=1)
    with caplog.at_level(logging.INFO, logger="RectifID"):
        *_, report = comfy(N["RectifIDSampler"]().sample, flow, common.ObjectiveBundle(never_found, ["bob"]), **args)
    warnings = [line for line in report.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2 and all("bob" in w for w in warnings)
    assert "2 of 2 iterations" in warnings[0] and "final image" in warnings[1]
    logged = [r.getMessage() for r in caplog.records if r.name == "RectifID" and r.levelno == logging.WARNING]
    assert logged == [f"RectifID: {w}" for w in warnings]


def test_detect_and_crop_policies(models):
    _, faces = models
    # big face on the left (col 5), small one on the right (col 12, nearer the centre col 10)
    photo = face_photo((5, 10, 1.0, 1.0), (12, 10, 1.0, 0.2))
    left, right = tiny_faces.expected_box(5, 10, 1.0), tiny_faces.expected_box(12, 10, 0.2)
    node = N["RectifIDDetectCrop"]()
    right_half = torch.zeros(1, 640, 640)
    right_half[:, :, 320:] = 1
    for selection, index, mask, want in (("insightface", 0, None, right), ("largest", 0, None, left),
                                         ("center", 0, None, right),
                                         ("index", 0, None, left), ("index", -1, None, right),
                                         ("mask", 0, right_half, right)):
        crops, boxes_json, box_mask, preview = comfy(node.detect, faces, photo, selection, index, "", 0.25, 64, mask)
        record = json.loads(boxes_json)[0]
        chosen = np.array(record["boxes"][record["chosen"]])
        np.testing.assert_allclose(chosen, want, atol=2.0, err_msg=selection)
        assert len(record["boxes"]) == 2 and crops.shape == (1, 64, 64, 3)
        w, h = want[2] - want[0], want[3] - want[1]
        assert abs(float(box_mask.sum()) - w * h) < 4 * (w + h)
    assert not torch.equal(preview, photo)  # boxes drawn
    with pytest.raises(ValueError, match="no face found in image 1 of 1"):
        comfy(node.detect, faces, as_comfy_image(torch.zeros(1, 3, 640, 640)), "largest", 0, "", 0.25, 64)
    with pytest.raises(ValueError, match="needs a mask"):
        comfy(node.detect, faces, photo, "mask", 0, "", 0.25, 64)


def _red_outline(preview: torch.Tensor, box) -> bool:
    """Whether the left edge of `box` is drawn in draw_boxes' red for the chosen detection."""
    x1, y1, _, y2 = (int(round(v)) for v in box)
    rgb = (preview[int((y1 + y2) / 2), max(x1, 0)] * 255).round().tolist()
    return rgb == [230.0, 30.0, 30.0]


def test_subject_node_previews_and_logs_the_reference_faces(models, caplog):
    """Contract C5: third output shows every reference detection, the used one in red; several faces are logged."""
    _, faces = models
    # large face off-centre (col 4) and a small one near the centre: insightface's ranking takes the small one
    two = face_photo((4, 10, 1.0, 1.0), (11, 10, 1.0, 0.1))
    small, large = tiny_faces.expected_box(11, 10, 0.1), tiny_faces.expected_box(4, 10, 1.0)
    other = as_comfy_image(tiny_faces.face_image((320, 300), ((5, 5, 1.0, 0.8),), cell=16))
    with caplog.at_level("INFO"):
        subject, bundle, preview = comfy(N["RectifIDSubject"]().build, faces, two, "alice", "insightface", 0, 0.0,
                                         more_images=other)
    assert N["RectifIDSubject"].RETURN_NAMES == ("subject", "objective", "reference_preview")
    assert preview.shape == (2, 640, 640, 3)  # the smaller photo is padded to the batch size
    assert _red_outline(preview[0], small) and not _red_outline(preview[0], large)
    torch.testing.assert_close(preview[1, 320:, 300:], torch.full((320, 340, 3), 0.5))
    assert any("reference image 1: 2 found, took number" in r.getMessage() for r in caplog.records)
    assert not any("reference image 2" in r.getMessage() for r in caplog.records)  # one face: nothing to say
    _, _, preview = comfy(N["RectifIDSubject"]().build, faces, two, "alice", "largest", 0, 0.0)
    assert _red_outline(preview[0], large) and not _red_outline(preview[0], small)


def test_reference_errors_are_clear(models):
    _, faces = models
    blank = as_comfy_image(torch.zeros(1, 3, 640, 640))
    with pytest.raises(ValueError, match="no face found in reference image"):
        comfy(N["RectifIDSubject"]().build, faces, blank, "bob", "largest", 0, 0.0)
    clip_subject = common.Subject(objective=object(), label="style", kind="clip")
    with pytest.raises(ValueError, match="CLIP model"):
        comfy(N["RectifIDMatchSubjects"]().match, clip_subject, 1.0)
    with pytest.raises(TypeError, match="RectifID subject or 'Match Subjects'"):
        comfy(N["RectifIDSampler"]().sample, models[0], "not an objective", "p", "", 16, 16, 0, 0, 1, 1.0, 1.0,
              "per_window", "anchored", "store", 1)


def test_messages_count_images_and_subjects_from_1(models):
    """Whichever node a user meets the problem in, the second photo is "image 2" and the second subject "subject 2"."""
    _, faces = models
    with torch.inference_mode(False):
        photos = torch.cat([tiny_faces.face_image((640, 640), ((10, 10, 1.0, 1.0),)), torch.zeros(1, 3, 640, 640)])
    batch = as_comfy_image(photos)
    with pytest.raises(ValueError, match=r"no face found in reference image 2\b"):
        comfy(N["RectifIDSubject"]().build, faces, batch, "bob", "insightface", 0, 0.0)
    with pytest.raises(ValueError, match=r"no face found in image 2 of 2\b"):
        comfy(N["RectifIDDetectCrop"]().detect, faces, batch, "insightface", 0, "", 0.25, 64)
    a, _, _ = comfy(N["RectifIDSubject"]().build, faces, batch[:1], "alice", "insightface", 0, 0.0)
    with pytest.raises(TypeError, match=r"subject 2 must come from a 'Reference Subject' node"):
        comfy(N["RectifIDMatchSubjects"]().match, a, 1.0, subject_2="not a subject", weight_2=1.0)


def test_match_subjects_weights_and_labels(models):
    _, faces = models
    a, _, _ = comfy(N["RectifIDSubject"]().build, faces, face_photo((10, 10, 1.0, 1.0)), "person", "largest", 0, 0.0)
    b, _, _ = comfy(N["RectifIDSubject"]().build, faces, face_photo((10, 10, 1.0, 0.3)), "person", "largest", 0, 0.0)
    (bundle,) = comfy(N["RectifIDMatchSubjects"]().match, a, 1.0, subject_2=b, weight_2=0.5, weight_3=1.0,
                      weight_4=1.0)
    assert bundle.objective.weights == [1.0, 0.5] and bundle.labels == ["person", "person"]
    assert [s.objective for s in (a, b)] == bundle.objective.subjects
    # two faces side by side: each reference is assigned to one of them
    with torch.inference_mode(False):
        image = tiny_faces.face_image((640, 640), ((6, 10, 1.0, 1.0), (14, 10, 1.0, 0.3)))
        out = bundle.objective(image)
    (assignment,) = out.diagnostics["assignment"]
    assert sorted(assignment) == [0, 1] and assignment[0] != assignment[1]


def test_face_loader_runs_scrfd_in_torch_when_asked_and_the_sampler_gives_the_same_images(models, monkeypatch):
    required = N["RectifIDFaceModelLoader"].INPUT_TYPES()["required"]
    assert list(required)[-1] == "detector" and list(required["detector"][0]) == ["auto", "torch", "onnxruntime"]
    flow, faces = models
    monkeypatch.setenv("RECTIFID_MODELS_DIR", str(ce.tiny_models_dir("diffusers", "insightface")))
    (in_torch,) = comfy(N["RectifIDFaceModelLoader"]().load, "antelopev2", "cpu", "cpu", "torch")
    assert faces.models["faces"].detector.backend == "onnxruntime"  # auto on the CPU
    assert in_torch.models["faces"].detector.backend == "torch" and "SCRFD in torch on cpu" in in_torch.description
    args = dict(positive="a photo of a person", negative="", width=16, height=24, seed=3, steps=0, iterations=2,
                guidance_scale=1.0, cfg=1.0, ck_mode="per_window", solver="anchored", memory="store", batch_size=1)
    images = []
    for loaded in (faces, in_torch):
        _, bundle, _ = comfy(N["RectifIDSubject"]().build, loaded, face_photo((10, 10, 1.0, 1.0)), "alice",
                             "largest", 0, 0.0)
        images.append(comfy(N["RectifIDSampler"]().sample, flow, bundle, **args)[0])
    torch.testing.assert_close(images[1], images[0], rtol=1e-5, atol=1e-6)


def test_flow_loader_and_sampler_nodes_run_a_flux_folder_as_the_pipeline_does(models, tmp_path, monkeypatch):
    """The node route takes FLUX.1 folders too: the loader detects it, the sampler equals personalize()."""
    import tiny_transformer_flows

    _, faces = models
    tiny_transformer_flows.build_tiny_flux(tmp_path / "diffusers" / "flux-tiny")
    monkeypatch.setenv("RECTIFID_MODELS_DIR", str(tmp_path))
    (flow,) = comfy(N["RectifIDFlowLoader"]().load, "flux-tiny", "auto", "auto", "auto", "cpu")
    assert type(flow).__name__ == "FluxFlow"
    _, bundle, _ = comfy(N["RectifIDSubject"]().build, faces, face_photo((10, 10, 1.0, 1.0)), "alice", "largest", 0,
                         0.0)
    args = dict(positive="a photo of a person", negative="", width=32, height=32, seed=5, steps=0, iterations=1,
                guidance_scale=1.0, cfg=0.0, ck_mode="per_window", solver="anchored", memory="store", batch_size=1)
    images, latent, _, report = comfy(N["RectifIDSampler"]().sample, flow, bundle, **args)
    expected = personalize(flow, bundle.objective, PersonalizeSettings(
        prompt=args["positive"], width=32, height=32, seed=5, batch_size=1, cfg_scale=None, num_steps=None,
        guidance=GuidanceConfig(scale=1.0, iterations=1)), labels=["alice"])
    torch.testing.assert_close(images, expected.images.permute(0, 2, 3, 1))
    torch.testing.assert_close(latent["samples"], flow.vae_latent(expected.latent))
    assert report.splitlines()[0].startswith("settings: 32 x 32 px, 4 (auto) steps, 1 iteration")
