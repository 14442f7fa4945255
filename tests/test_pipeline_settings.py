"""Auto settings from the flow and the objective, warnings from what the solver could not do, cancel per step."""
from __future__ import annotations

import json

import pytest
import torch

import tiny_diffusers
from rectifid_core.flows import load_flow
from rectifid_core.flows.base import Conditioning, FlowDefaults, RectifiedFlow
from rectifid_core.guidance import GuidanceConfig, guide
from rectifid_core.objectives.base import ObjectiveOutput
from rectifid_core.pipeline import PersonalizeSettings, auto_dtype, personalize, resolve_settings


class Kind:
    """An objective that only declares what it steers (resolve_settings never calls it)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind


class Several:
    def __init__(self, *kinds: str) -> None:
        self.subjects = [Kind(k) for k in kinds]


# (width, height, CFG) of the authors' scripts: single_person.py l.46/l.50 (PeRFlow SD1.5), l.47/l.51 with the
# SD2.1 velocity checkpoint of l.44-45, single_person_sdxl.py l.42/l.45, single_person.py l.39/l.50 (2-RF)
@pytest.mark.parametrize("folder, prediction, expected", [
    ("sd15", "auto", (512, 512, 3.0)), ("sd15", "velocity", (768, 768, 4.5)), ("sdxl", "auto", (1024, 1024, 1.0)),
    ("2rflow", "auto", (512, 512, 1.5))])
def test_size_and_cfg_follow_the_flow(folder, prediction, expected):
    flow = load_flow(tiny_diffusers.cached_folder(folder), prediction_type=prediction)
    settings = PersonalizeSettings(prompt="a photo of a person")
    resolved = resolve_settings(settings, flow, Kind("face"))
    assert (resolved.width, resolved.height, resolved.cfg_scale) == expected
    assert resolved.num_steps == 4 and settings.width is None and settings.guidance.scale is None  # a copy
    given = resolve_settings(PersonalizeSettings(prompt="x", width=64, cfg_scale=2.0, num_steps=8), flow, Kind("face"))
    assert (given.width, given.height, given.cfg_scale, given.num_steps) == (64, expected[1], 2.0, 8)


# s: single_person.py l.211 / single_person_sdxl.py l.209 `--guidance` 1. (faces), single_object.py l.194 2. (objects);
# multi_person_perflow.ipynb SGD lr 1, multi_object_perflow.ipynb lr 2
@pytest.mark.parametrize("objective, scale", [(Kind("face"), 1.0), (Kind("subject"), 2.0), (Several("face", "face"), 1.0),
                                              (Several("subject", "subject"), 2.0), (lambda image: image.sum(), 1.0)])
def test_guidance_scale_follows_the_objective(objective, scale):
    flow = load_flow(tiny_diffusers.cached_folder("sd15"))
    assert resolve_settings(PersonalizeSettings(prompt="x"), flow, objective).guidance.scale == scale
    fixed = PersonalizeSettings(prompt="x", guidance=GuidanceConfig(scale=0.5))
    assert resolve_settings(fixed, flow, objective).guidance.scale == 0.5


class LineFlow(RectifiedFlow):
    """z -> z + h per step (no model), a decoder that overflows like fp16 past |z| > 5, and a call counter."""

    latent_channels, vae_scale_factor = 1, 1

    def __init__(self, num_windows: int = 2) -> None:
        self.num_windows, self.device, self.dtype = num_windows, torch.device("cpu"), torch.float32
        self.calls = 0

    def encode(self, prompts, negative_prompts, guidance_scale):
        return Conditioning(len(prompts), guidance_scale)

    def step(self, z, i, cond):
        self.calls += 1
        return z + 0.1

    def decode(self, z):
        image = torch.sigmoid(z).repeat(1, 3, 1, 1)
        return torch.where(z.abs().repeat(1, 3, 1, 1) > 5, torch.full_like(image, float("inf")), image)

    def window_gammas(self):
        return None

    def defaults(self):
        return FlowDefaults(4, 4, 1.0, "test")


def brighter(missing_per_iteration=None, final_missing=None):
    """Loss falls as the image brightens; reports `missing` (C1) per evaluation from the given lists."""
    calls = []

    def objective(image: torch.Tensor) -> ObjectiveOutput:
        calls.append(1)
        i = len(calls) - 1
        missing = (missing_per_iteration[i] if missing_per_iteration and i < len(missing_per_iteration)
                   else final_missing)
        return ObjectiveOutput(100 * (1 - image.mean(dim=(1, 2, 3))),
                               {} if missing is None else {"missing": missing})
    return objective


def test_an_overflowing_last_update_falls_back_to_the_last_scored_iterate():
    flow = LineFlow()
    cond = flow.encode(["x"], [], 1.0)
    noise = torch.zeros(1, 1, 4, 4)
    seen = []
    # s = 40: one normalized step moves the 16-pixel latent by 40 * c / 4 = 10 per pixel, past the overflow at 5
    result = guide(flow, cond, brighter(), noise, GuidanceConfig(scale=40.0, iterations=1),
                   callback=lambda info: seen.append(info))
    assert torch.isfinite(result.image).all() and torch.isfinite(result.latent).all()
    torch.testing.assert_close(result.latent, seen[-1].latent)  # the iterate scored at iteration 1
    torch.testing.assert_close(result.latent, torch.full_like(noise, 0.2))  # = the unguided sample here
    assert len(result.warnings) == 1 and "non-finite image" in result.warnings[0]
    assert "scored at iteration 1" in result.warnings[0]
    small = guide(flow, cond, brighter(), noise, GuidanceConfig(scale=1.0, iterations=1))
    assert small.warnings == [] and float(small.latent.mean()) > 0.2  # a step that stays finite is kept

    report = personalize(flow, brighter(), PersonalizeSettings(prompt="x", guidance=GuidanceConfig(scale=40.0,
                                                                                                   iterations=1)))
    assert report.warnings == result.warnings


def test_a_non_finite_unguided_sample_is_an_error():
    flow = LineFlow()
    with pytest.raises(RuntimeError, match="non-finite latent or image without guidance"):
        guide(flow, flow.encode(["x"], [], 1.0), brighter(), torch.full((1, 1, 4, 4), 9.0),
              GuidanceConfig(iterations=0))


def test_subjects_that_were_never_steered_are_reported():
    # batch of 2, two subjects: subject 2 missing in image 1 in every iteration, subject 1 missing in image 2 once,
    # and subject 2 again missing from the final image 1
    per_iteration = [[[1], []], [[1], [0]], [[1], []]]
    settings = PersonalizeSettings(prompt="x", batch_size=2, guidance=GuidanceConfig(scale=0.1, iterations=3))
    result = personalize(LineFlow(), brighter(per_iteration, [[1], []]), settings, labels=["person", "dog"])
    assert result.warnings == [
        "subject 'person' (1) was not found in 1 of 3 iterations of image 2 (those iterations did not steer it)",
        "subject 'dog' (2) was not found in 3 of 3 iterations of image 1 and was not steered; name the subject in "
        "the prompt (e.g. 'a photo of a person'), check that the reference shows it clearly, or try another seed",
        "subject 'dog' (2) is not found in the final image 1; name the subject in the prompt (e.g. 'a photo of a "
        "person'), check that the reference shows it clearly, or try another seed"]
    history = json.loads(json.dumps(result.history()))
    assert history["warnings"] == result.warnings
    assert history["settings"]["num_steps"] == 2 and history["settings"]["guidance"]["scale"] == 0.1

    single = personalize(LineFlow(), brighter([[[0]]] * 2, [[]]),
                         PersonalizeSettings(prompt="x", guidance=GuidanceConfig(iterations=2)))
    assert single.warnings[0].startswith("subject 1 was not found in 2 of 2 iterations and was not steered")
    assert len(single.warnings) == 1
    steered = personalize(LineFlow(), brighter([[[]]] * 2, [[]]),
                          PersonalizeSettings(prompt="x", guidance=GuidanceConfig(iterations=2)))
    assert steered.warnings == []


class Cancel(Exception):
    pass


def test_interrupt_is_checked_before_every_step_and_cancels_within_one_model_call():
    flow = LineFlow(num_windows=3)
    checks = []
    settings = PersonalizeSettings(prompt="x", guidance=GuidanceConfig(iterations=2))
    personalize(flow, brighter(), settings, interrupt=lambda: checks.append(flow.calls))
    # 2 guided passes + the final pass, 3 steps each; every check comes right before a model call
    assert checks == list(range(9)) and flow.calls == 9

    flow = LineFlow(num_windows=3)

    def press_at_fifth_step():
        if flow.calls == 4:
            raise Cancel

    with pytest.raises(Cancel):
        personalize(flow, brighter(), settings, interrupt=press_at_fifth_step)
    assert flow.calls == 4  # the second iteration stopped after one of its three model calls


@pytest.mark.parametrize("device, flow_type, expected", [
    ("cpu", "flux", "fp32"), ("cuda", "perflow", "fp16"), ("cuda", "2-rf", "fp16"), ("cuda", "flux", "bf16"),
    ("cuda", "sd3", "bf16"),
])
def test_auto_dtype_gives_flux_and_sd3_bfloat16_on_a_gpu(device, flow_type, expected):
    """Their model cards load them in bf16 (T5 overflows fp16); the SD UNets keep the paper's fp16."""
    assert auto_dtype(device, flow_type) == expected
