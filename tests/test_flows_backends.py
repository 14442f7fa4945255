"""PeRFlow and Euler-velocity backends on tiny diffusers folders, loaded through load_flow.

The window math is checked through the backends' own `step` with a stand-in UNet
whose output is known in closed form; CFG, SDXL conditioning and gradients with
the real tiny models.
"""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import tiny_diffusers
from rectifid_core.flows import EulerVelocityFlow, PeRFlow, load_flow


@pytest.fixture(scope="module")
def folders():
    return {kind: tiny_diffusers.cached_folder(kind) for kind in ("sd15", "sdxl", "2rflow")}


def sd_abar() -> np.ndarray:
    return np.cumprod(1 - np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2)


class StandIn(torch.nn.Module):
    """A UNet-shaped callable: output = fn(sample, timestep); records the timesteps it was called at."""

    def __init__(self, fn):
        super().__init__()
        self.fn, self.calls = fn, []

    def forward(self, sample, timestep, encoder_hidden_states=None, added_cond_kwargs=None):
        self.calls.append(float(timestep[0]))
        return SimpleNamespace(sample=self.fn(sample, float(timestep[0])))


def run_windows(flow, z, cond):
    for i in range(flow.num_steps):
        z = flow.step(z, i, cond)
    return z


def run_window(flow, z, k, cond):
    """The steps of window k (its sub-steps when the flow runs more steps than windows)."""
    for i, window in enumerate(flow.step_windows()):
        if window == k:
            z = flow.step(z, i, cond)
    return z


def test_perflow_loads_with_unknown_scheduler_class_and_is_frozen(folders):
    flow = load_flow(folders["sd15"], device="cpu")
    assert isinstance(flow, PeRFlow) and flow.prediction_type == "diff_eps"
    assert (flow.num_windows, flow.latent_channels, flow.vae_scale_factor) == (4, 4, 2)
    assert flow.window_gammas() == pytest.approx([0.2869, 0.4516, 0.6412, 0.8222], abs=1e-3)
    for module in (flow.components.unet, flow.components.vae, flow.components.text_encoder):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())


def test_diff_eps_window_reaches_the_clean_end_of_each_window(folders):
    """With eps = (z - gamma * target) / sqrt(1 - gamma^2), every window must land on `target`."""
    flow = load_flow(folders["sd15"], device="cpu", steps=8)
    cond = flow.encode(["a photo"], [], 1.0)
    abar = sd_abar()
    target = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    for k, (i_s, i_e) in enumerate([(999, 749), (749, 499), (499, 249), (249, 0)]):
        gamma = math.sqrt(abar[i_s] / abar[i_e])
        noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(10 + k))
        z_s = gamma * target + math.sqrt(1 - gamma**2) * noise
        # PeRFlow's eps is constant along a window's straight line, so sub-steps see the same eps
        line_eps = noise.clone()
        flow.components.unet = StandIn(lambda z, t: line_eps)
        torch.testing.assert_close(run_window(flow, z_s, k, cond), target, rtol=1e-4, atol=1e-4)
        assert flow.components.unet.calls == [1000 - 250 * k, 875 - 250 * k]


def test_ddim_eps_window_is_the_ddim_jump(folders):
    """An exact eps model for a fixed x0: the window end must be sqrt(abar_e) x0 + sqrt(1-abar_e) eps."""
    flow = load_flow(folders["sdxl"], device="cpu")
    assert flow.prediction_type == "ddim_eps"
    cond = flow.encode(["a photo"], [""], 1.0)
    abar = sd_abar()
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))

    def eps_for_x0(sample, t):
        a = float(abar[int(t) - 1])
        return (sample - math.sqrt(a) * x0) / math.sqrt(1 - a)

    flow.components.unet = StandIn(eps_for_x0)
    for k, i_e in enumerate([749, 499, 249, 0]):
        eps = eps_for_x0(z, flow.timesteps()[k][0])
        expected = math.sqrt(abar[i_e]) * x0 + math.sqrt(1 - abar[i_e]) * eps
        z = flow.step(z, k, cond)
        torch.testing.assert_close(z, expected, rtol=1e-4, atol=1e-4)
    assert flow.components.unet.calls == [1000, 750, 500, 250]


def test_velocity_override_and_euler_flow_integrate_a_known_velocity(folders):
    flow = load_flow(folders["sd15"], device="cpu", prediction_type="velocity", steps=6)
    assert flow.prediction_type == "velocity"
    cond = flow.encode(["a photo"], [], 1.0)
    z0 = torch.zeros(1, 4, 8, 8)
    # v(t) = t/1000: PeRFlow integrates sum v(t_i) * dt_i over its sub-steps
    flow.components.unet = StandIn(lambda z, t: torch.full_like(z, t / 1000))
    got = run_windows(flow, z0, cond)
    expected = -(1.0 * .125 + .875 * .125 + .75 * .125 + .625 * .125 + .5 * .25 + .25 * .25)
    torch.testing.assert_close(got, torch.full_like(z0, expected))

    euler = load_flow(folders["2rflow"], device="cpu", steps=3)
    assert isinstance(euler, EulerVelocityFlow) and euler.num_windows == 3 and euler.window_gammas() is None
    cond = euler.encode(["a photo"], [], 1.0)
    euler.components.unet = StandIn(lambda z, t: torch.full_like(z, t / 1000))
    got = run_windows(euler, z0, cond)
    # InstaFlow's sampler: t_i = (1 - i/N) * 1000, z += v / N
    torch.testing.assert_close(got, torch.full_like(z0, (1 + 2 / 3 + 1 / 3) / 3))
    assert euler.components.unet.calls == pytest.approx([1000.0, 2000 / 3, 1000 / 3])


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_cfg_is_uncond_plus_scale_times_difference(folders, name):
    flow = load_flow(folders[name], device="cpu")
    unet = flow.components.unet
    w = 4.0
    cond = flow.encode(["a photo of the cat", "cat"], ["blurry"], w)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = flow.predict(z, 750, cond)
        pos, pos_pooled = flow._encode_texts(["a photo of the cat", "cat"])
        neg, neg_pooled = flow._encode_texts(["blurry", "blurry"])
        t = torch.full((2,), 750.0)
        extra = {}
        if name == "sdxl":
            time_ids = torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]] * 2)
            extra = {"added_cond_kwargs": {"text_embeds": pos_pooled, "time_ids": time_ids}}
        cond_out = unet(z, t, encoder_hidden_states=pos, **extra).sample
        if name == "sdxl":
            extra["added_cond_kwargs"]["text_embeds"] = neg_pooled
        uncond_out = unet(z, t, encoder_hidden_states=neg, **extra).sample
    torch.testing.assert_close(got, uncond_out + w * (cond_out - uncond_out), rtol=1e-4, atol=1e-5)
    assert (cond_out - uncond_out).abs().max() > 1e-4  # the check above is not vacuous


def test_sdxl_conditioning_penultimate_concat_pooled_and_zero_negatives(folders):
    flow = load_flow(folders["sdxl"], device="cpu")
    c = flow.components
    cond = flow.encode(["a photo", "cat"], ["", "blurry"], 5.0)
    embeds, pooled = cond.tensors["embeds"], cond.tensors["pooled"]
    assert embeds.shape == (4, 77, 64) and pooled.shape == (4, 32)
    with torch.no_grad():
        ids = [tok(["a photo"], padding="max_length", max_length=77, return_tensors="pt").input_ids
               for tok in (c.tokenizer, c.tokenizer_2)]
        h1 = c.text_encoder(ids[0], output_hidden_states=True).hidden_states[-2]
        out2 = c.text_encoder_2(ids[1], output_hidden_states=True)
    torch.testing.assert_close(embeds[2:3], torch.cat([h1, out2.hidden_states[-2]], dim=-1))
    torch.testing.assert_close(pooled[2:3], out2.text_embeds)
    # empty negative prompt -> zeros (force_zeros_for_empty_prompt); a real one is encoded
    assert embeds[0].abs().max() == 0 and pooled[0].abs().max() == 0
    assert embeds[1].abs().max() > 0 and pooled[1].abs().max() > 0


@pytest.mark.parametrize("name", ["sd15", "sdxl", "2rflow"])
def test_gradient_flows_from_decoded_image_to_the_latent(folders, name):
    flow = load_flow(folders[name], device="cpu", dtype="bf16" if name == "sdxl" else "fp32")
    if name == "sdxl":  # the fp32 VAE that force_upcast asks for, under a bf16 UNet
        assert flow.components.vae.dtype == torch.float32 and flow.components.unet.dtype == torch.bfloat16
    cond = flow.encode(["a photo"], [""], 2.0)
    z = torch.randn(flow.latent_shape(1, 16, 16), generator=torch.Generator().manual_seed(5))
    z = z.to(flow.dtype).requires_grad_(True)
    image = flow.decode(flow.step(z, flow.num_windows - 1, cond))
    assert image.shape == (1, 3, 16, 16) and image.dtype == torch.float32
    assert 0 <= image.min() and image.max() <= 1
    (image * torch.linspace(0, 1, 16)).sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad.float()).all() and z.grad.abs().sum() > 0


def test_prompt_and_batch_errors(folders):
    flow = load_flow(folders["sd15"], device="cpu")
    with pytest.raises(ValueError, match="2 negative prompts for 3 prompts"):
        flow.encode(["a", "b", "c"], ["x", "y"], 2.0)
    with pytest.raises(ValueError, match="non-empty list"):
        flow.encode("a photo", [], 2.0)
    cond = flow.encode(["a", "b"], ["x"], 2.0)
    with pytest.raises(ValueError, match="latent batch 1 does not match the conditioning batch 2"):
        flow.step(torch.zeros(1, 4, 8, 8), 0, cond)
    with pytest.raises(IndexError, match="step index 4 is out of range for 4 steps"):
        flow.step(torch.zeros(2, 4, 8, 8), 4, cond)
