"""The benchmark's own bookkeeping, and the memory option it measures.

Timing values are never asserted (the CPU is shared); what must hold is that the
floor is measured and positive, the overhead is computed from the same run, and
recomputation lowers the measured peak memory while giving the same numbers.
"""
from __future__ import annotations

import math
import statistics

import pytest
import torch

from rectifid_core.benchmark.measure import BenchSettings, measure_in_subprocess
from rectifid_core.benchmark.models import IResNet, build_models, unet_config
from rectifid_core.benchmark.report import markdown_table, write_results
from rectifid_core.guidance import (ACTIVATION_BYTES, GuidanceConfig, choose_memory_mode, decode,
                                    estimate_guidance_bytes, guide, initial_noise, resolve_memory_mode, rollout)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    models = build_models("tiny", 0.1)
    cond = models.flow.encode(["a photo of a person"], [""], 4.5)
    noise = initial_noise(models.flow.latent_shape(1, 64, 64), 0)
    return models, cond, noise


def test_sd15_and_recognizer_shapes_are_the_real_ones() -> None:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config("sd15"))
        net = IResNet()
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964  # SD1.5's UNet
    assert len(net.blocks) == 3 + 13 + 30 + 3  # iResNet-100
    assert net.head[2].out_features == 512


def test_checkpointed_rollout_gives_the_same_gradients(tiny) -> None:
    models, cond, noise = tiny
    flow = models.flow
    offsets = [0.1 * torch.randn_like(noise) for _ in range(flow.num_windows)]
    grads = []
    for recompute in (False, True):
        start = noise.clone().requires_grad_(True)
        z, starts = rollout(flow, cond, start, offsets, flow.num_steps if recompute else 0)
        loss = models.objective(decode(flow, z, checkpoint=recompute)).loss.sum()
        grads.append(torch.autograd.grad(loss, starts))
    for a, b in zip(*grads):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_checkpointed_solver_gives_the_same_result(tiny) -> None:
    models, cond, noise = tiny
    runs = [guide(models.flow, cond, models.objective, noise,
                  GuidanceConfig(scale=1.0, iterations=2, memory=memory)) for memory in ("store", "checkpoint")]
    assert runs[0].losses == pytest.approx(runs[1].losses, rel=1e-5)
    torch.testing.assert_close(runs[0].latent, runs[1].latent, rtol=1e-4, atol=1e-5)


def test_unknown_memory_mode_is_rejected_and_auto_stores_on_the_cpu(tiny) -> None:
    with pytest.raises(ValueError, match="memory mode"):
        GuidanceConfig(memory="offload").validate()
    models, _, noise = tiny
    assert resolve_memory_mode("auto", models.flow, tuple(noise.shape)) == "store"
    assert resolve_memory_mode("checkpoint", models.flow, tuple(noise.shape)) == "checkpoint"
    # a caller's own count of free memory (ComfyUI's model manager) decides "auto" on any device
    assert resolve_memory_mode("auto", models.flow, tuple(noise.shape), free_bytes=1) == "checkpoint"
    assert resolve_memory_mode("auto", models.flow, tuple(noise.shape), free_bytes=1 << 50) == "store"
    need = estimate_guidance_bytes(tuple(noise.shape), models.flow.num_steps, "sd15", models.flow.dtype)
    between = int(need["recompute_vae"] / 0.85) + 16
    assert need["store"] > 0.85 * between
    assert resolve_memory_mode("auto", models.flow, tuple(noise.shape), free_bytes=between) == "recompute_vae"
    # partial: n from the free memory given; off CUDA without a count, the fastest (one step recomputed)
    assert resolve_memory_mode("partial", models.flow, tuple(noise.shape)) == "partial:1"
    assert resolve_memory_mode("partial", models.flow, tuple(noise.shape), free_bytes=1) == "partial:3"
    assert resolve_memory_mode("partial:2", models.flow, tuple(noise.shape), free_bytes=1) == "partial:2"
    GuidanceConfig(memory="partial:2").validate()
    for bad in ("partial:0", "partial:x", "partial:", "partial:-1"):
        with pytest.raises(ValueError, match="partial:n to recompute the first n steps"):
            GuidanceConfig(memory=bad).validate()
    with pytest.raises(ValueError, match="the run has 1; use recompute_vae or checkpoint"):
        resolve_memory_mode("partial", models.flow, tuple(noise.shape), num_steps=1)


def _by_hand(family: str, shape: tuple[int, ...], steps: int, width: float, decode_width: float) -> dict[str, float]:
    """The activation model of estimate_guidance_bytes written out from ACTIVATION_BYTES (batch 1)."""
    c, n = ACTIVATION_BYTES[family], math.prod(shape)
    window = (c["window"] * n + c["window_fixed"]) * width
    fixed = c["fixed"] * width
    recomputed_decoder = c["decode_recompute"] * n * decode_width
    # partial:r: the K-r stored windows and the decoder's recomputation at the start of the backward,
    # or one recomputed window once they are freed, plus the r recomputed steps' inputs and z_K
    partial = {f"partial:{r}": max((steps - r) * window + recomputed_decoder, window) + fixed + 4 * n * (r + 1)
               for r in range(1, steps)}
    return {"store": steps * window + c["decode"] * n * decode_width + fixed,
            "recompute_vae": steps * window + recomputed_decoder + fixed, **partial,
            "checkpoint": max(window, recomputed_decoder) + fixed + 4 * n * (steps + 1)}


def test_auto_picks_the_fastest_mode_whose_independent_estimate_fits() -> None:
    shape = (1, 4, 64, 64)  # SD1.5 at 512x512, K=4, fp16
    need = _by_hand("sd15", shape, 4, 0.5, 0.5)
    assert estimate_guidance_bytes(shape, 4, "sd15", torch.float16) == pytest.approx(
        {**need, "lowest": need["checkpoint"]}, rel=1e-6)
    order = ["store", "recompute_vae", "partial:1", "partial:2", "partial:3", "checkpoint"]
    assert [need[m] for m in order] == sorted((need[m] for m in order), reverse=True)
    for fits in order:
        free = int(need[fits] / 0.85) + 16
        assert choose_memory_mode(free, shape, 4, "sd15", torch.float16) == fits
    # just below what recompute_vae needs: the next leaner mode; below everything: the leanest
    assert choose_memory_mode(int(need["recompute_vae"] / 0.85) - 16, shape, 4, "sd15", torch.float16) == "partial:1"
    assert choose_memory_mode(0, shape, 4, "sd15", torch.float16) == "checkpoint"
    # "partial" chooses only among the partial modes: the fewest recomputed steps that fit, else the most
    assert choose_memory_mode(1 << 50, shape, 4, "sd15", torch.float16, memory="partial") == "partial:1"
    assert choose_memory_mode(int(need["partial:2"] / 0.85) + 16, shape, 4, "sd15", torch.float16,
                              memory="partial") == "partial:2"
    assert choose_memory_mode(0, shape, 4, "sd15", torch.float16, memory="partial") == "partial:3"
    bigger = estimate_guidance_bytes((2, 4, 64, 64), 4, "sd15", torch.float32)
    assert bigger["store"] == pytest.approx(4 * need["store"], rel=0.05)
    with pytest.raises(ValueError, match="family"):
        estimate_guidance_bytes(shape, 4, "sd3", torch.float16)


def test_sdxl_estimate_keeps_the_vae_decode_in_fp32() -> None:
    shape = (1, 4, 128, 128)
    need = estimate_guidance_bytes(shape, 4, "sdxl", torch.float16)
    by_hand = _by_hand("sdxl", shape, 4, 0.5, 1.0)
    for mode, value in by_hand.items():
        assert need[mode] == pytest.approx(value, rel=1e-6), mode


def test_benchmark_bookkeeping_and_checkpoint_memory(tmp_path) -> None:
    results = [measure_in_subprocess(BenchSettings(iterations=3, floor_repeats=2, memory=memory), timeout=600)
               for memory in ("store", "checkpoint")]
    for r in results:
        assert r["floor_seconds"] > 0 and len(r["floor_times"]) >= 2
        assert len(r["iteration_times"]) == 2  # warm-up dropped
        assert r["seconds_per_iteration"] == statistics.median(r["iteration_times"])
        pairs = [i / f for i, f in zip(r["iteration_times"], r["floor_times"])]
        assert r["overhead"] == pytest.approx(statistics.median(pairs))
        assert r["environment"]["torch"] == torch.__version__
        assert r["cuda_peak_allocated_bytes"] is None  # CPU run: no CUDA numbers invented
    store, ckpt = results
    # exact accounting of torch CPU allocations: recomputation stores far less
    assert ckpt["cpu_profiled_peak_bytes"] < 0.7 * store["cpu_profiled_peak_bytes"]
    json_path, md_path = write_results(results, tmp_path, "tiny")
    assert json_path.exists()
    table = md_path.read_text()
    assert table == markdown_table(results)
    assert "| checkpoint |" in table and f"{store['overhead']:.3f}" in table


def test_gpu_prediction_adds_the_real_weights_to_the_estimate() -> None:
    from rectifid_core.benchmark.predict import GIB, predict

    report = predict("sd15", 512, 4, torch.float16, {"window": 80.0, "decode": 45.0, "recognizer": 35.0}, 1 / 3)
    weights = report["weights_gib"]
    assert weights["unet"] * GIB == 2 * 859_520_964  # SD1.5's UNet parameter count, fp16 (it has no buffers)
    need = estimate_guidance_bytes((1, 4, 64, 64), 4, "sd15", torch.float16)
    for mode, row in report["modes"].items():
        assert row["peak_gib"] * GIB == pytest.approx(sum(weights.values()) * GIB + need[mode], rel=1e-9)
    # floor 4*80 + 45 + 35 = 400 ms; recompute_vae adds a decoder forward (15 ms), checkpoint all forwards but
    # the recognizer's ((320 + 45) / 3 ms)
    assert report["modes"]["recompute_vae"]["time_vs_floor"] == pytest.approx(1 + 15 / 400)
    assert report["modes"]["checkpoint"]["time_vs_floor"] == pytest.approx(1 + 365 / 3 / 400)
