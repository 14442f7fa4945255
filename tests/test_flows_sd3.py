"""SD3.x backend against diffusers' own StableDiffusion3Pipeline and FlowMatchEulerDiscreteScheduler on tiny folders.

Both run in float64 from the same folder, each loaded by its own code.
"""
from __future__ import annotations

import pytest
import torch

from rectifid_core.flows import SD3Flow
from rectifid_core.guidance import memory_family
from tiny_transformer_flows import (build_tiny_sd3, cached_folder, count_forward_calls, float64_flow_and_pipeline,
                                    gradient_of_rollout, sample, seeded_noise)

PROMPT = "a photo of a person"


@pytest.fixture(scope="module")
def turbo():
    return float64_flow_and_pipeline(cached_folder("sd3"))


def test_flow_type_defaults_and_family(turbo) -> None:
    flow, _ = turbo
    assert isinstance(flow, SD3Flow) and flow.num_steps == 4 and flow.window_gammas() is None
    assert flow.anchor_coefficients() == [1.0] * 4
    assert (flow.defaults().width, flow.defaults().cfg_scale) == (1024, 1.0)
    assert memory_family(flow) == "sd35"
    with pytest.raises(ValueError, match="multiple of 4"):
        flow.latent_shape(1, 32, 34)


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_each_step_is_the_schedulers_euler_step(turbo, cfg) -> None:
    flow, pipe = turbo
    cond = flow.encode([PROMPT], ["a cat"], cfg)
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPT, None, None, negative_prompt="a cat",
                                                                   do_classifier_free_guidance=True)
    pipe(PROMPT, height=32, width=32, num_inference_steps=4, guidance_scale=cfg, output_type="latent",
         latents=seeded_noise(flow))
    scheduler = pipe.scheduler
    for i, t in enumerate(scheduler.timesteps):
        z = seeded_noise(flow, seed=10 + i)
        with torch.no_grad():
            v, v_neg = (pipe.transformer(hidden_states=z, timestep=t.expand(1), encoder_hidden_states=e,
                                         pooled_projections=p, return_dict=False)[0]
                        for e, p in ((embeds, pooled), (negative, negative_pooled)))
            ours = flow.step(z, i, cond)
        if cfg > 1:
            v = v_neg + cfg * (v - v_neg)
        scheduler._step_index = i
        expected = scheduler.step(v, t, z, return_dict=False)[0]
        torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)
        assert (ours - z).abs().max() > 1e-3


@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_rollout_and_image_equal_the_pipelines(turbo, cfg) -> None:
    flow, pipe = turbo
    noise = seeded_noise(flow, seed=2)
    z, image = sample(flow, flow.encode([PROMPT], ["a cat"], cfg), noise)
    kwargs = dict(negative_prompt="a cat", height=32, width=32, num_inference_steps=4, guidance_scale=cfg,
                  latents=noise)
    torch.testing.assert_close(z, pipe(PROMPT, output_type="latent", **kwargs).images, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(image, pipe(PROMPT, output_type="pt", **kwargs).images.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps", [1, 3, 8])
def test_with_steps_uses_the_pipelines_sigmas(turbo, steps) -> None:
    flow, pipe = turbo
    mine = flow.with_steps(steps)
    pipe(PROMPT, height=32, width=32, num_inference_steps=steps, guidance_scale=1.0, output_type="latent")
    assert mine.sigmas(32, 32) == pytest.approx(pipe.scheduler.sigmas.tolist(), abs=0)
    assert mine.num_steps == steps and len(mine.sigmas(32, 32)) == steps + 1


def test_a_folder_without_t5_runs_as_the_pipeline_does(tmp_path) -> None:
    # a folder saved without T5, as the pipeline is used without it (text_encoder_3=None, tokenizer_3=None)
    flow, pipe = float64_flow_and_pipeline(build_tiny_sd3(tmp_path / "no_t5", with_t5=False), text_encoder_3=None,
                                           tokenizer_3=None)
    assert flow.components.text_encoder_3 is None and pipe.text_encoder_3 is None
    noise = seeded_noise(flow, seed=3)
    z, _ = sample(flow, flow.encode([PROMPT], [], 1.0), noise)
    expected = pipe(PROMPT, height=32, width=32, num_inference_steps=4, guidance_scale=1.0, latents=noise,
                    output_type="latent").images
    torch.testing.assert_close(z, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("split_cfg", [False, True])
def test_gradients_equal_with_block_recomputation_and_split_cfg(turbo, monkeypatch, split_cfg) -> None:
    flow, _ = turbo
    cond = flow.encode([PROMPT], ["a cat"], 2.0)
    noise = seeded_noise(flow, seed=4)
    stored = gradient_of_rollout(flow, cond, noise)
    calls = count_forward_calls(flow.components.transformer.transformer_blocks[0], monkeypatch)
    flow.set_memory_saving(True, split_cfg=split_cfg)
    try:
        recomputed = gradient_of_rollout(flow, cond, noise)
    finally:
        flow.set_memory_saving(False)
    halves = 2 if split_cfg else 1  # split: each CFG half is its own call
    assert len(calls) == 2 * halves * flow.num_steps
    assert stored.abs().max() > 0
    torch.testing.assert_close(recomputed, stored, rtol=1e-10, atol=1e-12)


def test_prompt_direction_is_the_difference_of_the_two_halves(turbo) -> None:
    flow, _ = turbo
    cond = flow.encode([PROMPT], ["a cat"], 2.0)
    z = seeded_noise(flow, seed=5)
    halves = [flow.encode([text], [], 1.0) for text in (PROMPT, "a cat")]
    with torch.no_grad():
        direction = flow.prompt_direction(z, 1, cond)
        expected = flow.step(z, 1, halves[0]) - flow.step(z, 1, halves[1])
    torch.testing.assert_close(direction, expected, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="set cfg above 1"):
        flow.prompt_direction(z, 1, halves[0])
