"""Image conversion: every PIL mode users feed as a reference becomes [1,3,H,W] RGB 0..1."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rectifid_core.images import as_reference_list, ensure_min_size, load_image, pil_to_tensor, to_image_batch, to_uint8_hwc


def _insightface_image(name: str) -> Path:
    spec = importlib.util.find_spec("insightface")
    if spec is None or spec.origin is None:
        pytest.skip("insightface not installed")
    path = Path(spec.origin).parent / "data" / "images" / name
    if not path.is_file():
        pytest.skip(f"{name} not shipped with this insightface")
    return path


def test_real_photos_load_as_rgb():
    group = _insightface_image("t1.jpg")
    t = load_image(group)
    with Image.open(group) as im:
        w, h = im.size
        ref = np.asarray(im.convert("RGB"), dtype=np.float32) / 255
    assert t.shape == (1, 3, h, w) and t.dtype == torch.float32
    np.testing.assert_allclose(t[0].permute(1, 2, 0).numpy(), ref, atol=1e-6)
    png = load_image(_insightface_image("Tom_Hanks_54745.png"))
    assert png.shape[:2] == (1, 3) and 0 <= png.min() and png.max() <= 1
    assert np.array_equal(to_uint8_hwc(png[0]), np.asarray(Image.open(_insightface_image("Tom_Hanks_54745.png")).convert("RGB")))


def test_grayscale_palette_cmyk():
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8))
    gray = rgb.convert("L")
    t = pil_to_tensor(gray)
    assert t.shape == (1, 3, 12, 10)
    g = np.asarray(gray, dtype=np.float32) / 255
    for c in range(3):
        np.testing.assert_allclose(t[0, c].numpy(), g, atol=1e-6)
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    np.testing.assert_allclose(pil_to_tensor(pal)[0].permute(1, 2, 0).numpy(), np.asarray(pal.convert("RGB")) / 255, atol=1e-6)
    cmyk = rgb.convert("CMYK")
    np.testing.assert_allclose(pil_to_tensor(cmyk)[0].permute(1, 2, 0).numpy(), np.asarray(cmyk.convert("RGB")) / 255, atol=1e-6)


def test_transparency_composited_or_dropped():
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red-ish everywhere
    rgba[0, 0, 3] = 255  # opaque
    rgba[0, 1, 3] = 0  # transparent
    rgba[1, :, 3] = 128  # half
    im = Image.fromarray(rgba, "RGBA")
    white = pil_to_tensor(im, alpha="white")[0]
    assert white[:, 0, 0].tolist() == pytest.approx([200 / 255, 0, 0])
    assert white[:, 0, 1].tolist() == pytest.approx([1, 1, 1])
    a = 128 / 255
    assert white[:, 1, 0].tolist() == pytest.approx([200 / 255 * a + 1 - a, 1 - a, 1 - a], abs=1e-6)
    assert pil_to_tensor(im, alpha="black")[0][:, 0, 1].tolist() == pytest.approx([0, 0, 0])
    assert pil_to_tensor(im, alpha="drop")[0][:, 0, 1].tolist() == pytest.approx([200 / 255, 0, 0])
    la = Image.fromarray(np.array([[[50, 0]]], dtype=np.uint8), "LA")
    assert pil_to_tensor(la)[0, :, 0, 0].tolist() == pytest.approx([1, 1, 1])
    pal = im.convert("P")
    pal.info["transparency"] = 0
    assert pil_to_tensor(pal).shape == (1, 3, 2, 2)
    with pytest.raises(ValueError, match="alpha"):
        pil_to_tensor(im, alpha="grey")


def test_sixteen_bit_and_float_modes(tmp_path):
    values = np.array([[0, 1000, 65535]], dtype=np.uint16)
    for im, mode in ((Image.fromarray(values), "I;16"), (Image.fromarray(values.astype(np.int32)), "I")):
        assert im.mode == mode
        t = pil_to_tensor(im)
        np.testing.assert_allclose(t[0, 0, 0].numpy(), values[0] / 65535, atol=1e-6)
        assert (t[0, 0] == t[0, 2]).all()
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    np.testing.assert_allclose(load_image(path)[0, 1, 0].numpy(), values[0] / 65535, atol=1e-6)
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F")
    np.testing.assert_allclose(pil_to_tensor(f)[0, 0, 0].numpy(), [0, 0.5, 1])
    f255 = Image.fromarray(np.array([[0.0, 51.0, 255.0]], dtype=np.float32), "F")
    np.testing.assert_allclose(pil_to_tensor(f255)[0, 0, 0].numpy(), [0, 0.2, 1], atol=1e-6)


def test_arrays_tensors_and_reference_lists():
    u8 = np.full((4, 5, 3), 255, dtype=np.uint8)
    assert to_image_batch(u8).shape == (1, 3, 4, 5) and to_image_batch(u8).min() == 1
    assert to_image_batch(np.full((4, 5), 65535, dtype=np.uint16)).max() == 1
    assert to_image_batch(torch.rand(2, 1, 4, 4)).shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match="0..1"):
        to_image_batch(torch.full((1, 3, 2, 2), 255.0))
    with pytest.raises(ValueError, match="channels"):
        to_image_batch(np.zeros((4, 5, 2), dtype=np.uint8))
    with pytest.raises(TypeError, match="list"):
        to_image_batch([1, 2])
    refs = as_reference_list([torch.rand(2, 3, 8, 8), np.zeros((5, 6, 3), dtype=np.uint8)])
    assert [tuple(r.shape) for r in refs] == [(1, 3, 8, 8), (1, 3, 8, 8), (1, 3, 5, 6)]
    with pytest.raises(ValueError, match="no reference"):
        as_reference_list([])
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_image("nope.png")


def test_small_images_upscaled_or_rejected():
    small = torch.rand(1, 3, 20, 30)
    up = ensure_min_size(small, 64)
    assert up.shape[-2:] == (64, 96) and 0 <= up.min() and up.max() <= 1
    assert ensure_min_size(small, 16) is small
    with pytest.raises(ValueError, match=r"reference 2 is 30x20 pixels; at least 64"):
        ensure_min_size(small, 64, upscale=False, what="reference 2")
