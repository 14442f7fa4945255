"""A battery of bad inputs, each built for real: every one must end in a message that says what
happened and where (the file, the image, the flag), never in a raw library error or a silent result."""
from __future__ import annotations

import json
import os
import shutil
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import comfyui_runtime as cr
import tiny_diffusers
import tiny_faces
import tiny_transformers
from nodes import comfy_bridge as bridge
from nodes.common import image_to_core, mask_to_core
from rectifid_core.cli import check_image_size, main, memory_refusal
from rectifid_core.devices import parse_device
from rectifid_core.flows import inspect_flow_folder, load_flow
from rectifid_core.guidance import estimate_guidance_bytes
from rectifid_core.images import PIXEL_TOLERANCE, load_image
from rectifid_core.model_files import DamagedModelFile, check_onnx_file, check_safetensors, check_weight_files
from rectifid_core.objectives import find_antelopev2, load_clip_vision, load_dinov2, load_face_models, onnx_to_torch


# -- images -----------------------------------------------------------------------------------------

def comfy_image(values: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] -> ComfyUI IMAGE [B,H,W,3]."""
    return values.movedim(1, -1).contiguous()


def test_nan_pixels_are_named_with_the_image_counted_from_1():
    batch = torch.rand(3, 3, 8, 8)
    batch[1, 0, 2, 2] = float("nan")
    batch[1, 1, 3, 3] = float("inf")
    with pytest.raises(ValueError, match=r"reference image 2 of 3 has 2 NaN or infinite pixel values"):
        image_to_core(comfy_image(batch), "reference image")


@pytest.mark.parametrize("scale, offset, hint", [(255.0, 0.0, "divide it by 255"),
                                                 (2.0, -1.0, r"map it with \(x \+ 1\) / 2"),
                                                 (1000.0, 0.0, "rescale it to 0..1")])
def test_pixels_in_another_range_are_refused_with_the_fix(scale, offset, hint):
    batch = torch.rand(2, 3, 8, 8) * scale + offset
    batch[0] = torch.rand(3, 8, 8)  # the first image is fine: the message must point at the second
    with pytest.raises(ValueError, match=rf"image 2 of 2 has pixel values from .* must lie in 0..1; .*{hint}"):
        image_to_core(comfy_image(batch))


def test_rounding_overshoot_is_clamped_not_refused():
    batch = torch.rand(1, 3, 4, 4, dtype=torch.float64)
    batch[0, 0, 0, 0] = 1.0 + PIXEL_TOLERANCE / 2
    batch[0, 1, 0, 0] = -PIXEL_TOLERANCE / 2
    out = image_to_core(comfy_image(batch.float())).double()
    assert out[0, 0, 0, 0] == 1.0 and out[0, 1, 0, 0] == 0.0
    inner = (batch > 0) & (batch < 1)
    torch.testing.assert_close(out[inner], batch.float().double()[inner])


def test_empty_image_batches_and_masks():
    with pytest.raises(ValueError, match="empty batch"):
        image_to_core(torch.zeros(0, 8, 8, 3))
    with pytest.raises(ValueError, match="zero size"):
        image_to_core(torch.zeros(1, 0, 8, 3))
    with pytest.raises(ValueError, match="region input is empty"):
        mask_to_core(torch.zeros(1, 0, 0), "region")
    masks = torch.zeros(2, 8, 8)
    masks[0, 2:4, 2:4] = 1
    with pytest.raises(ValueError, match="region 2 of 2 is all zero.*LoadImage"):
        mask_to_core(masks, "region")
    masks[1, 0, 0] = 0.5
    assert torch.equal(mask_to_core(masks), masks)


def test_the_reference_node_names_a_0_255_image_instead_of_finding_no_face(tmp_path):
    from nodes.subjects import RectifIDSubject
    from rectifid_core.pipeline import load_face_discriminator

    faces = load_face_discriminator(tiny_faces.build_antelopev2(tmp_path).parent.parent, provider="cpu")
    photo = tiny_faces.face_image((64, 64), ((2, 2, 1.0, 1.0),))[:1]
    with pytest.raises(ValueError, match="reference image 1 of 1 has pixel values from .*divide it by 255"):
        RectifIDSubject().build(faces, comfy_image(photo * 255), "alice", "largest", 0, 0.0)
    with pytest.raises(ValueError, match="region 1 of 1 is all zero"):
        RectifIDSubject().build(faces, comfy_image(photo), "alice", "largest", 0, 0.0, region=torch.zeros(1, 64, 64))


def test_detect_crop_checks_the_mask_only_where_it_is_used(tmp_path):
    from nodes.subjects import RectifIDDetectCrop
    from rectifid_core.pipeline import load_face_discriminator

    faces = load_face_discriminator(tiny_faces.build_antelopev2(tmp_path).parent.parent, provider="cpu")
    photo = comfy_image(tiny_faces.face_image())
    blank = torch.zeros(1, 640, 640)  # LoadImage's mask of a photo without transparency
    crops = RectifIDDetectCrop().detect(faces, photo, "largest", 0, "", 0.25, 64, mask=blank)[0]
    assert crops.shape == (1, 64, 64, 3)
    with pytest.raises(ValueError, match="mask 1 of 1 is all zero"):
        RectifIDDetectCrop().detect(faces, photo, "mask", 0, "", 0.25, 64, mask=blank)


def test_phone_jpeg_is_loaded_upright(tmp_path, comfyui):
    # 40 wide, 20 high: left half red, right half blue; EXIF orientation 6 = "rotate 90 degrees clockwise to view"
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20, 0] = 255
    pixels[:, 20:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    upright = np.rot90(pixels, k=-1)  # clockwise quarter turn, computed without PIL: the left half goes on top
    assert upright.shape == (40, 20, 3)
    # ComfyUI's own LoadImage, run by its engine in a one-node workflow (shown by PreviewImage)
    shown = cr.ui_workflow({1: ("LoadImage", ["phone.jpg", "image"]), 2: ("PreviewImage", [])},
                           [(1, 0, 2, "images", "IMAGE")])
    comfy_loaded = comfyui.run_workflow(shown, input_dir=tmp_path).outputs["1"][0]
    for loaded in (load_image(tmp_path / "phone.jpg")[0].permute(1, 2, 0).numpy() * 255,
                   comfy_loaded[0].numpy() * 255):
        assert loaded.shape == upright.shape
        assert np.abs(loaded - upright).mean() < 4  # JPEG noise only; a sideways image differs by ~128


def test_nan_in_a_float_image_file_is_named(tmp_path):
    gray = np.full((8, 8), 0.5, dtype=np.float32)
    gray[3, 4] = np.nan
    Image.fromarray(gray, mode="F").save(tmp_path / "scan.tif")
    with pytest.raises(ValueError, match=r"scan.tif: the 32-bit float image has 1 NaN or infinite pixels"):
        load_image(tmp_path / "scan.tif")


def test_a_file_that_is_not_an_image_is_named(tmp_path):
    (tmp_path / "notes.png").write_text("not a picture")
    with pytest.raises(ValueError, match=r"notes.png is not an image file"):
        load_image(tmp_path / "notes.png")
    Image.new("RGB", (64, 64), "red").save(tmp_path / "cut.png")
    data = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut.png is a damaged image file"):
        load_image(tmp_path / "cut.png")


# -- safetensors, JSON and diffusers folders ---------------------------------------------------------

@pytest.fixture
def weights(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"a": torch.randn(64, 64), "b": torch.randn(16)}, str(path))
    return path


@pytest.mark.parametrize("damage, message", [
    (lambda b: b"", "is empty"),
    (lambda b: b[:-100], "is truncated: tensor 'a'"),
    (lambda b: b[:30], "not a complete safetensors file"),
    (lambda b: bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8)), "not a complete safetensors"),
    (lambda b: b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\n", "not a complete safetensors"),
])
def test_damaged_safetensors_are_named(weights, damage, message):
    check_safetensors(weights)  # the intact file passes
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(DamagedModelFile, match=message) as err:
        check_safetensors(weights)
    assert str(weights) in str(err.value) and "download the file again" in str(err.value)


def test_cut_torch_checkpoints_are_named(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.randn(256)}, path)
    check_weight_files(tmp_path, [path.name])  # the intact file passes
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(DamagedModelFile, match=rf"{path} is not a complete torch checkpoint"):
        check_weight_files(tmp_path, [path.name])


@pytest.fixture
def flow_copy(tmp_path):
    return shutil.copytree(tiny_diffusers.cached_folder("sd15"), tmp_path / "perflow-copy")


def _weights_of(folder):
    return next(p for p in folder.iterdir() if p.suffix == ".safetensors")


def test_truncated_unet_weights_are_named_by_load_flow(flow_copy):
    unet = _weights_of(flow_copy / "unet")
    unet.write_bytes(unet.read_bytes()[:-1000])
    with pytest.raises(ValueError, match="is truncated") as err:
        load_flow(flow_copy, dtype="fp32", device="cpu")
    assert str(unet) in str(err.value)


def test_invalid_config_json_is_named(flow_copy):
    (flow_copy / "unet" / "config.json").write_text('{"in_channels": 4,')
    with pytest.raises(ValueError, match=r"unet/config.json .*is not valid JSON"):
        inspect_flow_folder(flow_copy)


def test_shard_index_outside_the_folder_or_missing_shard(flow_copy, tmp_path):
    unet = _weights_of(flow_copy / "unet")
    index = unet.with_name(unet.name + ".index.json")
    shutil.copy(unet, tmp_path / "elsewhere.safetensors")
    unet.unlink()
    index.write_text(json.dumps({"weight_map": {"conv_in.weight": "../../elsewhere.safetensors"}}))
    with pytest.raises(ValueError, match=r"names the shard '../../elsewhere.safetensors', which lies outside"):
        load_flow(flow_copy, dtype="fp32", device="cpu")
    index.write_text(json.dumps({"weight_map": {"conv_in.weight": "part-00001.safetensors"}}))
    with pytest.raises(FileNotFoundError, match=r"names the shard 'part-00001.safetensors', not found in"):
        load_flow(flow_copy, dtype="fp32", device="cpu")


def test_unsupported_sd_pipelines_are_refused_before_loading(flow_copy):
    index = json.loads((flow_copy / "model_index.json").read_text())
    (flow_copy / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionInpaintPipeline"}))
    with pytest.raises(ValueError, match="names StableDiffusionInpaintPipeline, a pipeline this loader does not"):
        inspect_flow_folder(flow_copy)
    (flow_copy / "model_index.json").write_text(json.dumps(index))
    unet = json.loads((flow_copy / "unet" / "config.json").read_text())
    (flow_copy / "unet" / "config.json").write_text(json.dumps({**unet, "in_channels": 9}))
    with pytest.raises(ValueError, match="takes 9 input channels but the VAE makes 4-channel latents"):
        inspect_flow_folder(flow_copy, flow_type="perflow")


# -- transformers folders of the wrong type -----------------------------------------------------------

def test_a_clip_folder_in_the_dinov2_slot_is_refused(tmp_path):
    clip = tiny_transformers.build_clip_vision(tmp_path / "clip")
    with pytest.raises(ValueError, match=r"holds a 'clip_vision_model' model .*not DINOv2") as err:
        load_dinov2(clip)
    assert str(clip) in str(err.value)
    dino = tiny_transformers.build_dinov2(tmp_path / "dino")
    with pytest.raises(ValueError, match=r"holds a 'dinov2' model .*not CLIP vision"):
        load_clip_vision(dino)
    weights = dino / "model.safetensors"
    weights.write_bytes(b"")
    (dino / "config.json").write_text(json.dumps({**json.loads((clip / "config.json").read_text()),
                                                  "model_type": "dinov2"}))
    with pytest.raises(DamagedModelFile, match="is empty"):
        load_dinov2(dino)


# -- ONNX and the face models ------------------------------------------------------------------------

@pytest.fixture
def pack(tmp_path):
    return tiny_faces.build_antelopev2(tmp_path / "insightface")


@pytest.mark.parametrize("name", ["scrfd_10g_bnkps.onnx", "glintr100.onnx"])
@pytest.mark.parametrize("damage", [lambda b: b"", lambda b: b[:2], lambda b: b[: len(b) // 2]],
                         ids=["empty", "2 bytes", "half"])
def test_damaged_onnx_files_are_blamed_not_the_gpu(pack, name, damage):
    path = pack / name
    path.write_bytes(damage(path.read_bytes()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(DamagedModelFile) as err:
            load_face_models(pack.parent.parent, provider="cuda")
    assert str(path) in str(err.value) and "CUDA" not in str(err.value)
    assert not any("CUDA" in str(w.message) for w in caught)  # the file is checked before any provider starts


def _external_data_model(folder, location):
    import onnx
    from onnx import TensorProto, helper

    weight = helper.make_tensor("w", TensorProto.FLOAT, [2], [1.0, 2.0])
    weight.ClearField("float_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "8")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], [weight])
    path = folder / "model.onnx"
    onnx.save(helper.make_model(graph), str(path))
    return path


def test_onnx_external_data_must_stay_in_its_folder(tmp_path):
    (tmp_path / "secret.bin").write_bytes(np.array([5.0, 6.0], dtype=np.float32).tobytes())
    inner = tmp_path / "model"
    inner.mkdir()
    path = _external_data_model(inner, "../secret.bin")
    with pytest.raises(DamagedModelFile, match=r"external data '../secret.bin' outside the model folder"):
        onnx_to_torch(path)
    shutil.copy(tmp_path / "secret.bin", inner / "weights.bin")
    path = _external_data_model(inner, "weights.bin")
    module = onnx_to_torch(path)  # the same data inside the folder loads, and is used
    torch.testing.assert_close(module(torch.tensor([1.0, 1.0])), torch.tensor([6.0, 7.0]))
    (inner / "weights.bin").write_bytes(b"\0" * 4)
    with pytest.raises(DamagedModelFile, match="weights.bin .* is truncated"):
        check_onnx_file(path)


def test_onnxruntime_dropping_the_gpu_provider_is_reported(pack, monkeypatch):
    """onnxruntime-gpu without matching CUDA libraries runs on the CPU silently; the loader must say so."""
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("a working CUDA provider cannot show the fallback")
    # what onnxruntime-gpu reports on a machine whose CUDA libraries do not load: CUDA listed, sessions on CPU
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.warns(RuntimeWarning, match=r"asked for CUDAExecutionProvider but the face detector session runs on "
                                            r"CPUExecutionProvider"):
        models = load_face_models(pack.parent.parent, provider="cuda")
    assert models.providers == ["CPUExecutionProvider"]


# -- model folders as the nodes list them -------------------------------------------------------------

def test_symlink_loops_neither_hang_nor_duplicate(tmp_path, monkeypatch):
    root = tmp_path / "diffusers"
    model = root / "flows" / "perflow-a"
    model.mkdir(parents=True)
    (model / "model_index.json").write_text("{}")
    os.symlink(root, root / "flows" / "loop")  # flows/loop -> diffusers: a cycle
    os.symlink(model, root / "alias")  # the same model under a second name
    monkeypatch.setenv(bridge.MODELS_ENV, str(tmp_path))
    start = time.monotonic()
    names = bridge.list_models("diffusers")
    assert time.monotonic() - start < 5
    assert len(names) == 1 and os.path.realpath(bridge.resolve_model("diffusers", names[0])) == str(model.resolve())


@pytest.mark.parametrize("layout", ["models", "models/nested", "flat", "nested"])
def test_listing_and_find_antelopev2_agree_on_every_layout(tmp_path, monkeypatch, layout):
    root = tmp_path / "insightface"
    pack = {"models": root / "models" / "antelopev2", "models/nested": root / "models" / "antelopev2" / "antelopev2",
            "flat": root / "antelopev2", "nested": root / "antelopev2" / "antelopev2"}[layout]
    pack.mkdir(parents=True)
    for name in ("scrfd_10g_bnkps.onnx", "glintr100.onnx"):
        (pack / name).write_bytes(b"x")
    (root / "models" / "buffalo_l").mkdir(parents=True)  # a pack without .onnx files is not listed
    monkeypatch.setenv(bridge.MODELS_ENV, str(tmp_path))
    assert bridge.list_models("insightface") == ["antelopev2"]
    listed = bridge.resolve_model("insightface", "antelopev2")
    assert find_antelopev2(listed) == pack == find_antelopev2(root)


def test_an_empty_model_folder_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv(bridge.MODELS_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"no model is installed in the 'dinov2' model folders \(.*dinov2\)"):
        bridge.resolve_model("dinov2", bridge.list_models("dinov2")[0])


# -- command line -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli-bad")
    Image.new("RGB", (32, 32), "gray").save(folder / "ref.png")
    (folder / "faces").mkdir()  # exists but holds no models: loading it would fail with another message
    return folder


def _run(capsys, *args):
    status = main(list(args))
    return status, capsys.readouterr().err


def test_cli_checks_device_and_output_before_the_flow(cli_files, tmp_path, capsys):
    base = ["--flow", str(tmp_path), "--faces", str(cli_files / "faces"), "--prompt", "p",
            "--subject", f"face={cli_files / 'ref.png'}"]
    status, err = _run(capsys, *base, "--device", "warp-drive")
    assert status == 2 and "--device 'warp-drive' is not a device torch knows" in err
    if not torch.cuda.is_available():
        status, err = _run(capsys, *base, "--device", "cuda")
        assert status == 2 and "--device 'cuda': torch sees no CUDA GPU" in err and "choose cpu" in err
    (tmp_path / "file").write_text("")
    status, err = _run(capsys, *base, "--device", "cpu", "--output", str(tmp_path / "file" / "out.png"))
    assert status == 2 and "is a file, so the folder cannot be created there" in err
    status, err = _run(capsys, *base, "--device", "cpu", "--output", str(tmp_path))
    assert status == 2 and "is a folder; give a file name" in err
    if os.name == "posix" and os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        status, err = _run(capsys, *base, "--device", "cpu", "--output", str(locked / "out.png"))
        assert status == 2 and f"no permission to write in {locked}" in err
    for name in ("out", "out.xyz"):
        status, err = _run(capsys, *base, "--device", "cpu", "--output", str(tmp_path / name))
        assert status == 2 and "cannot tell which image format to write" in err and ".png" in err
    # only then the flow folder (empty here) is looked at
    status, err = _run(capsys, *base, "--device", "cpu", "--output", str(tmp_path / "out.png"))
    assert status == 2 and "is not a complete diffusers folder" in err


def test_cli_refuses_sizes_the_vae_cannot_make_before_loading_models(cli_files, capsys):
    flow = tiny_diffusers.cached_folder("sd15")
    # the factor as diffusers derives it from the VAE config (the tiny VAE has 2 blocks: 2 pixels per latent)
    factor = 2 ** (len(json.loads((flow / "vae" / "config.json").read_text())["block_out_channels"]) - 1)
    base = ["--flow", str(flow), "--faces", str(cli_files / "faces"), "--device", "cpu", "--prompt", "p",
            "--subject", f"face={cli_files / 'ref.png'}", "--output", str(cli_files / "o.png")]
    status, err = _run(capsys, *base, "--width", str(64 * factor + 1))
    assert status == 2 and f"--width {64 * factor + 1} is not a positive multiple of {factor}" in err
    # with a size that fits, the empty faces folder is the next error: the size was checked before any model loaded
    status, err = _run(capsys, *base, "--width", str(64 * factor))
    assert status == 2 and "antelopev2 face models not found" in err
    with pytest.raises(ValueError, match=r"--height 500 is not a positive multiple of 8 .*use 496 or 504"):
        check_image_size(512, 500, 8)


def test_cli_non_image_reference_and_no_traceback(cli_files, tmp_path, capsys):
    (tmp_path / "face.jpg").write_text("<html>404</html>")
    status, err = _run(capsys, "--flow", str(tiny_diffusers.cached_folder("sd15")), "--faces",
                       str(cli_files / "faces"), "--device", "cpu", "--prompt", "p",
                       "--subject", f"face={tmp_path / 'face.jpg'}", "--output", str(tmp_path / "o.png"))
    assert status == 2 and f"{tmp_path / 'face.jpg'} is not an image file" in err and "Traceback" not in err


def test_cli_bugs_keep_their_traceback(monkeypatch):
    import rectifid_core.cli as cli

    def broken(args):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "run", broken)
    with pytest.raises(KeyError):
        main(["--flow", "x", "--prompt", "p", "--subject", "face=x.png"])


def test_memory_refusal_follows_the_estimate():
    flow = load_flow(tiny_diffusers.cached_folder("sd15"), dtype="fp32", device="cpu")
    shape = flow.latent_shape(2, 64, 48)
    steps = 2 * flow.num_windows  # sub-steps keep activations too: the estimate is per guided step
    need = estimate_guidance_bytes(shape, steps, "sd15", flow.dtype)
    assert need["store"] > estimate_guidance_bytes(shape, flow.num_windows, "sd15", flow.dtype)["store"]
    assert memory_refusal(flow, shape, "auto", need["checkpoint"], steps) is None
    message = memory_refusal(flow, shape, "auto", need["checkpoint"] - 1, steps)
    assert message and "48x64 with batch size 2" in message and "memory mode checkpoint" in message
    assert "--memory checkpoint" in memory_refusal(flow, shape, "store", need["store"] - 1, steps)
    message = memory_refusal(flow, shape, "recompute_vae", need["recompute_vae"] - 1, steps)
    assert "memory mode recompute_vae" in message and "--memory checkpoint" in message
    assert memory_refusal(flow, shape, "recompute_vae", need["recompute_vae"], steps) is None
    assert memory_refusal(flow, shape, "store", need["store"], steps) is None
    # partial may fall back to recomputing all but one step; partial:N only runs with fewer than the steps
    assert memory_refusal(flow, shape, "partial", need[f"partial:{steps - 1}"], steps) is None
    message = memory_refusal(flow, shape, "partial", need[f"partial:{steps - 1}"] - 1, steps)
    assert f"memory mode partial:{steps - 1}" in message and "--memory checkpoint" in message
    with pytest.raises(ValueError, match=f"partial:{steps} recomputes {steps} steps but the run has {steps}"):
        memory_refusal(flow, shape, f"partial:{steps}", 1 << 50, steps)


def test_devices_this_machine_lacks_are_refused_by_cli_and_node():
    from nodes.loaders import resolve_device

    assert parse_device("cpu") == torch.device("cpu") == resolve_device("cpu")
    assert parse_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="only cpu, cuda"):
        parse_device("meta")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="numbered 0 to"):
            parse_device(f"cuda:{torch.cuda.device_count()}")
    else:
        with pytest.raises(ValueError, match="the device input 'cuda': torch sees no CUDA GPU"):
            resolve_device("cuda")
