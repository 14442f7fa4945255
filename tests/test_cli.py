"""`python -m rectifid_core`: the same pipeline as the nodes, files out, clear errors for bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import comfy_executor as ce
import tiny_faces
from rectifid_core.cli import main, output_paths, parse_subject
from rectifid_core.flows import load_flow
from rectifid_core.guidance import GuidanceConfig
from rectifid_core.images import load_image
from rectifid_core.pipeline import PersonalizeSettings, load_face_discriminator, personalize, subject_objective


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = ce.tiny_models_dir("diffusers", "insightface")
    folder = tmp_path_factory.mktemp("cli")
    face = tiny_faces.face_image((640, 640), ((10, 10, 1.0, 1.0),))[0]
    Image.fromarray((face.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(folder / "alice.png")
    return root, folder


def test_cli_writes_images_and_history_equal_to_the_pipeline(setup, capsys):
    root, folder = setup
    flow_dir = root / "diffusers" / ce.MODEL_NAMES["diffusers"]
    out = folder / "out" / "alice.png"
    status = main(["--flow", str(flow_dir), "--faces", str(root / "insightface"), "--device", "cpu",
                   "--subject", f"face:alice={folder / 'alice.png'}", "--prompt", "a photo of a person",
                   "--seed", "9", "--width", "16", "--height", "24", "--iterations", "1", "--cfg", "1.0",
                   "--output", str(out)])
    assert status == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "iteration 1/1" in err and "alice" in err
    history = json.loads((folder / "out" / "alice.json").read_text())
    assert [r["prompt"] for r in history["runs"]] == ["a photo of a person"]
    assert history["settings"]["scale"] is None and history["settings"]["steps"] is None  # auto, as given
    first = history["runs"][0]
    used = first["settings"]  # what auto resolved to: the face default s and the flow's own K=4 steps
    assert (used["guidance"]["scale"], used["num_steps"], used["width"], used["cfg_scale"]) == (1.0, 4, 16, 1.0)
    assert len(first["losses"]) == 1 and list(first["similarities"]) == ["alice"]
    assert first["images"] == [str(out)]

    flow = load_flow(flow_dir, dtype="fp32", device="cpu")
    faces = load_face_discriminator(root / "insightface", provider="cpu")
    objective = subject_objective(faces, [load_image(folder / "alice.png")], label="alice")
    expected = personalize(flow, objective, PersonalizeSettings(
        prompt="a photo of a person", width=16, height=24, seed=9, cfg_scale=1.0,
        guidance=GuidanceConfig(scale=1.0, iterations=1, memory="auto")), labels=["alice"])
    written = np.asarray(Image.open(first["images"][0]), dtype=np.float32) / 255
    want = (expected.images[0].permute(1, 2, 0).numpy() * 255).round() / 255
    np.testing.assert_allclose(written, want, atol=1.5 / 255)
    assert first["losses"] == pytest.approx(expected.losses, rel=1e-5)
    assert Image.open(out).size == (16, 24)


@pytest.mark.parametrize("extra, message", [
    (["--subject", "face"], "expected KIND[:LABEL]=IMAGE"),
    (["--subject", "dragon=a.png"], "unknown kind 'dragon'"),
    (["--subject", "face=missing.png"], "reference image not found"),
    (["--subject", "object=REF"], "needs a label"),
    (["--subject", "object:dog=REF"], "an object subject needs --dinov2"),
    (["--subject", "face=REF", "--weight", "1"], "--weight is per subject"),
    (["--subject", "face=REF", "--faces", "nowhere"], "--faces nowhere: folder not found"),
])
def test_bad_input_gives_a_clear_error(setup, tmp_path, capsys, extra, message):
    _, folder = setup
    extra = [e.replace("REF", str(folder / "alice.png")) for e in extra]
    status = main(["--flow", str(tmp_path), "--prompt", "a photo"] + extra)
    err = capsys.readouterr().err
    assert status == 2 and f"error: " in err and message in err, err


def test_missing_flow_folder(setup, tmp_path, capsys):
    _, folder = setup
    status = main(["--flow", str(tmp_path / "nope"), "--prompt", "x", "--subject", f"face={folder / 'alice.png'}"])
    assert status == 2 and "--flow" in capsys.readouterr().err


def test_subject_parsing_and_output_names(tmp_path):
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(b"")
    spec = parse_subject(f"object:dog={tmp_path / 'a.png'},{tmp_path / 'b.png'}")
    assert (spec.kind, spec.label, [p.name for p in spec.images]) == ("object", "dog", ["a.png", "b.png"])
    assert parse_subject(f"face={tmp_path / 'a.png'}").label == "person"
    paths = output_paths(tmp_path / "x.png", 2, 2)
    assert [[p.name for p in row] for row in paths] == [["x_00_00.png", "x_00_01.png"], ["x_01_00.png", "x_01_01.png"]]
    assert output_paths(tmp_path / "x.png", 1, 1) == [[tmp_path / "x.png"]]


def test_module_entry_point_prints_help():
    proc = subprocess.run([sys.executable, "-m", "rectifid_core", "--help"], capture_output=True, text=True,
                          cwd=str(ce.REPO), timeout=120)
    assert proc.returncode == 0 and "--subject" in proc.stdout and "KIND[:LABEL]=IMAGE" in proc.stdout


def _face_run(setup, tmp_path, *extra: str) -> list[str]:
    """Arguments of a one-face run on the tiny models, plus `extra`."""
    root, folder = setup
    return ["--flow", str(root / "diffusers" / ce.MODEL_NAMES["diffusers"]), "--faces", str(root / "insightface"),
            "--device", "cpu", "--subject", f"face={folder / 'alice.png'}", "--prompt", "a photo",
            "--output", str(tmp_path / "x.png"), *extra]


@pytest.mark.parametrize("extra, message", [
    (["--batch-size", "0"], "batch size must be an integer >= 1"),
    (["--iterations", "-1"], "iterations N must be an integer >= 0"),
    (["--steps", "0"], "steps must be an integer >= 1"),
    (["--cfg", "0.5"], "CFG scale must be a finite number >= 1"),
    (["--scale", "nan"], "guidance scale s must be a finite number >= 0"),
])
def test_bad_numbers_are_refused_before_any_model_loads(setup, tmp_path, monkeypatch, capsys, extra, message):
    import rectifid_core.cli as cli

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the settings were checked")

    monkeypatch.setattr(cli, "load_face_discriminator", no_loading)
    status = main(_face_run(setup, tmp_path, *extra))
    err = capsys.readouterr().err
    assert status == 2 and message in err, err


def test_a_missing_package_is_a_one_line_error(setup, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    status = main(_face_run(setup, tmp_path, "--detector", "onnxruntime"))
    err = capsys.readouterr().err
    assert status == 2 and "rectifid: error: loading the face models" in err and "onnxruntime" in err, err
    assert "Traceback" not in err and "needs the Python package 'the" not in err
