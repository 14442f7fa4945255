"""More steps than windows on PeRFlow, against a literal re-implementation of the reference's loop.

The reference (feifeiobama/RectifID single_person.py / single_person_sdxl.py with `--step`) keeps
the checkpoint's K=4 windows, lets PeRFlow's scheduler run the extra steps inside them, and
guides through a diffusers callback that fires after every scheduler step: one offset per step
(rows of an nn.Parameter stepped by SGD with lr = s after per-row gradient normalization) and
the c of a step from `get_window_alpha(t)` of the step's own timestep (the SD1.5 fix in the
comment; the SDXL script's ddim_eps formula), or the released constant 0.95796674 ("legacy").
Below, the scheduler (set_timesteps, get_window_alpha, step) and the callback are transcribed
from that code. The models are closed-form stand-ins shared by both sides (`ClosedFormPeRFlow`
replaces only the UNet call and the VAE of the real PeRFlow backend, whose sub-step schedule,
window math and coefficients are under test). Everything runs in float64.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import tiny_diffusers
from rectifid_core.flows import Conditioning, PeRFlow, load_flow
from rectifid_core.guidance import GuidanceConfig, guide, rollout
from rectifid_core.objectives.base import ObjectiveOutput

F64 = torch.float64


class ReferenceScheduler:
    """PeRFlowScheduler (piecewise-rectified-flow src/scheduler_perflow.py), SD betas, K windows."""

    def __init__(self, num_windows: int, prediction_type: str) -> None:
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=F64) ** 2
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.window_starts = [i / num_windows for i in range(1, num_windows + 1)][::-1]
        self.window_ends = self.window_starts[1:] + [0.0]
        self.num_windows, self.prediction_type = num_windows, prediction_type

    def set_timesteps(self, num_inference_steps: int) -> None:
        timesteps = []
        for i in range(self.num_windows):
            n = num_inference_steps // self.num_windows + (1 if i < num_inference_steps % self.num_windows else 0)
            timesteps.append(np.linspace(self.window_starts[i], self.window_ends[i], num=n, endpoint=False))
        self.timesteps = (np.concatenate(timesteps) * 1000).astype(np.int64).tolist()

    def get_window(self, tp: float) -> tuple[float, float]:
        idx = 0
        while (tp - 0.1 * 0.001) <= self.window_ends[idx]:
            idx += 1
        return self.window_starts[idx], self.window_ends[idx]

    def get_window_alpha(self, tp: float):
        t_s, t_e = self.get_window(tp)
        abar_s = float(self.alphas_cumprod[int(t_s * 1000 - 1)])
        abar_e = float(self.alphas_cumprod[max(int(t_e * 1000 - 1), 0)])
        return t_s, t_e, tp - t_s, math.sqrt(abar_s / abar_e), abar_s, abar_e

    def step(self, eps: torch.Tensor, timestep: int, sample: torch.Tensor) -> torch.Tensor:
        t_c = timestep / 1000
        t_s, t_e, c_to_s, gamma, abar_s, abar_e = self.get_window_alpha(t_c)
        if self.prediction_type == "ddim_eps":
            lambda_s = (abar_e / abar_s) ** 0.5
            eta_s = (1 - abar_e) ** 0.5 - (abar_e / abar_s * (1 - abar_s)) ** 0.5
        else:  # diff_eps
            lambda_s = 1 / gamma
            eta_s = -1 * (1 - gamma**2) ** 0.5 / gamma
        lambda_t = (lambda_s * (t_e - t_s)) / (lambda_s * (t_c - t_s) + (t_e - t_c))
        eta_t = (eta_s * (t_e - t_c)) / (lambda_s * (t_c - t_s) + (t_e - t_c))
        pred_win_end = lambda_t * sample + eta_t * eps
        velocity = (pred_win_end - sample) / (t_e - (t_s + c_to_s))
        idx = self.timesteps.index(timestep)
        prev = self.timesteps[idx + 1] if idx + 1 < len(self.timesteps) else 0
        return sample + (prev - timestep) / 1000 * velocity

    def anchor_c(self, timestep: int, ck_mode: str) -> float:
        """The factor of the callback's last term."""
        if ck_mode == "legacy":
            return 0.95796674
        _, _, _, gamma, abar_s, abar_e = self.get_window_alpha(timestep / 1000)
        if self.prediction_type == "ddim_eps":  # single_person_sdxl.py
            lambda_s = (abar_e / abar_s) ** 0.5
            eta_s = (1 - abar_e) ** 0.5 + (abar_e / abar_s * (1 - abar_s)) ** 0.5
            return eta_s / lambda_s
        lambda_s, eta_s = 1 / gamma, (1 - gamma**2) ** 0.5 / gamma  # single_person.py, commented fix
        return eta_s / lambda_s


def reference_rectifid(flow, cond, noise, objective, num_steps, iterations, guidance, prediction, ck_mode):
    """PersonRFlow.generate: SGD on per-step rows, the callback after every scheduler step, a final pass."""
    scheduler = ReferenceScheduler(4, prediction)
    latents = torch.nn.Parameter(torch.randn((num_steps, *noise.shape[1:]), dtype=F64,
                                             generator=torch.Generator().manual_seed(99)))
    latents0 = noise.clone()
    optimizer = torch.optim.SGD([latents], guidance)
    latents_last = latents.data.clone()
    latents_last_e = latents.data.clone()
    initialized_i = -1

    def callback(i, t, lat):
        nonlocal initialized_i
        if initialized_i < i:
            latents[i:(i + 1)].data.copy_(lat)
            latents_last[i:(i + 1)].copy_(lat)
            latents_last_e[i:(i + 1)].copy_(lat)
            initialized_i = i
        if i < num_steps - 1:
            lat = lat + latents[(i + 1):(i + 2)] - latents[(i + 1):(i + 2)].detach()
        latents_e = lat.data.clone()
        lat = lat + latents_last[i:(i + 1)].detach() - lat.detach()
        lat = lat + latents_e.detach() - latents_last_e[i:(i + 1)].detach()
        lat = lat + (latents[i:(i + 1)].detach() - latents_last_e[i:(i + 1)].detach()) * scheduler.anchor_c(t, ck_mode)
        latents_last[i:(i + 1)].copy_(lat.detach())
        latents_last_e[i:(i + 1)].data.copy_(latents_e)
        latents[i:(i + 1)].data.copy_(latents_e)
        return lat

    def forward(start):
        scheduler.set_timesteps(num_steps)
        z = start
        for i, t in enumerate(scheduler.timesteps):
            z = scheduler.step(flow.predict(z, t, cond), t, z)
            z = callback(i, t, z)
        return flow.decode(z), z

    for _ in range(iterations):
        image, _ = forward(latents0 + latents[:1] - latents[:1].detach())
        loss = objective(image).loss.sum()
        optimizer.zero_grad()
        loss.backward()
        grad_norm = latents.grad.reshape(num_steps, -1).norm(dim=-1)
        latents.grad /= grad_norm.reshape(num_steps, 1, 1, 1).clamp(min=1)
        optimizer.step()
    with torch.no_grad():
        return forward(latents0)[1]


def target_objective(target: torch.Tensor):
    def objective(image: torch.Tensor) -> ObjectiveOutput:
        return ObjectiveOutput(200.0 * (image - target).pow(2).flatten(1).mean(1))
    return objective


class ClosedFormPeRFlow(PeRFlow):
    """PeRFlow with a smooth closed-form eps model and decoder instead of the UNet and the VAE."""

    def __init__(self, components, scheduler_config, prediction, num_windows, steps) -> None:
        super().__init__(components, scheduler_config, prediction, num_windows, steps, dtype=F64)
        gen = torch.Generator().manual_seed(4)
        self.a = 0.5 + torch.rand(1, 4, 8, 8, generator=gen, dtype=F64)
        self.b = torch.randn(1, 4, 8, 8, generator=gen, dtype=F64)
        self.mix = torch.randn(3, 4, generator=gen, dtype=F64)

    def predict(self, z, timestep, cond):
        return torch.tanh(self.a * z + self.b * (timestep / 1000)) + 0.3 * z

    def decode(self, z):
        return torch.sigmoid(torch.einsum("oc,bchw->bohw", self.mix, z))


@pytest.fixture(scope="module")
def loaded():
    return load_flow(tiny_diffusers.cached_folder("sd15"))


def closed_form(loaded, prediction: str, steps: int, num_windows: int = 4) -> ClosedFormPeRFlow:
    return ClosedFormPeRFlow(loaded.components, loaded.scheduler_config, prediction, num_windows, steps)


@pytest.mark.parametrize("prediction, ck_mode, steps", [("diff_eps", "per_window", 8), ("ddim_eps", "per_window", 6),
                                                        ("diff_eps", "legacy", 6)])
def test_guidance_with_sub_steps_follows_the_reference_loop(loaded, prediction, ck_mode, steps):
    flow = closed_form(loaded, prediction, steps)
    cond = Conditioning(batch=1, guidance_scale=1.0)
    gen = torch.Generator().manual_seed(5)
    noise = torch.randn(1, 4, 8, 8, generator=gen, dtype=F64)
    objective = target_objective(torch.rand(1, 3, 8, 8, generator=gen, dtype=F64))

    expected = reference_rectifid(flow, cond, noise, objective, steps, 3, 1.0, prediction, ck_mode)
    got = guide(flow, cond, objective, noise, GuidanceConfig(scale=1.0, iterations=3, ck_mode=ck_mode))
    unguided = reference_rectifid(flow, cond, noise, objective, steps, 0, 1.0, prediction, ck_mode)
    assert float((expected - unguided).norm()) > 0.1  # the guidance moved the sample: the comparison has teeth
    # the solver keeps its offsets in float32: agreement to float32 rounding
    torch.testing.assert_close(got.latent, expected, rtol=2e-5, atol=2e-5)


def test_eight_steps_in_four_windows_is_not_eight_windows(loaded):
    """The old behaviour (re-partition into 8 windows) samples another image than the reference's 8 steps."""
    flow = closed_form(loaded, "diff_eps", 8)
    cond = Conditioning(batch=1, guidance_scale=1.0)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(6), dtype=F64)
    expected = reference_rectifid(flow, cond, noise, None, 8, 0, 1.0, "diff_eps", "per_window")
    zeros = [torch.zeros_like(noise)] * 8
    with torch.no_grad():
        ours, _ = rollout(flow, cond, noise, zeros)
        repartitioned, _ = rollout(closed_form(loaded, "diff_eps", 8, num_windows=8), cond, noise, zeros)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10)
    assert float((repartitioned - expected).norm() / expected.norm()) > 0.05
