"""More steps than trained windows: sub-steps inside the checkpoint's windows, never a re-partition."""
import pytest
import torch

import tiny_diffusers
from rectifid_core.flows import load_flow
from rectifid_core.flows.schedule import window_gamma


def test_perflow_steps_split_the_trained_windows_and_share_models():
    flow = load_flow(tiny_diffusers.cached_folder("sd15"))
    eight = flow.with_steps(8)
    assert eight.components is flow.components and flow.with_steps(4) is flow
    assert (flow.num_windows, flow.num_steps, eight.num_windows, eight.num_steps) == (4, 4, 4, 8)
    assert eight.timesteps() == [[1000, 875], [750, 625], [500, 375], [250, 125]]
    assert eight.step_windows() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert eight.window_gammas() == flow.window_gammas()
    # c of every step is the c of its trained window: sqrt(1 - gamma_k^2) from the K=4 schedule
    gammas = [window_gamma(flow.alphas_cumprod, k, 4) for k in range(4)]
    assert eight.anchor_coefficients() == pytest.approx([(1 - g * g) ** 0.5 for g in gammas for _ in (0, 1)])


def test_eight_steps_equal_the_loaded_eight_step_flow():
    """K=4 with 8 steps is the same pass whether asked for at load time or afterwards."""
    folder = tiny_diffusers.cached_folder("sd15")
    late, early = load_flow(folder).with_steps(8), load_flow(folder, steps=8)
    cond = late.encode(["a photo"], [""], 2.0)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    a, b = z, z
    for i in range(8):
        a, b = late.step(a, i, cond), early.step(b, i, cond)
    torch.testing.assert_close(a, b)


def test_perflow_refuses_steps_its_scheduler_cannot_run():
    flow = load_flow(tiny_diffusers.cached_folder("sd15"))
    with pytest.raises(ValueError, match=r"steps \(3\) must be >= num_windows \(4\).*trained with 4 windows"):
        flow.with_steps(3)
    with pytest.raises(ValueError, match="use at most 996 steps"):
        flow.with_steps(1000)


def test_euler_flow_takes_steps_as_its_euler_steps():
    flow = load_flow(tiny_diffusers.cached_folder("2rflow"))
    for n in (1, 8):
        flow_n = flow.with_steps(n)
        assert flow_n.components is flow.components and flow_n.num_steps == flow_n.num_windows == n
        assert flow_n.timesteps() == [1000 * (1 - i / n) for i in range(n)]
        assert flow_n.anchor_coefficients() == [1.0] * n
