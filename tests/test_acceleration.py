"""Anderson-accelerated anchored solver: hand-checkable cases and a measured speed-up."""
from __future__ import annotations

import pytest
import torch

from rectifid_core.flows.base import Conditioning, RectifiedFlow
from rectifid_core.guidance import GuidanceConfig, guide
from rectifid_core.solvers import AndersonUpdate, MomentumUpdate, anchored_update


class LinearFlow(RectifiedFlow):
    """z -> a_k * z per window, decode = identity: every gradient is known in closed form."""

    num_windows = 3
    latent_channels = 3
    vae_scale_factor = 1
    device = torch.device("cpu")
    dtype = torch.float64

    def __init__(self, gains: tuple[float, ...] = (0.9, 1.1, 0.8)) -> None:
        self.gains = gains

    def encode(self, prompts, negative_prompts, guidance_scale):
        return Conditioning(batch=len(prompts), guidance_scale=guidance_scale)

    def step(self, z, k, cond):
        return self.gains[k] * z

    def decode(self, z):
        return z

    def window_gammas(self):
        return None


def quadratic(target: torch.Tensor, weight: float = 0.01):
    """Weighted so that ||g|| < 1: the normalization is then inactive and r(x) is affine in x."""
    return lambda image: weight * ((image - target) ** 2).flatten(1).sum(1)


def test_anderson_memory_zero_is_the_anchored_rule() -> None:
    x = [torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)]
    rule = AndersonUpdate(memory=0)
    for _ in range(3):
        r = [torch.randn_like(t) for t in x]
        got = rule(x, r)
        want = anchored_update(x, r)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        x = got


def test_anderson_second_step_is_the_secant_root_of_a_linear_residual() -> None:
    # r(x) = c - a x (the fixed point of x <- x + r(x) is c/a). With memory 1 and no
    # ridge, the second Anderson step is the secant step, exact for a linear residual:
    # x1 = x0 + r0, gamma = r1/(r1 - r0), x2 = x1 + r1 - (x1 - x0 + r1 - r0) * gamma = c/a.
    a, c = 0.3, 2.0
    rule = AndersonUpdate(memory=1, ridge=0.0, max_growth=float("inf"))
    x0 = torch.full((1, 1), 0.5, dtype=torch.float64)
    r = lambda x: c - a * x  # noqa: E731
    x1 = rule([x0], [r(x0)])[0]
    assert float(x1) == pytest.approx(0.5 + (2.0 - 0.15))
    x2 = rule([x1], [r(x1)])[0]
    assert float(x2) == pytest.approx(c / a, rel=1e-12)


def test_anderson_rejects_negative_memory() -> None:
    with pytest.raises(ValueError, match="Anderson memory"):
        AndersonUpdate(memory=-1)


def _run(mode: str, target: torch.Tensor, noise: torch.Tensor, iterations: int, **kw) -> list[float]:
    flow = LinearFlow()
    cond = flow.encode(["x"] * noise.shape[0], [], 1.0)
    cfg = GuidanceConfig(scale=0.5, iterations=iterations, mode=mode, ck_mode="one", **kw)
    return guide(flow, cond, quadratic(target), noise, cfg)


def test_guide_with_anderson_memory_zero_matches_anchored_exactly() -> None:
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    target = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    a = _run("anchored", target, noise, 5)
    b = _run("anchored_anderson", target, noise, 5, anderson_memory=0)
    assert a.losses == b.losses
    torch.testing.assert_close(a.latent, b.latent, rtol=0, atol=0)


def test_anderson_lowers_a_quadratic_faster_and_keeps_batch_images_independent() -> None:
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    target = 3.0 * torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    anchored = _run("anchored", target, noise, 12)
    anderson = _run("anchored_anderson", target, noise, 12, anderson_memory=3)
    assert anderson.losses[-1] < anderson.losses[0]
    # on an affine residual Anderson behaves like GMRES: far below the plain fixed-point iteration
    assert anderson.losses[-1] < 0.01 * anchored.losses[-1]
    alone = _run("anchored_anderson", target[1:], noise[1:], 12, anderson_memory=3)
    torch.testing.assert_close(alone.latent, anderson.latent[1:], rtol=1e-9, atol=1e-9)


def test_anderson_falls_back_to_the_anchored_step_when_residuals_repeat() -> None:
    # Far from the solution the normalized step has constant direction and length: the
    # residual differences vanish and the regularized mix must reduce to the plain step.
    x = [torch.zeros(1, 2, 2, 2)]
    r = [torch.full((1, 2, 2, 2), 0.25)]
    rule = AndersonUpdate(memory=3)
    for _ in range(4):
        x = rule(x, r)
    torch.testing.assert_close(x[0], torch.full((1, 2, 2, 2), 1.0))


def test_momentum_matches_a_hand_computed_heavy_ball() -> None:
    # v1 = r1, x1 = x0 + r1;  v2 = b*r1 + r2, x2 = x1 + v2;  v3 = b*v2 + r3, x3 = x2 + v3
    b = 0.5
    x0 = torch.tensor([[1.0]])
    r1, r2, r3 = torch.tensor([[0.2]]), torch.tensor([[-0.1]]), torch.tensor([[0.4]])
    rule = MomentumUpdate(b)
    x1 = rule([x0], [r1])[0]
    x2 = rule([x1], [r2])[0]
    x3 = rule([x2], [r3])[0]
    assert float(x1) == pytest.approx(1.2)
    assert float(x2) == pytest.approx(1.2 + (0.1 - 0.1))
    assert float(x3) == pytest.approx(1.2 + 0.0 + (0.5 * 0.0 + 0.4))
    with pytest.raises(ValueError, match="momentum"):
        MomentumUpdate(1.0)


def test_guide_with_zero_momentum_matches_anchored_and_momentum_descends_faster() -> None:
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    target = 3.0 * torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    anchored = _run("anchored", target, noise, 8)
    zero = _run("anchored_momentum", target, noise, 8, offset_momentum=0.0)
    assert anchored.losses == zero.losses
    anchored, fast = (_run("anchored", target, noise, 16),
                      _run("anchored_momentum", target, noise, 16, offset_momentum=0.7))
    assert fast.losses[-1] < 0.5 * anchored.losses[-1]
