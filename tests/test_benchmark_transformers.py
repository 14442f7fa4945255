"""Benchmark presets flux and sd35: the real architectures, and a scaled-down variant through the guidance loop."""
from __future__ import annotations

import pytest
import torch

from rectifid_core.benchmark.__main__ import PRESETS
from rectifid_core.benchmark.calibrate import extrapolate
from rectifid_core.benchmark.predict import GIB, predict
from rectifid_core.benchmark.transformer_models import build_transformer_flow, transformer_config, transformer_width
from rectifid_core.guidance import ACTIVATION_BYTES, GuidanceConfig, estimate_guidance_bytes, guide, memory_family
from rectifid_core.objectives.base import ObjectiveOutput


@pytest.mark.parametrize("family, billions", [("flux", 11.9), ("sd35", 8.1)])
def test_real_configs_have_the_published_sizes(family, billions) -> None:
    """FLUX.1-schnell is a 12B (11.9B) transformer, SD3.5 Large an 8.1B one (their model cards)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    cls = FluxTransformer2DModel if family == "flux" else SD3Transformer2DModel
    with torch.device("meta"):
        model = cls(**transformer_config(family))
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=0.05)
    assert PRESETS[family]["width_scale"] == 1.0 and PRESETS[family]["cfg_scale"] == 1.0
    assert family in ACTIVATION_BYTES


def test_width_extrapolation_reads_the_line_at_the_real_width() -> None:
    # sd35 at scale 0.25 rounds 9.5 heads to 10: the line runs through the effective widths
    assert transformer_width("sd35", 0.25) == pytest.approx(10 / 38)
    assert extrapolate([0.125, 0.25], [3.0, 5.0]) == pytest.approx(17.0)


@pytest.mark.parametrize("family", ["flux", "sd35"])
def test_scaled_down_preset_runs_the_guidance_loop_in_every_memory_mode(family) -> None:
    flow = build_transformer_flow(family, 0.05, text_layers=1)
    assert memory_family(flow) == family
    assert flow.components.transformer.config.num_layers == transformer_config(family)["num_layers"]  # full depth
    cond = flow.encode(["a photo of a person"], [""], flow.defaults().cfg_scale)
    noise = torch.randn(flow.latent_shape(1, 32, 32), generator=torch.Generator().manual_seed(0))

    def objective(image: torch.Tensor) -> ObjectiveOutput:  # cheaper than the preset's iResNet-100 on a shared CPU
        return ObjectiveOutput(loss=100 * (image - 0.5).pow(2).flatten(1).mean(1), diagnostics={})

    runs = [guide(flow, cond, objective, noise, GuidanceConfig(scale=1.0, iterations=1, memory=memory))
            for memory in ("store", "checkpoint")]
    assert runs[0].losses[0] > 0
    torch.testing.assert_close(runs[1].latent, runs[0].latent, rtol=1e-4, atol=1e-5)


def test_gpu_prediction_for_flux_and_sd35_counts_the_resident_weights() -> None:
    report = predict("flux", 1024, 4, torch.bfloat16, None, 1 / 3)
    weights = report["weights_gib"]
    assert weights["transformer"] * GIB == pytest.approx(2 * 11.9e9, rel=0.01)  # bf16
    assert "text_encoders" not in weights and report["encode_peak_gib"] > sum(weights.values()) + 8  # T5-XXL
    need = estimate_guidance_bytes((1, 16, 128, 128), 4, "flux", torch.bfloat16)
    for mode, row in report["modes"].items():
        assert row["peak_gib"] * GIB == pytest.approx(sum(weights.values()) * GIB + need[mode], rel=1e-9)
    small = predict("sd35", 768, 4, torch.bfloat16, None, 1 / 3)
    assert small["modes"]["store"]["activations_gib"] < predict("sd35", 1024, 4, torch.bfloat16, None,
                                                               1 / 3)["modes"]["store"]["activations_gib"]
