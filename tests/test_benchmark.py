"""The benchmark's own bookkeeping, and the memory option it measures.

Timing values are never asserted (the CPU is shared); what must hold is that the
floor is measured and positive, the overhead is computed from the same run, and
recomputation lowers the measured peak memory while giving the same numbers.
"""
from __future__ import annotations

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
        z, starts = rollout(flow, cond, start, offsets, checkpoint=recompute)
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


def test_memory_mode_follows_free_memory() -> None:
    shape = (1, 4, 64, 64)
    need = estimate_guidance_bytes(shape, 4, "sd15", torch.float16)
    assert need["checkpoint"] < need["store"]
    assert choose_memory_mode(int(need["store"] * 1.5), shape, 4, "sd15", torch.float16) == "store"
    assert choose_memory_mode(int(need["store"] * 0.5), shape, 4, "sd15", torch.float16) == "checkpoint"
    bigger = estimate_guidance_bytes((2, 4, 64, 64), 4, "sd15", torch.float32)
    assert bigger["store"] == pytest.approx(4 * need["store"], rel=0.05)
    with pytest.raises(ValueError, match="family"):
        estimate_guidance_bytes(shape, 4, "sd3", torch.float16)


def test_sdxl_estimate_keeps_the_vae_decode_in_fp32() -> None:
    c = ACTIVATION_BYTES["sdxl"]
    shape, n = (1, 4, 128, 128), 4 * 128 * 128
    half = estimate_guidance_bytes(shape, 4, "sdxl", torch.float16)["store"]
    by_hand = 4 * (c["window"] * n + c["window_fixed"]) * 0.5 + c["decode"] * n + c["fixed"] * 0.5
    assert half == pytest.approx(by_hand, rel=1e-6)


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
