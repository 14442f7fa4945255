"""The RectifID SAMPLER on models loaded by ComfyUI 0.8.0's own loaders ($COMFYUI_PATH), under inference mode.

The checks run in fresh interpreters (tests/comfy_sampler_checks.py), so ComfyUI's modules do not make the rest of
the suite believe it runs inside ComfyUI; each returns its measurements and the tests below judge them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import comfy_executor as ce
import tiny_comfy_models as tcm

# The gradients are compared with our own diffusers backends (SD3Flow / FluxFlow) built over diffusers modules holding
# the same weights in float64. ComfyUI computes the model's timestep and rounds its output (and so the output's
# gradient) to float32 (model_base._apply_model), and its 'normal' SD3 sigmas come from its own float32 computation:
# sigma_1 differs from diffusers' scheduler by one float32 ulp (6e-8), 4e-7 of the first Euler step's dt (0.142),
# and it is the second step's timestep (our backend takes its sigmas from the scheduler only). Everything else runs
# in float64 on both sides: measured <= 7e-7 per step and 9.5e-7 through the chain (with the LoRA), so 2e-6 leaves
# rounding room and nothing more.
SD3_FLOAT32 = 2e-6
# ComfyUI's FLUX rope kernel takes fp16/bf16/fp32 only, so that model and its VAE run in float32 against a float64
# backend of the same weights: float32 rounding (~6e-8 per operation) through 4 steps and the decoder (measured
# <= 1.6e-6 through the chain).
FLUX_FLOAT32 = 1e-5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    ce.comfyui_path()  # skips, saying where it looked, before anything is built
    root = tmp_path_factory.mktemp("comfy-models")
    tcm.build_sd3(root / "sd3.safetensors")
    tcm.build_vae(root / "vae.safetensors")
    tcm.build_flux(root / "flux.safetensors")
    return root


def run_checks(models, group: str) -> dict:
    comfyui = ce.comfyui_path()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(ce.REPO / "tests" / "comfy_sampler_checks.py"), str(comfyui),
                           str(models), group], capture_output=True, text=True, env=env, cwd=str(ce.REPO), timeout=600)
    assert proc.returncode == 0, f"the ComfyUI checks failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def gradients(models):
    return run_checks(models, "sd3_gradients")


@pytest.fixture(scope="module")
def flux(models):
    return run_checks(models, "flux_gradients")


@pytest.fixture(scope="module")
def sampling(models):
    return run_checks(models, "sd3_sampling")


@pytest.mark.parametrize("variant", ["plain", "lora"])
def test_gradients_through_comfyuis_model_and_vae_equal_our_sd3_backend(gradients, variant):
    """(i)/(ii) d(loss)/d(noise) per step and through the 4-step chain + VAE decode, and the latent after each step,
    via UNETLoader/VAELoader's functions and the adapter, equal our SD3Flow (rollout + decode) over diffusers' SD3
    transformer and AutoencoderKL with the same float64 weights; the LoRA applied by LoraLoaderModelOnly's code path
    equals the backend with the LoRA merged into the weights."""
    assert gradients["sigmas"] == pytest.approx(gradients["backend_sigmas"], abs=1e-7)  # 'normal' = SD3.5's, shift 3
    result = gradients[variant]
    assert len(result["steps"]) == 4 and len(result["states"]) == 4
    assert all(norm > 0.1 for norm in result["step_norms"]) and result["chain_norm"] > 1.0  # not vacuous
    assert max(result["steps"]) < SD3_FLOAT32 and max(result["states"]) < SD3_FLOAT32
    assert result["chain"] < SD3_FLOAT32 and result["image"] < SD3_FLOAT32


def test_lora_changes_the_gradients(gradients):
    assert gradients["lora_changes_chain"] > 1e-2


def test_flux_gradients_through_comfyuis_rope_and_in_place_blocks_equal_our_flux_backend(flux):
    """(i) FLUX.1-schnell-shaped: ComfyUI's Flux model (its rope op has no backward, its blocks add residuals in place
    onto LayerNorm inputs) through the adapter equals our FluxFlow over diffusers' FluxTransformer2DModel (gradients,
    per-step latents, image); the rope is ComfyUI's own again afterwards."""
    assert flux["model"] == "Flux" and flux["sigmas"] == [1.0, 0.75, 0.5, 0.25, 0.0]  # 'simple' = schnell's sigmas
    assert flux["backend_sigmas"] == flux["sigmas"]
    result = flux["comparison"]
    assert all(norm > 0.1 for norm in result["step_norms"]) and result["chain_norm"] > 1.0
    assert max(result["steps"]) < FLUX_FLOAT32 and max(result["states"]) < FLUX_FLOAT32
    assert result["chain"] < FLUX_FLOAT32 and result["image"] < FLUX_FLOAT32
    assert flux["rope_module"] == "comfy_kitchen" and flux["rope_restored"]


def test_flux_blocks_need_both_fixes(flux):
    """What the adapter works around, as ComfyUI 0.8.0 is: its rope op has no backward, and its blocks add residuals
    in place onto the inputs their LayerNorms saved."""
    errors = flux["without_fixes"]
    assert "no autograd formula" in errors["kitchen_rope"]
    assert "modified by an inplace operation" in errors["no_norm_copies"]


def test_guided_sampling_through_sampler_custom_advanced_improves_the_face_objective(sampling):
    """(iv) The real SamplerCustomAdvanced node runs the SAMPLER end to end under inference mode; the guided result
    scores better than the unguided (N = 0) one, which is ComfyUI's Euler sampling up to rounding."""
    loss = sampling["loss"]
    assert sampling["plain_vs_euler"] < 1e-5
    assert loss["plain"] == pytest.approx(loss["euler"], abs=1e-4)
    assert loss["guided"] < loss["plain"] - 0.1
    report = sampling["report"].splitlines()
    assert report[0].startswith("settings: 4 steps") and "3 iterations" in report[0] and "(auto)" in report[0]
    assert report[1].startswith("person: similarity")
    assert sampling["checkpoint_vs_store"] < 1e-4  # recomputing in the backward gives the same iterate


def test_one_box_node_is_the_sampler_inside_comfyuis_guider(sampling):
    """(iv) 'RectifID Sample (ComfyUI model)' = CFGGuider + the scheduler's sigmas + the SAMPLER, same seed."""
    assert sampling["one_box_vs_custom_advanced"] == 0.0
    assert sampling["one_box_image_shape"] == [1, 64, 64, 3]
    assert sampling["one_box_report"].startswith("settings: 4 steps") and "1 iteration," in sampling["one_box_report"]


def test_ordinary_sampling_afterwards_is_bit_identical(sampling):
    """(iii) The weights were inference tensors before and normal ones after (converted in place), and ComfyUI's
    euler through SamplerCustomAdvanced gives exactly the latent it gave before the guided runs."""
    assert sampling["inference_weights_before"] and not sampling["inference_weights_after"]
    assert sampling["bit_identical"]


def test_progress_per_iteration_and_cancel(sampling):
    """(v) ComfyUI's progress bar moves once per guidance iteration (then the final latent completes ComfyUI's own
    bar); ComfyUI's Cancel stops the run with its own exception and the flag is consumed."""
    assert sampling["progress"][:3] == [[1, 3], [2, 3], [3, 3]]
    assert sampling["cancelled"] and sampling["cancel_progress"] == [1] and not sampling["flag_left"]


@pytest.mark.parametrize("case, words", [
    ("no_vae", ["ValueError", "connect 'Load VAE'"]),
    ("no_objective", ["TypeError", "subject node"]),
    ("wrong_channels", ["16 channels but the VAE decodes 4"]),
    ("rising_sigmas", ["RectifID sigmas", "decrease strictly"]),
])
def test_bad_inputs_are_refused_clearly(sampling, case, words):
    """(vi) No VAE, no objective, a VAE of another latent size, sigmas that do not decrease."""
    message = sampling["errors"][case]
    assert message is not None, f"{case} was accepted"
    assert all(w in message for w in words), message
