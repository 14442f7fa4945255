"""The core pieces the nodes and the CLI share: personalize(), similarity reports, crops, plots."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import comfy_executor as ce
from rectifid_core.flows import load_flow
from rectifid_core.guidance import GuidanceConfig, guide, initial_noise
from rectifid_core.objectives.base import ObjectiveOutput
from rectifid_core.pipeline import (PersonalizeSettings, box_mask, personalize, square_crop, subject_similarities,
                                    unique_labels)
from rectifid_core.plots import PALETTE, draw_boxes, line_chart, plot_history


@pytest.fixture(scope="module")
def flow():
    root = ce.tiny_models_dir("diffusers")
    return load_flow(root / "diffusers" / ce.MODEL_NAMES["diffusers"], dtype="fp32", device="cpu")


def brightness(image: torch.Tensor) -> ObjectiveOutput:
    """Lower loss for brighter images; similarity = mean brightness per image."""
    mean = image.mean(dim=(1, 2, 3))
    return ObjectiveOutput(100.0 * (1.0 - mean), {"similarity": [float(m) for m in mean.detach()]})


def test_personalize_equals_the_solver_called_by_hand(flow):
    settings = PersonalizeSettings(prompt="a photo", negative_prompt="blurry", width=16, height=16, seed=5,
                                   batch_size=1, cfg_scale=2.0, guidance=GuidanceConfig(scale=1.0, iterations=1))
    result = personalize(flow, brightness, settings, labels=["light"])
    cond = flow.encode(["a photo"], ["blurry"], 2.0)
    noise = initial_noise((1, 4, 8, 8), 5)
    expected = guide(flow, cond, brightness, noise, GuidanceConfig(scale=1.0, iterations=1))
    torch.testing.assert_close(result.images, expected.image)
    torch.testing.assert_close(result.latent, expected.latent)
    assert result.losses == pytest.approx(expected.losses)
    assert list(result.similarities) == ["light"] and len(result.similarities["light"]) == 1
    final_mean = float(expected.image.mean(dim=(1, 2, 3)).mean())
    assert result.final_similarities["light"] == pytest.approx(final_mean, abs=1e-5)
    assert result.final_loss == pytest.approx(float(100 * (1 - expected.image.mean(dim=(1, 2, 3))).sum()), rel=1e-5)


def test_guidance_improves_the_objective(flow):
    base = dict(prompt="a photo", width=16, height=16, seed=3, cfg_scale=1.0)
    plain = personalize(flow, brightness, PersonalizeSettings(**base, guidance=GuidanceConfig(iterations=0)))
    guided = personalize(flow, brightness, PersonalizeSettings(**base, guidance=GuidanceConfig(scale=30.0,
                                                                                               iterations=3)))
    assert guided.final_loss < plain.final_loss - 0.3
    assert guided.losses[0] > guided.losses[1] > guided.losses[2] > guided.final_loss
    assert guided.losses[0] == pytest.approx(plain.final_loss, rel=1e-4)  # iteration 0 sees the unguided image


def test_steps_override_leaves_the_loaded_flow_alone(flow):
    settings = PersonalizeSettings(prompt="a photo", width=16, height=16, cfg_scale=1.0, num_steps=8,
                                   guidance=GuidanceConfig(iterations=0))
    result = personalize(flow, brightness, settings)
    assert (flow.num_windows, flow.num_steps, result.settings.num_steps) == (4, 4, 8)
    assert [t[0] for t in flow.timesteps()] == [1000, 750, 500, 250]
    eight = flow.with_steps(8)
    cond = eight.encode(["a photo"], [""], 1.0)
    expected = guide(eight, cond, brightness, initial_noise((1, 4, 8, 8), 0), GuidanceConfig(iterations=0))
    torch.testing.assert_close(result.latent, expected.latent)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="prompt is empty"):
        PersonalizeSettings(prompt="  ").validate()
    with pytest.raises(ValueError, match="CFG scale"):
        PersonalizeSettings(prompt="x", cfg_scale=0.5).validate()
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        PersonalizeSettings(prompt="x", num_steps=0).validate()


def test_subject_similarities_shapes():
    assert subject_similarities({"similarity": [0.2, 0.4]}, ["dog"]) == {"dog": pytest.approx(0.3)}
    multi = {"similarity": [[0.5, None], [0.7, 0.1]]}
    assert subject_similarities(multi, ["a", "b"]) == {"a": pytest.approx(0.6), "b": pytest.approx(0.1)}
    assert subject_similarities({"similarity": [None]}, ["x"]) == {"x": None}
    assert subject_similarities({"similarity": [[0.5, 0.5]]}) == {"subject 1": 0.5, "subject 2": 0.5}
    assert subject_similarities({}) == {}
    assert unique_labels(["person", "person", "", "dog"]) == ["person #1", "person #2", "subject 3", "dog"]


def test_square_crop_centres_the_box_and_repeats_the_border():
    xs = torch.arange(64, dtype=torch.float32).view(1, 1, 1, 64).expand(1, 3, 48, 64) / 64
    crop = square_crop(xs, (20.0, 10.0, 30.0, 20.0), padding=0.5, size=20)  # 20 px square around x=25, y=15
    assert crop.shape == (1, 3, 20, 20)
    row = crop[0, 0, 10] * 64
    # crop pixel j is centred on x = 15.5 + j, where the image (pixel i centred on i + 0.5) reads 15 + j
    torch.testing.assert_close(row, torch.arange(15.0, 35.0, 1.0), atol=1e-3, rtol=0)
    edge = square_crop(xs, (0.0, 0.0, 10.0, 10.0), padding=0.5, size=20) * 64  # spans x = -5 .. 15
    torch.testing.assert_close(edge[0, 0, 10, :7], torch.tensor([0.0, 0, 0, 0, 0, 0, 1]), atol=1e-3, rtol=0)
    mask = box_mask(48, 64, (20.0, 10.0, 30.0, 20.0))
    assert float(mask.sum()) == 100 and float(mask[15, 25]) == 1 and float(mask[5, 5]) == 0


def _line_rows(image: np.ndarray, color: tuple[int, int, int], column: int) -> np.ndarray:
    rgb = (image * 255).round().astype(int)
    hit = np.all(np.abs(rgb[:, column] - np.array(color)) < 8, axis=-1)
    return np.flatnonzero(hit)


def test_plot_draws_decreasing_loss_downwards_and_one_line_per_subject():
    plot = plot_history([10.0, 8.0, 5.0, 1.0], {"alice": [0.1, 0.3, 0.5, 0.9], "bob": [0.2, 0.2, 0.3, None]},
                        width=400, height=300)
    assert plot.shape == (1, 3, 300, 400) and 0 <= float(plot.min()) and float(plot.max()) <= 1
    image = plot[0].permute(1, 2, 0).numpy()
    top, bottom = image[:150], image[150:]
    left, right = 58 + 3, 400 - 12 - 3
    assert _line_rows(top, PALETTE[0], left).mean() < _line_rows(top, PALETTE[0], right).mean()  # loss falls
    assert _line_rows(bottom, PALETTE[0], left).mean() > _line_rows(bottom, PALETTE[0], right).mean()  # sim rises
    assert len(_line_rows(bottom, PALETTE[1], left)) > 0  # bob drawn in the second colour
    with pytest.raises(ValueError, match="too small"):
        plot_history([1.0], width=50, height=50)


def test_draw_boxes_marks_the_chosen_box_red():
    image = torch.zeros(3, 64, 64)
    out = draw_boxes(image, [(4, 4, 20, 20), (30, 30, 60, 60)], chosen=1)
    rgb = (out.permute(1, 2, 0).numpy() * 255).round()
    assert tuple(rgb[45, 30]) == (230, 30, 30)  # left edge of the chosen box
    assert tuple(rgb[12, 4]) == (170, 170, 170)  # left edge of the other box
    assert tuple(rgb[40, 40]) == (0, 0, 0)  # inside untouched


def test_line_chart_draws_every_series_in_its_own_colour():
    series = {f"s{i}": [float(i), float(i) + 1.0] for i in range(len(PALETTE))}
    image = np.asarray(line_chart(series, "chart", size=(400, 300)), dtype=np.float32) / 255.0
    image = image[25:]  # below the title and tick text, whose anti-aliased edges can match a grey
    left, right = 58 + 12, 400 - 12 - 160 - 12  # the plot's two ends; the legend is in its own column
    for i, color in enumerate(PALETTE):
        rows_left, rows_right = _line_rows(image, color, left), _line_rows(image, color, right)
        assert len(rows_left) and len(rows_right), f"series {i} not drawn"
        assert rows_left.mean() > rows_right.mean()  # each series rises left to right
