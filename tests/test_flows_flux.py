"""FLUX.1 backend against diffusers' own FluxPipeline and FlowMatchEulerDiscreteScheduler on tiny folders.

The pipeline loads the same folder with its own code; both run in float64, so what
differences remain come from the scheduler's float32 upcast of the sample.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rectifid_core.flows import FluxFlow
from rectifid_core.flows.flux import pack_latents, unpack_latents
from rectifid_core.flows.stable_diffusion import decoder_parts
from rectifid_core.guidance import GuidanceConfig, guide, memory_family
from rectifid_core.objectives.base import ObjectiveOutput
from tiny_transformer_flows import (build_tiny_flux, cached_folder, count_forward_calls, float64_flow_and_pipeline,
                                    gradient_of_rollout, sample, seeded_noise)

PROMPT = "a photo of a person"


@pytest.fixture(scope="module")
def schnell():
    return float64_flow_and_pipeline(cached_folder("flux"))


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    """A guidance-distilled transformer (FLUX.1-dev style) with dev's dynamic-shifting scheduler."""
    return float64_flow_and_pipeline(build_tiny_flux(tmp_path_factory.mktemp("flux") / "dev", guidance_embeds=True),
                                     steps=4)


def test_flow_type_defaults_and_family(schnell) -> None:
    flow, _ = schnell
    assert isinstance(flow, FluxFlow) and flow.num_steps == 4 and flow.window_gammas() is None
    assert flow.anchor_coefficients() == [1.0] * 4
    assert (flow.defaults().width, flow.defaults().height, flow.defaults().cfg_scale) == (1024, 1024, 1.0)
    assert memory_family(flow) == "flux"
    with pytest.raises(ValueError, match="multiple of 4"):
        flow.latent_shape(1, 30, 32)


def test_each_step_is_the_schedulers_euler_step(schnell) -> None:
    flow, pipe = schnell
    cond = flow.encode([PROMPT], [], 1.0)
    # the pipeline's own prompt features, ids, timesteps and scheduler
    embeds, pooled, text_ids = pipe.encode_prompt(PROMPT, None, max_sequence_length=256)
    pipe(PROMPT, height=32, width=32, num_inference_steps=4, guidance_scale=0.0, max_sequence_length=256,
         output_type="latent", latents=pack_latents(seeded_noise(flow)))
    scheduler = pipe.scheduler
    image_ids = pipe._prepare_latent_image_ids(1, 8, 8, "cpu", torch.float64)
    for i, t in enumerate(scheduler.timesteps):
        z = seeded_noise(flow, seed=10 + i)
        packed = pipe._pack_latents(z, 1, 4, 16, 16)
        with torch.no_grad():
            v = pipe.transformer(hidden_states=packed, timestep=t.expand(1).to(torch.float64) / 1000, guidance=None,
                                 pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids,
                                 img_ids=image_ids, return_dict=False)[0]
            ours = flow.step(z, i, cond)
        scheduler._step_index = i
        expected = scheduler.step(v, t, packed, return_dict=False)[0]
        torch.testing.assert_close(pack_latents(ours), expected, rtol=1e-6, atol=1e-6)
        assert (ours - z).abs().max() > 1e-3  # the step moves the latent


def test_rollout_and_image_equal_the_pipelines(schnell) -> None:
    flow, pipe = schnell
    noise = seeded_noise(flow)
    z, image = sample(flow, flow.encode([PROMPT], [], 1.0), noise)
    kwargs = dict(height=32, width=32, num_inference_steps=4, guidance_scale=0.0, max_sequence_length=256,
                  latents=pack_latents(noise))
    latents = pipe(PROMPT, output_type="latent", **kwargs).images
    torch.testing.assert_close(z, unpack_latents(latents, 16, 16), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(image, pipe(PROMPT, output_type="pt", **kwargs).images.float(), rtol=1e-5, atol=1e-5)
    assert flow.sigmas(32, 32) == pytest.approx(pipe.scheduler.sigmas.tolist(), abs=0)


def test_cfg_above_one_is_the_pipelines_true_cfg(schnell) -> None:
    flow, pipe = schnell
    noise = seeded_noise(flow, seed=3)
    z, _ = sample(flow, flow.encode([PROMPT], ["a cat"], 2.5), noise)
    latents = pipe(PROMPT, negative_prompt="a cat", true_cfg_scale=2.5, height=32, width=32, num_inference_steps=4,
                   guidance_scale=0.0, max_sequence_length=256, latents=pack_latents(noise),
                   output_type="latent").images
    torch.testing.assert_close(z, unpack_latents(latents, 16, 16), rtol=1e-5, atol=1e-5)
    plain, _ = sample(flow, flow.encode([PROMPT], ["a cat"], 1.0), noise)
    assert (plain - z).abs().max() > 1e-3  # the negative half changed something


@pytest.mark.parametrize("steps", [1, 2, 6])
def test_with_steps_uses_the_pipelines_sigmas(schnell, dev, steps) -> None:
    for flow, pipe in (schnell, dev):
        mine = flow.with_steps(steps)
        assert mine.num_steps == steps and mine.components is flow.components
        # 64 px: dev's dynamic shift depends on the token count
        pipe(PROMPT, height=64, width=64, num_inference_steps=steps, max_sequence_length=32, output_type="latent")
        assert mine.sigmas(64, 64) == pytest.approx(pipe.scheduler.sigmas.tolist(), abs=0)
    assert dev[0].sigmas(64, 64) != pytest.approx(dev[0].sigmas(32, 32))  # mu follows the size


def test_distilled_guidance_is_passed_as_the_pipeline_does(dev) -> None:
    flow, pipe = dev
    assert flow.defaults().cfg_scale == 3.5 and not flow.uses_cfg(3.5)
    noise = seeded_noise(flow, seed=4)
    z, _ = sample(flow, flow.encode([PROMPT], [], 3.5), noise)
    latents = pipe(PROMPT, height=32, width=32, num_inference_steps=4, guidance_scale=3.5, max_sequence_length=512,
                   latents=pack_latents(noise), output_type="latent").images
    torch.testing.assert_close(z, unpack_latents(latents, 16, 16), rtol=1e-5, atol=1e-5)


def test_gradients_reach_the_noise_and_equal_with_block_recomputation(schnell, monkeypatch) -> None:
    flow, _ = schnell
    cond = flow.encode([PROMPT], [], 1.0)
    noise = seeded_noise(flow, seed=5)
    stored = gradient_of_rollout(flow, cond, noise)
    transformer = flow.components.transformer
    blocks = [count_forward_calls(transformer.transformer_blocks[0], monkeypatch),
              count_forward_calls(transformer.single_transformer_blocks[0], monkeypatch),
              count_forward_calls(decoder_parts(flow.components.vae)[0].conv1, monkeypatch)]  # inside a recomputed resnet
    flow.set_memory_saving(True)
    try:
        assert flow.recomputes_step and flow.recomputes_decode
        recomputed = gradient_of_rollout(flow, cond, noise)
    finally:
        flow.set_memory_saving(False)
    # each block ran once more, in the backward: once per step (the decoder once), never twice
    assert [len(c) for c in blocks] == [2 * flow.num_steps, 2 * flow.num_steps, 2]
    assert stored.abs().max() > 0
    torch.testing.assert_close(recomputed, stored, rtol=1e-10, atol=1e-12)
    assert not any(p.requires_grad for p in flow.components.transformer.parameters())


def test_guidance_memory_modes_give_the_same_result(schnell) -> None:
    flow, _ = schnell
    cond = flow.encode([PROMPT], [], 1.0)
    target = torch.linspace(0, 1, 3, dtype=torch.float32).view(1, 3, 1, 1)

    def objective(image: torch.Tensor) -> ObjectiveOutput:
        return ObjectiveOutput(loss=(image - target).pow(2).flatten(1).mean(1) * 100, diagnostics={})

    noise = seeded_noise(flow, seed=6)
    runs = [guide(flow, cond, objective, noise, GuidanceConfig(scale=1.0, iterations=2, memory=memory))
            for memory in ("store", "recompute_vae", "checkpoint")]
    assert runs[0].losses[1] < runs[0].losses[0]  # guidance lowers the loss
    for run in runs[1:]:
        np.testing.assert_allclose(run.losses, runs[0].losses, rtol=1e-9)
        torch.testing.assert_close(run.latent, runs[0].latent, rtol=1e-9, atol=1e-10)
    assert not flow.memory_saving  # guide switches it off again


def test_encoding_falls_back_to_the_cpu_when_the_encoders_do_not_fit(schnell, monkeypatch) -> None:
    flow, _ = schnell
    expected = flow.encode([PROMPT], [], 1.0).tensors
    t5 = flow.components.text_encoder_2
    forward, failed = t5.forward, []

    def out_of_memory_once(*args, **kwargs):
        if not failed:
            failed.append(1)
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(*args, **kwargs)

    monkeypatch.setattr(t5, "forward", out_of_memory_once)
    tensors = flow.encode([PROMPT], [], 1.0).tensors
    assert failed and tensors.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(tensors[name], expected[name], rtol=0, atol=0)
    assert all(e.device.type == "cpu" for e in flow.components.text_encoders())
