"""Loading FluxPipeline / StableDiffusion3Pipeline folders: detection, part checks, dtype, and the CLI end to end."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import comfy_executor as ce
import tiny_faces
from rectifid_core.cli import main
from rectifid_core.flows import FLOW_TYPES, FluxFlow, SD3Flow, inspect_flow_folder, load_flow
from rectifid_core.flows.loading import image_size_multiple
from rectifid_core.guidance import GuidanceConfig
from rectifid_core.images import load_image
from rectifid_core.pipeline import PersonalizeSettings, load_face_discriminator, personalize, subject_objective
from tiny_diffusers import cached_folder as cached_sd_folder
from tiny_transformer_flows import cached_folder


def _copy(kind: str, tmp_path):
    return shutil.copytree(cached_folder(kind), tmp_path / kind)


@pytest.mark.parametrize("kind, cls", [("flux", FluxFlow), ("sd3", SD3Flow)])
def test_detection_and_dtype(kind, cls) -> None:
    assert kind in FLOW_TYPES
    info = inspect_flow_folder(cached_folder(kind))
    assert (info.flow_type, info.architecture, info.num_windows, info.prediction_type) == (kind, kind, 4, None)
    assert "model_index.json names" in info.describe()
    flow = load_flow(cached_folder(kind), dtype="bf16", device="cpu", steps=2)
    assert isinstance(flow, cls) and flow.num_steps == 2
    assert flow.components.transformer.dtype == torch.bfloat16 and flow.components.vae.dtype == torch.bfloat16
    for encoder in flow.components.text_encoders():  # kept on the CPU between encodings
        assert encoder.dtype == torch.bfloat16 and encoder.device.type == "cpu"
    assert image_size_multiple(cached_folder(kind)) == 4  # tiny VAE factor 2 x 2x2 patches
    assert image_size_multiple(cached_sd_folder("sd15")) == 2


@pytest.mark.parametrize("kind, remove, message", [
    ("flux", "text_encoder_2", "text_encoder_2/config.json (the T5 encoder"),
    ("flux", "tokenizer_2/tokenizer.json", "tokenizer_2 has none of tokenizer.json, vocab.json, spiece.model"),
    ("flux", "transformer/diffusion_pytorch_model.safetensors",
     "transformer has no weights (the FluxTransformer2DModel"),
    ("sd3", "text_encoder_3", "text_encoder_3/config.json (the T5 encoder"),
    ("sd3", "scheduler", "scheduler/scheduler_config.json (the FlowMatchEulerDiscreteScheduler config"),
    ("sd3", "model_index.json", "model_index.json (the pipeline index"),
])
def test_a_missing_part_is_named(tmp_path, kind, remove, message) -> None:
    root = _copy(kind, tmp_path)
    target = root / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(FileNotFoundError, match="missing") as err:
        load_flow(root, device="cpu")
    assert message in str(err.value) and str(root) in str(err.value)


def test_wrong_flow_type_and_scheduler_are_refused(tmp_path) -> None:
    root = _copy("flux", tmp_path)
    with pytest.raises(ValueError, match="names FluxPipeline.*set the flow type to auto or flux"):
        inspect_flow_folder(root, flow_type="perflow")
    config_path = root / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "stochastic_sampling": True}))
    with pytest.raises(ValueError, match="scheduler_config.json: .*stochastic_sampling"):
        inspect_flow_folder(root)
    config_path.write_text(json.dumps({**config, "_class_name": "EulerDiscreteScheduler"}))
    with pytest.raises(ValueError, match="names EulerDiscreteScheduler"):
        inspect_flow_folder(root)


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    root = ce.tiny_models_dir("insightface")
    folder = tmp_path_factory.mktemp("fm_cli")
    face = tiny_faces.face_image((640, 640), ((10, 10, 1.0, 1.0),))[0]
    Image.fromarray((face.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(folder / "alice.png")
    return root / "insightface", folder / "alice.png"


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_cli_runs_the_flow_end_to_end(faces, tmp_path, capsys, kind) -> None:
    insightface, reference = faces
    out = tmp_path / "alice.png"
    status = main(["--flow", str(cached_folder(kind)), "--faces", str(insightface), "--device", "cpu",
                   "--subject", f"face:alice={reference}", "--prompt", "a photo of a person", "--seed", "3",
                   "--width", "32", "--height", "32", "--iterations", "1", "--output", str(out)])
    assert status == 0, capsys.readouterr().err
    run = json.loads((tmp_path / "alice.json").read_text())["runs"][0]
    used = run["settings"]  # steps and cfg auto: the flow's own defaults (4 Euler steps, no CFG)
    assert (used["num_steps"], used["cfg_scale"], used["guidance"]["scale"]) == (4, 1.0, 1.0)

    flow = load_flow(cached_folder(kind), dtype="fp32", device="cpu")
    objective = subject_objective(load_face_discriminator(insightface, provider="cpu"), [load_image(reference)],
                                  label="alice")
    expected = personalize(flow, objective, PersonalizeSettings(
        prompt="a photo of a person", width=32, height=32, seed=3, guidance=GuidanceConfig(iterations=1)),
        labels=["alice"])
    written = np.asarray(Image.open(out), dtype=np.float32) / 255
    want = (expected.images[0].permute(1, 2, 0).numpy() * 255).round() / 255
    np.testing.assert_allclose(written, want, atol=1.5 / 255)
    assert run["losses"] == pytest.approx(expected.losses, rel=1e-5)


def test_cli_refuses_a_size_the_transformer_cannot_patch(faces, tmp_path, capsys) -> None:
    insightface, reference = faces
    status = main(["--flow", str(cached_folder("flux")), "--faces", str(insightface), "--device", "cpu",
                   "--subject", f"face={reference}", "--prompt", "a photo", "--width", "30",
                   "--output", str(tmp_path / "x.png")])
    assert status == 2
    assert "--width 30 is not a positive multiple of 4" in capsys.readouterr().err
