"""Parallel rescaling of the identity guidance: the decomposition, the solver hook and the flows' prompt direction."""
from __future__ import annotations

import pytest
import torch

import tiny_diffusers
from linear_flow import LinearFlow, quadratic
from rectifid_core.flows import load_flow
from rectifid_core.guidance import GuidanceConfig, guide
from rectifid_core.parallel_rescaling import rescale_parallel, split_parallel
from rectifid_core.toy.flow import DigitFlow, cfg_velocity
from rectifid_core.toy.models import VelocityNet


def _pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(4, 3, 2, 2, generator=gen, dtype=torch.float64),
            torch.randn(4, 3, 2, 2, generator=gen, dtype=torch.float64))


def test_decomposition_sums_back_and_splits_per_image():
    step, direction = _pair()
    direction[3] = 0.0  # no prompt direction: nothing is parallel
    parallel, orthogonal = split_parallel(step, direction)
    torch.testing.assert_close(parallel + orthogonal, step, rtol=0, atol=1e-15)
    for i in range(4):  # per image, by numpy-free scalar algebra
        r, d = step[i].flatten(), direction[i].flatten()
        coef = float(r @ d / (d @ d)) if float(d @ d) > 0 else 0.0
        torch.testing.assert_close(parallel[i].flatten(), coef * d, rtol=1e-12, atol=1e-15)
        assert abs(float(orthogonal[i].flatten() @ d)) < 1e-12


def test_rescaling_follows_the_sign_convention():
    step, direction = _pair(1)
    direction[0] = -step[0]  # opposes the prompt
    direction[1] = step[1] + 0.1 * direction[1]  # mostly agrees with it
    parallel, orthogonal = split_parallel(step, direction)
    both = rescale_parallel(step, direction, 0.25, "both")
    torch.testing.assert_close(both, orthogonal + 0.25 * parallel, rtol=1e-12, atol=1e-15)
    opposing = rescale_parallel(step, direction, 0.25, "opposing")
    dots = (step * direction).flatten(1).sum(1)
    for i in range(4):
        expected = both[i] if dots[i] < 0 else step[i]
        torch.testing.assert_close(opposing[i], expected, rtol=0, atol=0)
    assert dots[0] < 0 < dots[1]
    with pytest.raises(ValueError, match="sign convention"):
        rescale_parallel(step, direction, 0.5, "positive")


def _linear_problem(directions):
    flow = LinearFlow(gains=(0.9, 1.2), directions=directions)
    gen = torch.Generator().manual_seed(4)
    noise = torch.randn(2, 3, 2, 2, generator=gen, dtype=torch.float64)
    target = 3.0 * torch.randn(2, 3, 2, 2, generator=gen, dtype=torch.float64)
    return flow, flow.encode(["p", "q"], [], 1.0), noise, target


def test_factor_one_is_plain_rectifid_exactly():
    gen = torch.Generator().manual_seed(5)
    flow, cond, noise, target = _linear_problem([torch.randn(1, 3, 2, 2, generator=gen, dtype=torch.float64)] * 2)
    plain = guide(flow, cond, quadratic(target), noise, GuidanceConfig(scale=0.5, iterations=6, ck_mode="one"))
    one = guide(flow, cond, quadratic(target), noise,
                GuidanceConfig(scale=0.5, iterations=6, ck_mode="one", parallel_rescale=1.0, parallel_sign="both"))
    assert torch.equal(plain.latent, one.latent) and plain.losses == one.losses
    assert flow.direction_calls == []  # factor 1 never asks the flow for the prompt direction


@pytest.mark.parametrize("factor", [0.0, 0.5])
def test_solver_rescales_each_window_step_as_computed_by_hand(factor):
    """Two linear windows, L = w ||z_2 - t||^2 with ||g|| < 1: g_1 = 2w(z_2 - t) a_2, g_0 = g_1 a_1."""
    gen = torch.Generator().manual_seed(6)
    dirs = [torch.randn(1, 3, 2, 2, generator=gen, dtype=torch.float64) for _ in range(2)]
    flow, cond, noise, target = _linear_problem(dirs)
    (a1, a2), s, w = flow.gains, 0.5, 0.01
    offsets = [torch.zeros_like(noise), torch.zeros_like(noise)]
    for _ in range(5):
        z1 = a1 * noise + offsets[0]
        z2 = a2 * z1 + offsets[1]
        g1 = 2 * w * (z2 - target) * a2
        g0 = g1 * a1
        for k, g in enumerate((g0, g1)):
            assert float(g.flatten(1).norm(dim=1).max()) < 1
            r = -s * g
            for i in range(2):
                d = dirs[k][0].flatten()
                par = float(r[i].flatten() @ d / (d @ d)) * d
                r[i] = (r[i].flatten() - par + factor * par).view_as(r[i])
            offsets[k] = offsets[k] + r
    expected = a2 * (a1 * noise + offsets[0]) + offsets[1]
    res = guide(flow, cond, quadratic(target, w), noise,
                GuidanceConfig(scale=s, iterations=5, ck_mode="one", parallel_rescale=factor, parallel_sign="both"))
    torch.testing.assert_close(res.latent, expected, rtol=1e-6, atol=1e-6)  # offsets accumulate in float32
    # the directions were taken at the window inputs of each scored rollout
    assert len(flow.direction_calls) == 10
    torch.testing.assert_close(flow.direction_calls[0], noise)


def test_toy_prompt_direction_is_dt_times_the_velocity_difference():
    torch.manual_seed(0)
    flow = DigitFlow(VelocityNet(hidden=32, emb=8), num_windows=4)
    cond = flow.encode(["3", "digit 5"], ["", "1"], 1.0)
    z = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        d = flow.prompt_direction(z, 1, cond)
        v_pos = cfg_velocity(flow.net, z, 0.75, torch.tensor([3, 5]), torch.tensor([10, 1]), 1.0)
        v_neg = cfg_velocity(flow.net, z, 0.75, torch.tensor([10, 1]), torch.tensor([10, 1]), 1.0)
    torch.testing.assert_close(d, -0.25 * (v_pos - v_neg))


@pytest.mark.parametrize("kind", ["sd15", "2rflow"])
def test_sd_prompt_direction_is_the_cfg_half_of_a_single_step_window(kind):
    """One model call per window and a velocity affine in the model output: step(cfg w) = step(negative) + w d."""
    flow = load_flow(tiny_diffusers.cached_folder(kind), device="cpu")
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    w = 3.0
    cond = flow.encode(["a photo of a cat"], ["the"], w)
    with torch.no_grad():
        d = flow.prompt_direction(z, 1, cond)
        negative = flow.step(z, 1, flow.encode(["the"], [], 1.0))
        guided = flow.step(z, 1, cond)
    assert float(d.abs().max()) > 0
    torch.testing.assert_close(guided, negative + w * d, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="set cfg above 1"):
        flow.prompt_direction(z, 0, flow.encode(["a photo"], [], 1.0))
