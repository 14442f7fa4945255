"""The toy digits task on the shipped weights: the solver must raise held-out identity."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rectifid_core.guidance import GuidanceConfig, initial_noise
from rectifid_core.toy import benchmark, train
from rectifid_core.toy.data import augment, load_split
from rectifid_core.toy.flow import euler_sample, parse_class
from rectifid_core.toy.models import NULL_CLASS, load_weights, to_gray
from rectifid_core.toy.objective import DigitIdentityObjective, evaluate
from rectifid_core.toy.task import DEFAULT_SCALES, load_models, pick_references, run


@pytest.fixture(scope="module")
def models():
    return load_models()


def test_prompts_parse_to_classes():
    assert [parse_class(p) for p in ["3", "digit 7", "a 0", " Digit 9 "]] == [3, 7, 0, 9]
    assert parse_class("", allow_empty=True) == NULL_CLASS
    with pytest.raises(ValueError, match="'a cat'"):
        parse_class("a cat")


def test_missing_weights_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_weights("feature", tmp_path)


def test_flow_windows_are_euler_steps_of_the_shipped_net(models):
    flow = models.flow
    cond = flow.encode(["digit 3", "5"], ["", "digit 8"], 2.0)
    noise = initial_noise((2, 1, 8, 8), 0)
    with torch.no_grad():
        z = noise
        for k in range(flow.num_windows):
            z = flow.step(z, k, cond)
        # the row with the empty negative is plain CFG against the null class
        ref = euler_sample(flow.net, noise[:1], torch.tensor([3]), torch.tensor([NULL_CLASS]), 2.0, 4)
    torch.testing.assert_close(z[:1], ref)
    image = flow.decode(z)
    assert image.shape == (2, 3, 8, 8) and image.min() >= 0 and image.max() <= 1
    torch.testing.assert_close(image[:, 0], image[:, 2])


def test_objective_is_100_one_minus_cosine(models):
    split = load_split()
    refs, other = split.held_images[:4], split.held_images[4:8]
    objective = DigitIdentityObjective(models.feature, refs)
    out = objective(other.repeat(1, 3, 1, 1))
    cos = F.cosine_similarity(models.feature(to_gray(other)), models.feature(to_gray(refs)))
    torch.testing.assert_close(out.loss, 100 * (1 - cos))
    assert out.diagnostics["similarity"] == pytest.approx(cos.tolist(), abs=1e-6)
    assert objective(refs.repeat(1, 3, 1, 1)).loss.abs().max() < 1e-3


def test_networks_see_style_and_class(models):
    """Both networks tell a re-drawn copy of a digit from other held-out digits of its class."""
    split = load_split()
    refs, labels = pick_references(split, 3)
    redrawn = augment(refs, torch.Generator().manual_seed(5), strength=0.5)
    others = torch.cat([refs[10:], refs[:10]])  # same classes, other images
    assert evaluate(models.evaluator, refs, refs, labels)["correct"].mean() > 0.9
    for embed in (lambda x: models.evaluator(x)[0], models.feature):
        same = F.cosine_similarity(embed(redrawn), embed(refs)).mean()
        other = F.cosine_similarity(embed(others), embed(refs)).mean()
        assert same > 0.9 and other < same - 0.1, (same, other)


def test_guidance_raises_held_out_identity_and_keeps_the_prompt(models):
    refs, labels = pick_references(models.split, 1)
    base = run(models, refs, labels, GuidanceConfig(iterations=0)).image
    res = run(models, refs, labels, GuidanceConfig(scale=DEFAULT_SCALES["anchored"], iterations=10))
    before = evaluate(models.evaluator, base, refs, labels)
    after = evaluate(models.evaluator, res.image, refs, labels)
    assert res.losses[-1] < res.losses[0]
    assert after["identity"].mean() > before["identity"].mean() + 0.05, (before["identity"], after["identity"])
    assert (after["identity"] > before["identity"]).float().mean() >= 0.7
    assert after["correct"].mean() >= before["correct"].mean() - 0.1


def test_scripts_write_outside_the_package_unless_asked(tmp_path):
    args = benchmark.parse_args([])
    assert benchmark.output_dir(args) == benchmark.DEFAULT_OUT and not benchmark.DEFAULT_OUT.is_absolute()
    assert benchmark.output_dir(benchmark.parse_args(["--update-shipped"])) == benchmark.RESULTS_DIR
    for argv in (["--update-shipped", "--out", str(tmp_path)], ["--update-shipped", "--weights", str(tmp_path)]):
        with pytest.raises(SystemExit):
            benchmark.output_dir(benchmark.parse_args(argv))
    assert not train.DEFAULT_OUT.is_absolute()
    with pytest.raises(SystemExit, match="not both"):  # refused before any training starts
        train.main(["--update-shipped", "--out", str(tmp_path)])


def test_benchmark_runs_end_to_end_on_a_tiny_plan(tmp_path):
    """The one command, shrunk: every output is written to --out and the shipped results are left alone."""
    shipped = {p: p.stat().st_mtime_ns for p in benchmark.RESULTS_DIR.iterdir()}
    report = benchmark.main(["--out", str(tmp_path), "--per-class", "1", "--iterations", "12", "--robust-iterations",
                             "10", "--budget", "10", "--subsets", "0", "--seeds", "1234"])
    assert {p.name for p in tmp_path.iterdir()} == {"benchmark.json", "benchmark.md", "RESULTS.md", "curves.png",
                                                    "conflict.png", "samples.png", "conflict_samples.png"}
    assert {p: p.stat().st_mtime_ns for p in benchmark.RESULTS_DIR.iterdir()} == shipped
    rows = report["flows"]["flow"]["table"]["rows"]
    # the curve's entry N is what a run with N iterations returns: rerun anchored at N=10 and compare
    models = load_models()
    refs, labels = pick_references(models.split, 1)
    config = GuidanceConfig(iterations=10, **rows["anchored"]["config"])
    direct = evaluate(models.evaluator, run(models, refs, labels, config).image, refs, labels)
    assert rows["anchored"]["at"][10]["identity"] == pytest.approx(float(direct["identity"].mean()), abs=1e-6)
    assert "parallel 0 (opposing)" in (tmp_path / "RESULTS.md").read_text()
