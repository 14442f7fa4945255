"""Folder inspection, auto-detection, overrides and error messages of load_flow."""
import json
import shutil

import pytest
import torch

import tiny_diffusers
from rectifid_core.flows import FLOW_TYPES, PREDICTION_TYPES, inspect_flow_folder, load_flow


def copy_folder(kind, dest, scheduler=None, index=None):
    """A private copy of a cached tiny folder with patched scheduler / model_index entries."""
    shutil.copytree(tiny_diffusers.cached_folder(kind), dest)
    for name, patch in (("scheduler/scheduler_config.json", scheduler), ("model_index.json", index)):
        if patch:
            path = dest / name
            data = json.loads(path.read_text())
            data.update(patch)
            path.write_text(json.dumps({k: v for k, v in data.items() if v is not None}))
    return dest


def test_constants_list_auto_first():
    assert FLOW_TYPES == ("auto", "perflow", "euler_velocity", "flux", "sd3")
    assert PREDICTION_TYPES == ("auto", "diff_eps", "ddim_eps", "velocity")


@pytest.mark.parametrize("kind, name, scheduler, index, expected", [
    # public SD1.5 PeRFlow folders carry SD's "epsilon": sample them as diff_eps
    ("sd15", "m", {"prediction_type": "epsilon"}, None, ("perflow", "diff_eps", "sd")),
    ("sdxl", "m", {"prediction_type": "epsilon"}, None, ("perflow", "ddim_eps", "sdxl")),
    ("sdxl", "m", {"prediction_type": None}, None, ("perflow", "ddim_eps", "sdxl")),
    # an SD scheduler class, recognised by the folder name; SD2.1's v-prediction -> velocity
    ("sd15", "perflow-sd21-artius", {"_class_name": "DDIMScheduler", "prediction_type": "v_prediction"}, None,
     ("perflow", "velocity", "sd")),
    ("sd15", "m", {"_class_name": "PNDMScheduler", "prediction_type": "epsilon"},
     {"_class_name": "RectifiedFlowPipeline"}, ("euler_velocity", None, "sd")),
    ("sd15", "instaflow_0_9B", {"_class_name": "PNDMScheduler"}, None, ("euler_velocity", None, "sd")),
])
def test_auto_detection(tmp_path, kind, name, scheduler, index, expected):
    info = inspect_flow_folder(copy_folder(kind, tmp_path / name, scheduler, index))
    assert (info.flow_type, info.prediction_type, info.architecture) == expected
    assert info.reasons and name in info.describe()


def test_undetectable_folder_asks_for_a_flow_type_and_overrides_apply(tmp_path):
    folder = copy_folder("sd15", tmp_path / "dreamshaper", {"_class_name": "PNDMScheduler",
                                                            "prediction_type": "epsilon", "num_time_windows": None})
    with pytest.raises(ValueError, match="choose the flow type explicitly"):
        inspect_flow_folder(folder)
    info = inspect_flow_folder(folder, flow_type="perflow", prediction_type="ddim_eps")
    assert (info.flow_type, info.prediction_type, info.num_windows) == ("perflow", "ddim_eps", 4)
    assert any("chosen by the user" in r for r in info.reasons)
    with pytest.raises(ValueError, match="only applies to PeRFlow"):
        inspect_flow_folder(folder, flow_type="euler_velocity", prediction_type="diff_eps")
    with pytest.raises(ValueError, match="unknown flow_type 'dalle'"):
        inspect_flow_folder(folder, flow_type="dalle")
    with pytest.raises(ValueError, match="holds a UNet .*not the FluxTransformer2DModel of a flux folder"):
        inspect_flow_folder(folder, flow_type="flux")


def test_num_time_windows_comes_from_the_scheduler_config(tmp_path):
    folder = copy_folder("sd15", tmp_path / "m", {"num_time_windows": 2})
    flow = load_flow(folder, device="cpu", steps=3)
    assert flow.num_windows == 2 and flow.timesteps() == [[1000, 750], [500]]
    assert flow.window_gammas() == pytest.approx([0.2869 * 0.4516, 0.6412 * 0.8222], abs=2e-3)


def test_missing_parts_are_named_with_their_paths(tmp_path):
    folder = copy_folder("sdxl", tmp_path / "m")
    shutil.rmtree(folder / "vae")
    shutil.rmtree(folder / "tokenizer_2")
    for name in ("vocab.json", "tokenizer.json"):
        (folder / "tokenizer" / name).unlink()
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError) as err:
        load_flow(folder, device="cpu")
    message = str(err.value)
    assert str(folder / "vae" / "config.json") in message and "AutoencoderKL" in message
    assert str(folder / "tokenizer_2") in message
    assert f"{folder / 'tokenizer'} has neither tokenizer.json nor vocab.json" in message
    assert f"{folder / 'unet'} has no weights" in message
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_flow(tmp_path / "nowhere")


def test_variant_only_weights_load(tmp_path):
    """PeRFlow SDXL ships `*.v0-fix.safetensors` only; the variant is found from the file names."""
    folder = copy_folder("sd15", tmp_path / "m")
    for part, stem in (("unet", "diffusion_pytorch_model"), ("text_encoder", "model")):
        (folder / part / f"{stem}.safetensors").rename(folder / part / f"{stem}.v0-fix.safetensors")
    flow = load_flow(folder, device="cpu")
    reference = load_flow(tiny_diffusers.cached_folder("sd15"), device="cpu")
    for a, b in zip(flow.components.unet.parameters(), reference.components.unet.parameters()):
        assert torch.equal(a, b)


def test_dtype_device_and_step_arguments():
    folder = tiny_diffusers.cached_folder("sd15")
    with pytest.warns(UserWarning, match="fp16"):
        flow = load_flow(folder, dtype="fp16", device="cpu")
    assert flow.dtype == torch.float32
    if not torch.cuda.is_available():
        assert load_flow(folder).device == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown dtype 'fp64'"):
        load_flow(folder, dtype="fp64")
    with pytest.raises(ValueError, match=r"steps \(3\) must be >= num_windows \(4\)"):
        load_flow(folder, steps=3, device="cpu")
    with pytest.raises(ValueError, match="one window per step"):
        load_flow(tiny_diffusers.cached_folder("2rflow"), num_windows=2, steps=4, device="cpu")
    flow = load_flow(folder, dtype=torch.bfloat16, device="cpu", num_windows=2, steps=4)
    assert flow.dtype == torch.bfloat16 and flow.timesteps() == [[1000, 750], [500, 250]]
