"""Backend memory saving (VAE decoder blocks, CFG halves recomputed) changes memory, not numbers.

The gradients are compared in float64: in fp32 the batched and split CFG calls round differently,
and a random-weight recognizer's PReLU kinks can turn that rounding into a 3e-3 difference on some
CPUs; in float64 rounding cannot hide (or fake) a real difference.
"""
import torch

from rectifid_core.benchmark.measure import profiled_peak_bytes
from rectifid_core.benchmark.models import build_models
from rectifid_core.guidance import GuidanceConfig, decode, guide, initial_noise, rollout


def _gradients(models, cond, noise, saving: bool, split_cfg: bool = False) -> list[torch.Tensor]:
    flow = models.flow
    flow.set_memory_saving(saving, split_cfg)
    try:
        start = noise.clone().requires_grad_(True)
        offsets = [torch.zeros_like(noise) for _ in range(flow.num_steps)]
        z, starts = rollout(flow, cond, start, offsets, checkpoint=True)
        loss = models.objective(decode(flow, z, checkpoint=True)).loss.sum()
        return list(torch.autograd.grad(loss, starts))
    finally:
        flow.set_memory_saving(False)


def test_memory_saving_keeps_gradients_lowers_the_peak_and_is_undone_after_guide():
    torch.manual_seed(0)
    models = build_models("tiny", 0.1, dtype=torch.float64)
    flow = models.flow
    cond = flow.encode(["a photo of a person"], [""], 4.5)  # CFG on: the halves path runs
    noise = initial_noise(flow.latent_shape(1, 64, 64), 0, dtype=torch.float64)

    settings = [(False, False), (True, False), (True, True)]
    plain, *saved = [_gradients(models, cond, noise, *s) for s in settings]
    for grads in saved:  # batched vs split UNet calls differ only by float rounding
        for a, b in zip(plain, grads):
            assert a.dtype == torch.float64 and float((a - b).norm() / a.norm()) < 1e-6

    peaks = [profiled_peak_bytes(lambda: _gradients(models, cond, noise, *s)) for s in settings[:2]]
    assert peaks[1] < peaks[0], peaks

    for memory in ("checkpoint", "lowest"):
        guide(flow, cond, models.objective, noise, GuidanceConfig(iterations=1, memory=memory))
        assert not (flow.memory_saving or flow.split_cfg or flow.components.vae.is_gradient_checkpointing)
