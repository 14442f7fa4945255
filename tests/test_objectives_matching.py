"""Assignment of detections to references, and the multi-subject combiner's bookkeeping."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from rectifid_core.objectives import Candidate, MultiSubjectObjective, assign_subjects


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_known_permutation_is_recovered(n):
    rng = np.random.default_rng(n)
    for _ in range(5):
        perm = rng.permutation(n)  # candidate perm[j] is reference j
        cost = rng.uniform(0.5, 1.0, (n, n))
        cost[perm, np.arange(n)] = rng.uniform(0.0, 0.4, n)
        pairs = assign_subjects(cost)
        assert sorted(pairs) == sorted((int(perm[j]), j) for j in range(n))


def _brute_force(cost):
    m, n = cost.shape
    best = np.inf
    k = min(m, n)
    for rows in itertools.permutations(range(m), k):
        for cols in itertools.combinations(range(n), k):
            best = min(best, cost[list(rows), list(cols)].sum())
    return best


@pytest.mark.parametrize("shape", [(2, 2), (3, 3), (5, 5), (4, 2), (2, 4), (5, 3)])
def test_assignment_cost_equals_brute_force(shape):
    rng = np.random.default_rng(sum(shape))
    for _ in range(4):
        cost = rng.uniform(0, 100, shape)
        pairs = assign_subjects(cost)
        assert len(pairs) == min(shape)
        assert len({i for i, _ in pairs}) == len({j for _, j in pairs}) == len(pairs)
        assert sum(cost[i, j] for i, j in pairs) == pytest.approx(_brute_force(cost))


def test_bad_cost_matrix():
    assert assign_subjects(np.zeros((0, 3))) == []
    with pytest.raises(ValueError, match="2-D"):
        assign_subjects(np.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        assign_subjects(np.array([[np.nan]]))


class ColourSubject:
    """A reference that is a colour: candidates are image regions (given boxes),
    loss = squared distance of the region's mean colour to the reference colour."""

    kind = "subject"

    def __init__(self, colour, boxes):
        self.colour = torch.tensor(colour)
        self.boxes = boxes
        self.proposal_key = ("colours", tuple(map(tuple, boxes)))
        self.feature_key = "mean-colour"
        self.embeds = 0

    def propose(self, image, subjects, max_candidates):
        return [Candidate(b, 1.0, "subject") for b in self.boxes][:max_candidates], {"found": len(self.boxes)}

    def embed(self, image, candidates):
        self.embeds += 1
        return torch.stack([image[0, :, int(c.box[1]) : int(c.box[3]), int(c.box[0]) : int(c.box[2])].mean((1, 2)) for c in candidates])

    def candidate_losses(self, features):
        d = (features - self.colour).pow(2).sum(-1)
        return d, 1 - d


def _image(colours):
    img = torch.zeros(1, 3, 8, 8 * len(colours))
    for k, c in enumerate(colours):
        img[0, :, :, 8 * k : 8 * k + 8] = torch.tensor(c)[:, None, None]
    return img


def test_combiner_assigns_weights_and_reports_missing():
    red, green, blue = (1.0, 0, 0), (0, 1.0, 0), (0, 0, 1.0)
    boxes = [(0, 0, 8, 8), (8, 0, 16, 8), (16, 0, 24, 8)]
    subjects = [ColourSubject(c, boxes) for c in (red, green, blue)]
    img = _image([blue, red, green]).requires_grad_(True)
    multi = MultiSubjectObjective(subjects, weights=[1.0, 2.0, 3.0])
    out = multi(img)
    assert out.diagnostics["assignment"] == [[1, 2, 0]]
    assert out.loss.item() == pytest.approx(0.0)
    assert subjects[0].embeds == 1  # one shared feature pass for all three references
    # move the green region towards blue: the weighted loss is 2 * distance
    img2 = _image([blue, red, (0, 0.5, 0.5)]).requires_grad_(True)
    out = multi(img2)
    assert out.loss.item() == pytest.approx(2.0 * 0.5, abs=1e-6)
    (g,) = torch.autograd.grad(out.loss.sum(), img2)
    assert g[0, :, :, 16:].abs().sum() > 0 and g[0, :, :, :16].abs().sum() == 0
    # fewer regions than references: the worst-placed reference is missing
    two = [ColourSubject(c, boxes[:2]) for c in (red, green, blue)]
    out = MultiSubjectObjective(two)(_image([blue, red]))
    assert out.diagnostics["assignment"] == [[1, None, 0]] and out.diagnostics["missing"] == [[1]]
    assert out.diagnostics["similarity"][0][1] is None


def test_combiner_validates_input():
    s = ColourSubject((1.0, 0, 0), [(0, 0, 8, 8)])
    with pytest.raises(ValueError, match="at least one"):
        MultiSubjectObjective([])
    with pytest.raises(ValueError, match="2 weights for 1"):
        MultiSubjectObjective([s], weights=[1, 2])
    with pytest.raises(ValueError, match=">= 0"):
        MultiSubjectObjective([s], weights=[-1])
    with pytest.raises(TypeError, match="cannot be matched"):
        MultiSubjectObjective([object()])
    with pytest.raises(ValueError, match=r"\[B,3,H,W\], got \(3, 8, 8\)"):
        MultiSubjectObjective([s])(torch.rand(3, 8, 8))


def test_weights_do_not_decide_who_is_who():
    """A lightly weighted reference must not grab a region that looks like another reference."""
    red, blue = (1.0, 0, 0), (0, 0, 1.0)
    boxes = [(0, 0, 8, 8)]
    subjects = [ColourSubject(red, boxes), ColourSubject(blue, boxes)]
    img = _image([(0.9, 0, 0.1)])  # nearly red: belongs to reference 0
    # weighted costs would be 5 * 0.02 for red and 0 * 1.62 for blue, handing the region to blue
    out = MultiSubjectObjective(subjects, weights=[5.0, 0.0])(img)
    assert out.diagnostics["assignment"] == [[0, None]]
    assert out.loss.item() == pytest.approx(5.0 * (0.1**2 + 0.1**2))
