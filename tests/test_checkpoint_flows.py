"""RectifID Checkpoint Flow: PeRFlow / 2-RF checkpoints read by ComfyUI's loader, sampled as our backends sample them.

One fresh interpreter (ComfyUI's modules must not leak into the suite) loads a tiny SD1.5 UNet through
ComfyUI's own loader and runs every case; the checks below judge its numbers against our diffusers
backends on the same weights. Tolerance: the models run in float32, as ComfyUI samples (its CPU
convolutions have no float64 kernel, and comfy/model_base.py _apply_model casts the UNet output to float32
before calculate_denoised anyway); diffusers' and ComfyUI's UNet code then agree on the same weights to
~4e-7 relative per step, so a step is held to 5e-6, while the nearest wrong answer (the UNet at timestep
999 instead of 1000, what ComfyUI's EPS sampling would pass) is ~4e-2 off.
"""
from __future__ import annotations

import functools
import json
import math

import pytest

from rectifid_core.flows.denoiser_rules import CheckpointFlow
from rectifid_core.flows.schedule import perflow_substeps, perflow_window
from test_nodes_comfyui import run_with_comfyui

# one interpreter per group keeps each under the helper's 5-minute limit on a busy CPU; steps 0 = the 4 windows
GROUPS = {"diff_eps": [("perflow", "diff_eps", 0), ("perflow", "diff_eps", 5), ("2-rf", "auto", 3)],
          "ddim_eps+velocity": [("perflow", "ddim_eps", 0), ("perflow", "ddim_eps", 5), ("perflow", "velocity", 0),
                                ("perflow", "velocity", 5)]}
CASES = [(group, i) for group, cases in GROUPS.items() for i in range(len(cases))]
# float32 UNets (as ComfyUI samples) in two implementations, diffusers' and ComfyUI's: ~4e-7 measured per step
STEP_RTOL = 5e-6


@functools.cache
def comfy_results(group: str) -> dict:
    return run_with_comfyui(f"""
        import checkpoint_flow_check
        print(json.dumps(checkpoint_flow_check.run(pack, {json.dumps(GROUPS[group])}, refusals={group == "diff_eps"})))
    """)


@pytest.fixture
def comfy_run() -> dict:
    return comfy_results("diff_eps")


@pytest.fixture(params=CASES, ids=lambda c: "-".join(map(str, GROUPS[c[0]][c[1]])))
def case(request) -> dict:
    group, i = request.param
    return comfy_results(group)["cases"][i]


def test_every_step_equals_the_diffusers_backend(case):
    """From the backend's own states; the nearest wrong model (timestep 999 for 1000) is >1000x further off."""
    assert len(case["step_errors"]) == len(case["sigmas"]) - 1
    assert max(case["step_errors"]) < STEP_RTOL, case["step_errors"]
    assert case["timestep_999_change"] > 1000 * STEP_RTOL


def test_the_unet_sees_the_backends_timesteps(case):
    """Exactly (float32 as both pass them): t = 1000 first, 666.67 for 2-RF at 3 steps, PeRFlow's sub-steps."""
    assert case["timesteps_comfy"] == case["timesteps_backend"] == pytest.approx(case["backend_timesteps"], abs=1e-4)
    assert case["timesteps_comfy"][0] == 1000.0


def test_the_rollout_and_its_gradient_equal_the_backend(case):
    assert case["start_error"] == 0.0  # CONST noise scaling at sigma 1 is the noise itself
    assert max(case["rollout_errors"]) < 5 * STEP_RTOL, case["rollout_errors"]
    assert case["grad_norm"] > 0 and case["grad_error"] < 5 * STEP_RTOL, case["grad_error"]


def test_anchor_coefficients_equal_the_backend(case):
    assert case["anchor_ours"] == pytest.approx(case["anchor_backend"], rel=1e-12, abs=1e-12)


def test_sigmas_are_the_timesteps_over_1000(case):
    steps = case["steps"] or 4
    assert len(case["sigmas"]) == steps + 1 and case["sigmas"][-1] == 0.0 and case["sigmas_dtype"] == "torch.float32"
    assert case["sigmas"][:-1] == pytest.approx([t / 1000 for t in case["backend_timesteps"]], rel=1e-7)


def test_comfyuis_own_euler_sampler_gives_the_flows_sample(case):
    """Any sampler's Euler step over the patched MODEL is the flow's step (float32 sigmas, so the rollout's tolerance)."""
    assert case["euler_error"] < 5 * STEP_RTOL


def test_comfyuis_eps_sampling_could_not_pass_timestep_1000(comfy_run):
    """Why the node patches the model sampling: SD's discrete EPS sampling rounds every sigma to 0..999."""
    assert comfy_run["model_sampling"] == "ModelSamplingDiscrete"
    assert comfy_run["eps_timestep_at_sigma_max"] == 999.0


@pytest.mark.parametrize("key, words", [
    ("steps_below_windows", ["steps (3) must be >= num_windows (4)"]),
    ("unknown_flow_type", ["unknown flow type 'perflow-xl'", "perflow, 2-rf, instaflow"]),
    ("eps_for_2rf", ["2-rf predicts velocity", "keep auto"]),
    ("flow_matching_model", ["not the discrete diffusion schedule", "FLUX"]),
    ("patched_twice", ["before any other sampling patch"]),
    ("foreign_sigmas", ["connect the SIGMAS output of 'RectifID Checkpoint Flow'"]),
    ("too_few_sigmas", ["got 2 steps", "4 steps"]),
])
def test_bad_inputs_are_refused_clearly(comfy_run, key, words):
    message = comfy_run["errors"][key]
    assert message.startswith("ValueError"), message
    assert all(w in message for w in words), message


def test_auto_prediction_follows_the_checkpoints_parameterization(comfy_run):
    """As our folder loader: SD1.x eps -> diff_eps, v-prediction (SD2.1 PeRFlow) -> velocity; 2-RF is Euler velocity."""
    assert comfy_run["auto_predictions"] == {"eps": "diff_eps", "v_prediction": "velocity", "2-rf": "euler_velocity"}


def test_comfyuis_simple_scheduler_matches_perflows_four_windows(comfy_run):
    assert comfy_run["simple_sigmas"] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0], abs=1e-7)


@pytest.mark.parametrize("windows", [1, 2, 3, 4, 5])
def test_window_lookup_agrees_with_the_substeps(windows):
    """perflow_window(t) is the window whose linspace produced the sub-step (PeRFlow's scheduler), for every step count."""
    for steps in range(windows, 40):
        try:
            subs = perflow_substeps(windows, steps)
        except ValueError:
            continue
        assert [perflow_window(s.timestep / 1000, windows) for s in subs] == [s.window for s in subs], steps


def test_rule_steps_are_euler_steps_at_the_timesteps():
    """Closed form: with x0 = x - sigma * v and v constant, the rollout moves by -v (time 1 -> 0) for any step count."""
    import torch

    for steps in (4, 7):
        flow = CheckpointFlow("velocity", steps=steps)
        rule = flow(flow.sigmas)
        v = torch.full((1, 4, 2, 2), 0.3, dtype=torch.float64)
        z = torch.zeros_like(v)
        for i in range(rule.num_steps):
            z = rule.step(z, i, lambda x, s: flow.denoised(v, x, s))
        torch.testing.assert_close(z, -v, rtol=0, atol=1e-15)
        assert math.isclose(sum(a - b for a, b in zip(flow.sigmas, flow.sigmas[1:])), 1.0)


def test_model_timestep_snaps_float32_sigmas_and_passes_others_through():
    """2-RF at 11 steps: float32 sigma 10/11 times 1000 rounds to a float32 one ulp off the backend's 909.0909 timestep."""
    import torch

    flow = CheckpointFlow("euler_velocity", steps=11)
    sigmas32 = torch.tensor(flow.sigmas[:-1], dtype=torch.float32)
    backend = torch.tensor(flow.timesteps, dtype=torch.float32)  # what EulerVelocityFlow hands its UNet
    assert not torch.equal((sigmas32.double() * 1000).float(), backend)  # unsnapped, the UNet would see another t
    assert torch.equal(flow.model_timestep(sigmas32).float(), backend)
    other = torch.tensor([0.8732], dtype=torch.float64)  # a foreign sigma keeps sigma * 1000
    assert float(flow.model_timestep(other)) == pytest.approx(873.2, abs=1e-9)


def test_eps_windows_need_the_schedule_and_bad_coefficients_are_refused():
    from rectifid_core.flows.denoiser import EulerSigmas

    with pytest.raises(ValueError, match="need the diffusion schedule"):
        CheckpointFlow("diff_eps")
    with pytest.raises(ValueError, match="unknown prediction type 'eps'"):
        CheckpointFlow("eps")
    with pytest.raises(ValueError, match="3 anchor coefficients for 2 steps"):
        EulerSigmas([1.0, 0.5, 0.0], [1.0, 1.0, 1.0])
