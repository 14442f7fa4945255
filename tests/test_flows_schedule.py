"""Window math of PeRFlow / Euler flows against independent computations (no models)."""
import math

import numpy as np
import pytest
import torch

from rectifid_core.flows import schedule

SD = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def sd_abar() -> np.ndarray:
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    return np.cumprod(1 - betas)


def test_sd15_gammas_for_four_windows():
    abar = schedule.alphas_cumprod(schedule.betas_from_config(SD))
    gammas = [schedule.window_gamma(abar, k, 4) for k in range(4)]
    assert gammas == pytest.approx([0.2869, 0.4516, 0.6412, 0.8222], abs=1e-3)
    ref = sd_abar()
    # window 0: abar[999] -> abar[749]; last window ends at index 0 (t_e*1000-1 clamped)
    assert gammas[0] == pytest.approx(math.sqrt(ref[999] / ref[749]), rel=1e-9)
    assert gammas[3] == pytest.approx(math.sqrt(ref[249] / ref[0]), rel=1e-9)
    # the solver's per-window c_k = sqrt(1 - gamma^2) quoted in DESIGN.md
    assert [math.sqrt(1 - g * g) for g in gammas] == pytest.approx([0.958, 0.892, 0.767, 0.569], abs=1e-3)


def test_other_beta_schedules():
    linear = schedule.betas_from_config({**SD, "beta_schedule": "linear"})
    assert float(linear[0]) == pytest.approx(0.00085) and float(linear[-1]) == pytest.approx(0.012)
    trained = schedule.betas_from_config({"trained_betas": [0.1, 0.2]})
    assert schedule.alphas_cumprod(trained).tolist() == pytest.approx([0.9, 0.72])
    with pytest.raises(ValueError, match="sigmoid"):
        schedule.betas_from_config({**SD, "beta_schedule": "sigmoid"})


@pytest.mark.parametrize("steps, expected", [
    (4, [[1000], [750], [500], [250]]),
    (8, [[1000, 875], [750, 625], [500, 375], [250, 125]]),
    # remainder goes to the first windows
    (6, [[1000, 875], [750, 625], [500], [250]]),
    # linspace(1, .75, 3, endpoint=False)*1000 = 1000, 916.67, 833.33 -> truncated
    (12, [[1000, 916, 833], [750, 666, 583], [500, 416, 333], [250, 166, 83]]),
])
def test_perflow_timesteps(steps, expected):
    assert schedule.perflow_timesteps(4, steps) == expected


def test_substep_increments_reach_the_next_timestep():
    subs = schedule.perflow_substeps(4, 6)
    assert [(s.window, s.timestep, s.dt) for s in subs] == [
        (0, 1000, pytest.approx(-0.125)), (0, 875, pytest.approx(-0.125)),
        (1, 750, pytest.approx(-0.125)), (1, 625, pytest.approx(-0.125)),
        (2, 500, pytest.approx(-0.25)), (3, 250, pytest.approx(-0.25))]
    assert sum(s.dt for s in subs) == pytest.approx(-1.0)


def test_bad_windows_and_steps_are_rejected():
    with pytest.raises(ValueError, match="steps"):
        schedule.perflow_timesteps(4, 3)
    # 250 sub-steps in a 250-timestep window (997 steps: the first window takes 250) truncate two of them to
    # the same integer timestep; 249 per window (996 steps) stay distinct
    schedule.perflow_timesteps(4, 996)
    with pytest.raises(ValueError, match="same integer model timestep.*use at most 996 steps"):
        schedule.perflow_timesteps(4, 997)
    with pytest.raises(IndexError, match="window index 4"):
        schedule.window_bounds(4, 4)
    with pytest.raises(ValueError, match="steps"):
        schedule.euler_timesteps(0)


def _window_end_by_substeps(z_s, eps, prediction, k, steps, abar_s, abar_e):
    """Run PeRFlow's sub-step rule with a model that always returns `eps`."""
    t_s, t_e = schedule.window_bounds(k, 4)
    z = z_s
    for sub in (s for s in schedule.perflow_substeps(4, steps) if s.window == k):
        v = schedule.perflow_velocity(eps, z, prediction, sub.timestep / 1000, t_s, t_e, abar_s, abar_e)
        z = z + sub.dt * v
    return z


@pytest.mark.parametrize("prediction", ["diff_eps", "ddim_eps"])
@pytest.mark.parametrize("steps", [4, 8, 12])
def test_window_step_matches_closed_form(prediction, steps):
    ref = sd_abar()
    gen = torch.Generator().manual_seed(0)
    z_s = torch.randn(2, 4, 3, 3, generator=gen, dtype=torch.float64)
    eps = torch.randn(2, 4, 3, 3, generator=gen, dtype=torch.float64)
    for k, (i_s, i_e) in enumerate([(999, 749), (749, 499), (499, 249), (249, 0)]):
        abar_s, abar_e = ref[i_s], ref[i_e]
        if prediction == "diff_eps":
            gamma = math.sqrt(abar_s / abar_e)
            expected = z_s / gamma - math.sqrt(1 - gamma**2) / gamma * eps
        else:
            # DDIM: x0 from (z_s, eps) at abar_s, re-noised with the same eps at abar_e
            x0 = (z_s - math.sqrt(1 - abar_s) * eps) / math.sqrt(abar_s)
            expected = math.sqrt(abar_e) * x0 + math.sqrt(1 - abar_e) * eps
        got = _window_end_by_substeps(z_s, eps, prediction, k, steps, abar_s, abar_e)
        # with a window-constant eps, sub-stepping lands exactly on the same straight-line end
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_velocity_window_is_a_straight_line():
    z = torch.ones(1, 4, 2, 2, dtype=torch.float64)
    v = torch.full_like(z, 2.0)
    got = _window_end_by_substeps(z, v, "velocity", 1, 8, 0.5, 0.6)
    torch.testing.assert_close(got, z + (0.5 - 0.75) * v)


def test_euler_timesteps_and_cfg():
    assert schedule.euler_timesteps(4) == [1000.0, 750.0, 500.0, 250.0]
    assert schedule.euler_timesteps(3) == pytest.approx([1000.0, 666.6667, 333.3333])
    uncond, cond = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -2.0])
    torch.testing.assert_close(schedule.cfg_combine(uncond, cond, 7.5), torch.tensor([16.0, -28.0]))
