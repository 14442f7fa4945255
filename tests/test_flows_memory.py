"""Memory modes and backend memory saving (VAE decoder blocks, CFG halves recomputed) change memory, not numbers.

The gradients are compared in float64: in fp32 the batched and split CFG calls round differently,
and a random-weight recognizer's PReLU kinks can turn that rounding into a 3e-3 difference on some
CPUs; in float64 rounding cannot hide (or fake) a real difference.
"""
import dataclasses
from collections import Counter

import pytest
import torch

from rectifid_core.benchmark.measure import profiled_peak_bytes
from rectifid_core.benchmark.models import build_models
from rectifid_core.guidance import GuidanceConfig, decode, guide, initial_noise, rollout

RECOMPUTING = ("recompute_vae", "partial:2", "checkpoint", "lowest")


@pytest.fixture(scope="module")
def tiny64():
    torch.manual_seed(0)
    models = build_models("tiny", 0.1, dtype=torch.float64)
    cond = models.flow.encode(["a photo of a person"], [""], 4.5)  # CFG on: the halves path runs
    noise = initial_noise(models.flow.latent_shape(1, 64, 64), 0, dtype=torch.float64)
    return models, cond, noise


def _recomputing(flow) -> bool:
    """Whether any decoder module still runs a recomputing forward of its own."""
    return any("forward" in vars(m) for m in flow.components.vae.decoder.modules())


def _gradients(models, cond, noise, saving: bool, split_cfg: bool = False) -> list[torch.Tensor]:
    flow = models.flow
    flow.set_memory_saving(saving, split_cfg)
    try:
        start = noise.clone().requires_grad_(True)
        offsets = [torch.zeros_like(noise) for _ in range(flow.num_steps)]
        z, starts = rollout(flow, cond, start, offsets, flow.num_steps)
        loss = models.objective(decode(flow, z, checkpoint=True)).loss.sum()
        return list(torch.autograd.grad(loss, starts))
    finally:
        flow.set_memory_saving(False)


def _run(models, cond, noise, memory: str, iterations: int = 2):
    return guide(models.flow, cond, models.objective, noise,
                 GuidanceConfig(scale=1.0, iterations=iterations, memory=memory))


def test_memory_saving_keeps_gradients_lowers_the_peak_and_is_undone_after_guide(tiny64):
    models, cond, noise = tiny64
    flow = models.flow
    settings = [(False, False), (True, False), (True, True)]
    plain, *saved = [_gradients(models, cond, noise, *s) for s in settings]
    for grads in saved:  # batched vs split UNet calls differ only by float rounding
        for a, b in zip(plain, grads):
            assert a.dtype == torch.float64 and float((a - b).norm() / a.norm()) < 1e-6

    peaks = [profiled_peak_bytes(lambda: _gradients(models, cond, noise, *s)) for s in settings[:2]]
    assert peaks[1] < peaks[0], peaks

    for memory in RECOMPUTING:
        _run(models, cond, noise, memory, iterations=1)
        assert not (flow.memory_saving or flow.split_cfg or _recomputing(flow))


def test_each_mode_keeps_less_than_the_faster_one_before_it(tiny64):
    """store > recompute_vae > partial:1 > partial:2 > partial:3 > checkpoint in measured peak of live allocations."""
    models, cond, noise = tiny64
    order = ["store", "recompute_vae", "partial:1", "partial:2", "partial:3", "checkpoint"]
    peaks = [profiled_peak_bytes(lambda: _run(models, cond, noise, m, iterations=1)) for m in order]
    assert peaks == sorted(peaks, reverse=True) and len(set(peaks)) == len(peaks), dict(zip(order, peaks))


def test_partial_recomputes_the_first_steps_with_the_same_gradients(tiny64, monkeypatch):
    """partial:r runs the model calls of steps 0..r-1 twice (once more in the backward), the others once,
    and gives every window start the gradient of the stored rollout (float64)."""
    models, cond, noise = tiny64
    flow = models.flow
    calls: Counter = Counter()
    step = flow.step
    monkeypatch.setattr(flow, "step", lambda z, k, c: calls.update([k]) or step(z, k, c))
    offsets = [0.05 * torch.randn_like(noise) for _ in range(flow.num_steps)]
    grads = {}
    for r in (0, 1, 3):
        calls.clear()
        flow.set_memory_saving(r > 0)
        try:
            start = noise.clone().requires_grad_(True)
            z, starts = rollout(flow, cond, start, offsets, r)
            loss = models.objective(decode(flow, z)).loss.sum()
            grads[r] = torch.autograd.grad(loss, starts + [z])
        finally:
            flow.set_memory_saving(False)
        assert calls == Counter({k: 2 if k < r else 1 for k in range(flow.num_steps)}), (r, calls)
    for r in (1, 3):
        for a, b in zip(grads[0], grads[r], strict=True):
            assert a.abs().max() > 0 and float((a - b).norm() / a.norm()) < 1e-12, r


def test_partial_with_sub_steps_gives_the_stored_iterates(tiny64):
    """PeRFlow run in 8 steps over its 4 windows: partial counts steps (model calls), not windows."""
    models, cond, noise = tiny64
    flow = models.flow.with_steps(8)
    config = GuidanceConfig(scale=1.0, iterations=2)
    store = guide(flow, cond, models.objective, noise, config)
    latents = []
    partial = guide(flow, cond, models.objective, noise, dataclasses.replace(config, memory="partial:5"),
                    callback=lambda info: latents.append(info.latent))
    assert store.losses[0] != store.losses[1]
    assert partial.losses == pytest.approx(store.losses, rel=1e-10)
    assert float((partial.latent - store.latent).norm() / (store.latent - noise).norm()) < 1e-8
    with pytest.raises(ValueError, match="partial:8 recomputes 8 steps but the run has 8; use partial:1 to partial:7"):
        guide(flow, cond, models.objective, noise, dataclasses.replace(config, memory="partial:8"))


def _leaf_calls(modules: dict[str, torch.nn.Module]) -> tuple[Counter, list]:
    calls: Counter = Counter()
    handles = []
    for part, module in modules.items():
        for name, leaf in module.named_modules():
            if not any(leaf.children()):
                handles.append(leaf.register_forward_hook(
                    lambda *_, key=f"{part}.{name}": calls.update([key])))
    return calls, handles


def test_every_mode_gives_the_stored_iterates_and_recomputes_each_activation_at_most_once(tiny64):
    """Forward calls of every leaf module over N=2 guided iterations and the final pass, against store's.

    Per iteration, store runs each UNet leaf once per step and each decoder leaf once; a mode may
    add one recomputation per activation and no more: the UNet twice per step with checkpoint,
    its two CFG halves twice each with lowest, the decoder blocks twice with any recomputing mode.
    The decoder's head and tail lie outside its recomputed blocks and are never recomputed.
    """
    models, cond, noise = tiny64
    flow, n = models.flow, 2
    c = flow.components
    # partial:2 recomputes 2 of the K=4 steps: 1.5 UNet runs per step on average
    runs_per_iteration = {"store": (1, 1), "recompute_vae": (1, 2), "partial:2": (1.5, 2), "checkpoint": (2, 2),
                          "lowest": (4, 2)}
    calls, results = {}, {}
    for memory in runs_per_iteration:
        calls[memory], handles = _leaf_calls({"unet": c.unet, "blocks": c.vae.decoder.up_blocks,
                                              "mid": c.vae.decoder.mid_block, "head": c.vae.decoder.conv_in,
                                              "tail": c.vae.decoder.conv_out, "recognizer": models.objective.net})
        try:
            results[memory] = _run(models, cond, noise, memory, iterations=n)
        finally:
            for h in handles:
                h.remove()
        assert not (flow.memory_saving or flow.split_cfg or _recomputing(flow))

    store = results["store"]
    assert store.losses[0] != store.losses[1]  # the update moved the iterate, so its gradients were used
    base = calls["store"]
    assert {key.split(".")[0] for key in base} == {"unet", "blocks", "mid", "head", "tail", "recognizer"}
    for memory, (unet_runs, decoder_runs) in runs_per_iteration.items():
        assert results[memory].losses == pytest.approx(store.losses, rel=1e-10), memory
        change = float((results[memory].latent - store.latent).norm() / (store.latent - noise).norm())
        assert change < 1e-8, (memory, change)
        assert set(calls[memory]) == set(base), memory
        ratios: dict[str, set] = {}
        for key, count in calls[memory].items():
            part = key.split(".")[0]
            # n guided iterations + the final pass (the recognizer scores only the guided ones)
            passes = n if part == "recognizer" else n + 1
            ratios.setdefault(part, set()).add(count * passes / base[key])
        expected = {"unet": n * unet_runs + 1, "blocks": n * decoder_runs + 1, "mid": n * decoder_runs + 1,
                    "head": n + 1, "tail": n + 1, "recognizer": n}
        for part, ratio in ratios.items():
            # torch stops a recomputation once the tensors the backward needs are back, so a block's last
            # layers may be skipped (fewer calls); none may run more often than one recomputation allows
            assert max(ratio) == expected[part], (memory, part, ratio)
            assert min(ratio) >= (n + 1 if part != "recognizer" else n), (memory, part, ratio)


def test_lowest_recomputes_the_step_without_cfg_too(tiny64):
    """At CFG 1 (SDXL PeRFlow's default) there are no halves to split: the one UNet call is recomputed."""
    models, _, noise = tiny64
    cond = models.flow.encode(["a photo of a person"], [""], 1.0)
    calls = Counter()
    handle = models.flow.components.unet.register_forward_pre_hook(lambda *_: calls.update(["unet"]))
    try:
        peaks = {}
        for memory in ("store", "lowest"):
            calls.clear()
            peaks[memory] = profiled_peak_bytes(lambda: guide(models.flow, cond, models.objective, noise,
                                                              GuidanceConfig(scale=1.0, iterations=1, memory=memory)))
            peaks[memory + "_calls"] = calls["unet"]
    finally:
        handle.remove()
    k = models.flow.num_steps
    # store: K forwards + K in the final pass; lowest: each step's forward once more in the backward
    assert (peaks["store_calls"], peaks["lowest_calls"]) == (2 * k, 3 * k)
    assert peaks["lowest"] < peaks["store"]
