"""c_k of the anchored update per prediction type, against an independent numpy computation."""
import math

import numpy as np
import pytest

import tiny_diffusers
from rectifid_core.flows import load_flow
from rectifid_core.guidance import anchor_coefficients


def _sd_abar() -> np.ndarray:
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    return np.cumprod(1.0 - betas)


def _ends(k: int, K: int = 4) -> tuple[float, float]:
    abar = _sd_abar()
    t_s, t_e = (K - k) / K, (K - k - 1) / K
    return abar[int(round(t_s * 1000)) - 1], abar[max(int(round(t_e * 1000)) - 1, 0)]


def test_diff_eps_is_sqrt_one_minus_gamma_squared():
    flow = load_flow(tiny_diffusers.cached_folder("sd15"), prediction_type="diff_eps")
    # DESIGN.md: SD1.5, K=4 -> 0.958, 0.892, 0.767, 0.569
    assert anchor_coefficients(flow, "per_window") == pytest.approx([0.958, 0.892, 0.767, 0.569], abs=1e-3)


def test_ddim_eps_follows_the_sdxl_script():
    flow = load_flow(tiny_diffusers.cached_folder("sd15"), prediction_type="ddim_eps")
    expected = []
    for k in range(4):
        s, e = _ends(k)
        expected.append((math.sqrt(1 - e) + math.sqrt(e / s * (1 - s))) * math.sqrt(s / e))
    assert anchor_coefficients(flow, "per_window") == pytest.approx(expected, rel=1e-6)
    assert expected[0] == pytest.approx(1.2763, abs=1e-3)


def test_velocity_and_euler_flows_use_one():
    assert anchor_coefficients(load_flow(tiny_diffusers.cached_folder("sd15"), prediction_type="velocity"),
                               "per_window") == [1.0] * 4
    euler = load_flow(tiny_diffusers.cached_folder("2rflow"))
    assert anchor_coefficients(euler, "per_window") == [1.0] * euler.num_windows
    assert anchor_coefficients(euler, "legacy") == [0.95796674] * euler.num_windows
