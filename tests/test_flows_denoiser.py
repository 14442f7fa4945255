"""DenoiserFlow: Euler steps over a k-diffusion style denoiser, checked against diffusers and closed forms."""
from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from rectifid_core.flows.denoiser import DenoiserFlow, EulerSigmas, check_sigmas
from rectifid_core.guidance import GuidanceConfig, guide
from tests.linear_flow import LinearFlow, quadratic

SIGMAS = [1.0, 0.75, 0.5, 0.25, 0.0]


def _flow(denoise, sigmas=SIGMAS):
    return DenoiserFlow(denoise, lambda z: z, EulerSigmas(sigmas), latent_channels=3, vae_scale_factor=1,
                        device="cpu", dtype=torch.float64)


def _velocity(x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x) * 0.7 + 0.1 * x**2


def test_steps_match_diffusers_flow_match_euler_scheduler():
    """With x0 = x - sigma * v(x) (flow matching), each step is the scheduler's Euler step with output v.

    The scheduler keeps its sigmas and the sample in float32, hence the float32-level tolerance.
    """
    sched = FlowMatchEulerDiscreteScheduler()
    sched.set_timesteps(sigmas=SIGMAS[:-1], device="cpu")
    assert [float(s) for s in sched.sigmas] == pytest.approx(SIGMAS)
    flow = _flow(lambda x, s: x - s.view(-1, 1, 1, 1) * _velocity(x), sigmas=[float(s) for s in sched.sigmas])
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ours, theirs = x, x
    cond = flow.conditioning(2)
    for i, t in enumerate(sched.timesteps):
        ours = flow.step(ours, i, cond)
        theirs = sched.step(_velocity(theirs), t, theirs).prev_sample
        torch.testing.assert_close(ours, theirs.double(), rtol=1e-6, atol=1e-6)


def test_linear_denoiser_chain_has_its_closed_form():
    a = 0.3
    flow = _flow(lambda x, s: a * x)
    x = torch.randn(1, 3, 2, 2, dtype=torch.float64)
    z = x
    for i in range(flow.num_steps):
        z = flow.step(z, i, flow.conditioning(1))
    gain = 1.0
    for s, s_next in zip(SIGMAS, SIGMAS[1:]):
        gain *= 1 + (s_next - s) * (1 - a) / s
    torch.testing.assert_close(z, gain * x, rtol=1e-12, atol=1e-12)


def test_guidance_over_a_denoiser_equals_the_same_linear_flow():
    """guide() on DenoiserFlow with x0 = a x equals guide() on an independent LinearFlow with the Euler gains."""
    a = 0.4
    gains = tuple(1 + (s_next - s) * (1 - a) / s for s, s_next in zip(SIGMAS, SIGMAS[1:]))
    target = torch.full((1, 3, 4, 4), 0.5, dtype=torch.float64)
    noise = torch.randn(1, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    config = GuidanceConfig(scale=0.5, iterations=6)
    ours = guide(_flow(lambda x, s: a * x), _flow(lambda x, s: a * x).conditioning(1), quadratic(target), noise,
                 config)
    linear = LinearFlow(gains)
    ref = guide(linear, linear.encode([""], [], 1.0), quadratic(target), noise, config)
    torch.testing.assert_close(ours.latent, ref.latent, rtol=1e-10, atol=1e-12)
    assert ours.losses == pytest.approx(ref.losses, rel=1e-10)
    assert ours.losses[-1] < ours.losses[0]


@pytest.mark.parametrize("sigmas, message", [
    ([1.0], "at least 2 sigmas"),
    ([1.0, 0.5, 0.5, 0.0], "decrease strictly"),
    ([1.0, 0.0, -0.1], "> 0"),
    ([float("nan"), 0.0], "finite"),
])
def test_bad_sigmas_are_refused(sigmas, message):
    with pytest.raises(ValueError, match=message):
        check_sigmas(sigmas)
