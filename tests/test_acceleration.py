"""Momentum-accelerated anchored solver: hand-checkable cases and a measured speed-up."""
from __future__ import annotations

import pytest
import torch

from rectifid_core.flows.base import Conditioning, RectifiedFlow
from rectifid_core.guidance import GuidanceConfig, GuidanceResult, guide
from rectifid_core.solvers import MomentumUpdate


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


def _run(mode: str, target: torch.Tensor, noise: torch.Tensor, iterations: int, **kw) -> GuidanceResult:
    flow = LinearFlow()
    cond = flow.encode(["x"] * noise.shape[0], [], 1.0)
    cfg = GuidanceConfig(scale=0.5, iterations=iterations, mode=mode, ck_mode="one", **kw)
    return guide(flow, cond, quadratic(target), noise, cfg)


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


def test_momentum_keeps_batch_images_independent() -> None:
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    target = 3.0 * torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    both = _run("anchored_momentum", target, noise, 6, offset_momentum=0.5)
    alone = _run("anchored_momentum", target[1:], noise[1:], 6, offset_momentum=0.5)
    torch.testing.assert_close(alone.latent, both.latent[1:], rtol=1e-9, atol=1e-9)
