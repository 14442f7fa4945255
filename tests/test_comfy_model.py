"""The ComfyUI adapter's pieces that need no ComfyUI: inference-tensor conversion, the rope backward, the step-rule
hook. (Against ComfyUI's real code: test_comfy_sampler.py.)"""
from __future__ import annotations

import pytest
import torch

from nodes.comfy_model import STEP_RULE_KEY, _rope_with_backward, make_trainable, step_rule
from rectifid_core.flows.denoiser import EulerSigmas


def _reference_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rope as a plain rotation of channel pairs by the 2x2 matrices in freqs [..., d, 2, 2] (autograd's own)."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    return torch.einsum("...dij,...dj->...di", freqs, pairs).reshape(x.shape)


def test_make_trainable_turns_inference_weights_into_normal_ones_over_the_same_memory():
    with torch.inference_mode():
        layer = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8))
        x = torch.randn(3, 5, 8).transpose(0, 1)  # non-contiguous: linear's kernel path depends on requires_grad
        before = layer[0](x)
    pointers = [t.data_ptr() for t in layer.state_dict().values()]
    assert all(t.is_inference() for t in layer.state_dict().values())
    assert make_trainable(layer) == 2 + 5  # weight, bias; BatchNorm's weight, bias and three buffers
    assert not any(t.is_inference() for t in layer.state_dict().values())
    assert [t.data_ptr() for t in layer.state_dict().values()] == pointers  # nothing was copied
    assert not any(p.requires_grad for p in layer.parameters())
    assert make_trainable(layer) == 0  # once per model
    with torch.inference_mode():
        assert torch.equal(layer[0](x), before)
    z = torch.randn(5, 3, 8, requires_grad=True)
    (g,) = torch.autograd.grad(layer[0](z).square().sum(), z)  # inference weights could not be saved for this
    assert g.shape == z.shape


def test_rope_backward_is_the_transposed_rotation():
    """The wrapped op's gradient equals autograd through an independent einsum rotation."""
    gen = torch.Generator().manual_seed(0)
    freqs = torch.randn(1, 1, 6, 4, 2, 2, generator=gen, dtype=torch.float64)
    q = torch.randn(1, 2, 6, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 6, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    wq, wk = torch.randn(q.shape, generator=gen, dtype=torch.float64), torch.randn(k.shape, generator=gen,
                                                                                  dtype=torch.float64)

    class NoBackward(torch.autograd.Function):  # stands in for comfy_kitchen's op, which has no autograd formula
        @staticmethod
        def forward(ctx, xq, xk, f):
            return _reference_rope(xq, f), _reference_rope(xk, f)

        @staticmethod
        def backward(ctx, gq, gk):
            raise RuntimeError("no autograd formula")

    oq, ok = _rope_with_backward(NoBackward.apply)(q, k, freqs)
    ours = torch.autograd.grad((oq * wq).sum() + (ok * wk).sum(), (q, k))
    rq, rk = _reference_rope(q, freqs), _reference_rope(k, freqs)
    theirs = torch.autograd.grad((rq * wq).sum() + (rk * wk).sum(), (q, k))
    torch.testing.assert_close(oq, rq, rtol=0, atol=0)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


SIGMAS = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])


def test_step_rule_defaults_to_euler_steps_on_the_sigmas():
    rule = step_rule({}, SIGMAS)
    assert isinstance(rule, EulerSigmas) and rule.sigmas == SIGMAS.tolist() and rule.num_steps == 4


def test_step_rule_from_the_model_options_is_used_as_given_or_built_from_the_sigmas():
    given = EulerSigmas([1.0, 0.5, 0.25, 0.1, 0.0])
    assert step_rule({STEP_RULE_KEY: given}, SIGMAS) is given
    seen = []
    built = step_rule({STEP_RULE_KEY: lambda sigmas: seen.append(sigmas) or given}, SIGMAS)
    assert built is given and torch.equal(seen[0], SIGMAS)
    assert step_rule({STEP_RULE_KEY: EulerSigmas}, SIGMAS).sigmas == SIGMAS.tolist()  # a class is a factory too


@pytest.mark.parametrize("rule, error, words", [
    (EulerSigmas([1.0, 0.5, 0.0]), ValueError, "runs 2 steps but the sigmas give 4"),
    (lambda sigmas: object(), TypeError, "without 'num_steps'"),
])
def test_step_rule_mismatches_are_refused(rule, error, words):
    with pytest.raises(error, match=words):
        step_rule({STEP_RULE_KEY: rule}, SIGMAS)
