"""Momentum-accelerated anchored solver: hand-checkable cases and a measured speed-up."""
from __future__ import annotations

import pytest
import torch

from rectifid_core.guidance import GuidanceConfig, GuidanceResult, guide
from rectifid_core.solvers import MomentumUpdate
from linear_flow import LinearFlow, quadratic


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
