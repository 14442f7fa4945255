"""The real solver (rectifid_core.guidance) on a tiny closed-form flow.

`TanhFlow` is a test double for the *flow* only: window k maps z -> z + h_k tanh(a_k z + b_k)
elementwise, so every Jacobian is known and cheap. Expected iterates are computed by an
independent hand implementation of the update rules (vector-Jacobian products per window,
not autograd through a rollout).
"""
from __future__ import annotations

import gc
import math
import warnings
import weakref

import pytest
import torch

from rectifid_core.flows.base import Conditioning, RectifiedFlow
from rectifid_core.guidance import (
    LEGACY_CK,
    GuidanceConfig,
    anchor_coefficients,
    guide,
    normalize_window_grad,
    rollout,
)
from rectifid_core.objectives.base import ObjectiveOutput
from linear_flow import LinearFlow, quadratic

PERFLOW_SD15_GAMMAS = [0.958, 0.892, 0.767, 0.569]


class TanhFlow(RectifiedFlow):
    latent_channels = 1
    vae_scale_factor = 1

    def __init__(self, num_windows: int = 3, gammas: list[float] | None = None, seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.num_windows = num_windows
        self.device = torch.device("cpu")
        self.dtype = dtype
        self.gammas = gammas
        self.a = [(0.5 + torch.rand(1, 1, 4, 4, generator=gen)).to(dtype) for _ in range(num_windows)]
        self.b = [(torch.randn(1, 1, 4, 4, generator=gen) * 0.3).to(dtype) for _ in range(num_windows)]
        self.h = [-0.8 / num_windows] * num_windows
        self.calls = 0

    def encode(self, prompts, negative_prompts, guidance_scale):
        return Conditioning(len(prompts), guidance_scale)

    def step(self, z, k, cond):
        self.calls += 1
        return z + self.h[k] * torch.tanh(self.a[k] * z + self.b[k])

    def decode(self, z):
        return torch.sigmoid(z).repeat(1, 3, 1, 1)

    def window_gammas(self):
        return self.gammas


def target_loss(target: torch.Tensor, weight: torch.Tensor):
    """Weighted squared distance to a target image, per image; weights make some |g_k| exceed 1, some not."""
    def objective(image: torch.Tensor) -> ObjectiveOutput:
        loss = weight * (image - target).pow(2).flatten(1).sum(1)
        return ObjectiveOutput(loss, {"distance": loss.detach().tolist()})
    return objective


def setup(batch: int = 2, **flow_kw):
    flow = TanhFlow(**flow_kw)
    cond = flow.encode(["x"] * batch, [], 1.0)
    gen = torch.Generator().manual_seed(7)
    noise = torch.randn(batch, 1, 4, 4, generator=gen, dtype=flow.dtype)
    target = torch.rand(batch, 3, 4, 4, generator=gen, dtype=flow.dtype)
    weight = torch.tensor([0.3, 40.0][:batch], dtype=flow.dtype)
    return flow, cond, noise, target_loss(target, weight)


def hand_window_grads(flow, cond, x0, offsets, objective):
    """g_k = dL/dz_k for k = 0..K by explicit backward recursion g_k = J_k^T g_{k+1}, one window at a time."""
    zs = [x0]
    for k in range(flow.num_windows):
        zs.append(flow.step(zs[-1], k, cond) + offsets[k])
    zk = zs[-1].detach().requires_grad_(True)
    (g,) = torch.autograd.grad(objective(flow.decode(zk)).loss.sum(), zk)
    grads = [None] * flow.num_windows + [g]
    for k in reversed(range(flow.num_windows)):
        _, g = torch.autograd.functional.vjp(lambda z, k=k: flow.step(z, k, cond), zs[k].detach(), g)
        grads[k] = g
    return grads, zs[-1].detach()


def hand_guide(flow, cond, noise, objective, mode, iterations, scale, ck, momentum=0.9, l2=1.0):
    """The documented update rules, written out directly from guidance.py's docstring and DESIGN.md section 3."""
    K = flow.num_windows
    offsets = [torch.zeros_like(noise) for _ in range(K)]
    noise_offset = torch.zeros_like(noise)
    velocity = torch.zeros_like(noise)
    for _ in range(iterations):
        grads, _ = hand_window_grads(flow, cond, noise + noise_offset, offsets, objective)
        ghat = []
        for g in grads:
            norm = g.flatten(1).norm(dim=1).clamp(min=1.0).view(-1, 1, 1, 1)
            ghat.append(g / norm)
        if mode == "anchored":  # window-start gradient, applied at the window end
            offsets = [offsets[k] - ck[k] * scale * ghat[k] for k in range(K)]
        elif mode == "no_anchor":  # the gradient where the offset is applied, accumulated
            offsets = [offsets[k] - scale * ghat[k + 1] for k in range(K)]
        else:  # raw gradient, lr 0.4 * s, heavy ball, l2 toward the sampled noise
            velocity = momentum * velocity + grads[0] + l2 * noise_offset
            noise_offset = noise_offset - 0.4 * scale * velocity
    z = noise + noise_offset
    for k in range(K):
        z = flow.step(z, k, cond) + offsets[k]
    return z


def unguided(flow, cond, noise):
    with torch.no_grad():
        z, _ = rollout(flow, cond, noise, [torch.zeros_like(noise)] * flow.num_windows)
    return z


def test_anchored_lowers_the_objective():
    flow, cond, noise, objective = setup()
    base = objective(flow.decode(unguided(flow, cond, noise))).loss
    res = guide(flow, cond, objective, noise, GuidanceConfig(scale=0.5, iterations=20))
    final = objective(res.image).loss
    assert torch.all(final < 0.6 * base), (final, base)
    assert res.losses[-1] < 0.6 * res.losses[0]
    assert res.stopped_early is None and len(res.losses) == 20 and len(res.diagnostics) == 20


def test_window_gradients_match_finite_differences():
    flow, cond, noise, objective = setup(dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    offsets = [torch.randn(noise.shape, generator=gen, dtype=torch.float64) * 0.1 for _ in range(flow.num_windows)]
    start = noise.clone().requires_grad_(True)
    z_final, starts = rollout(flow, cond, start, offsets)
    grads = torch.autograd.grad(objective(flow.decode(z_final)).loss.sum(), starts)

    def loss_from(k: int, zk: torch.Tensor) -> float:
        z = zk
        for j in range(k, flow.num_windows):
            z = flow.step(z, j, cond) + offsets[j]
        return float(objective(flow.decode(z)).loss.sum())

    eps = 1e-6
    for k in range(flow.num_windows):
        zk = starts[k].detach()
        for idx in [(0, 0, 0, 0), (1, 0, 2, 3), (1, 0, 3, 1)]:
            plus, minus = zk.clone(), zk.clone()
            plus[idx] += eps
            minus[idx] -= eps
            fd = (loss_from(k, plus) - loss_from(k, minus)) / (2 * eps)
            assert grads[k][idx].item() == pytest.approx(fd, rel=1e-6, abs=1e-8)


@pytest.mark.parametrize("ck_mode,gammas", [("per_window", [0.958, 0.892, 0.767]), ("legacy", None), ("one", None)])
def test_one_anchored_iteration_equals_hand_update(ck_mode, gammas):
    flow, cond, noise, objective = setup(gammas=gammas)
    ck = {"per_window": [math.sqrt(1 - g * g) for g in gammas or [0, 0, 0]],
          "legacy": [LEGACY_CK] * 3, "one": [1.0] * 3}[ck_mode]
    grads = hand_window_grads(flow, cond, noise, [torch.zeros_like(noise)] * 3, objective)[0][:3]
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads])
    assert (norms[:, 0] < 1).all() and (norms[:, 1] > 1).all(), "both branches of max(|g|,1) must be exercised"
    scale = 0.7
    z = noise
    for k in range(3):
        delta = -ck[k] * scale * grads[k] / norms[k].clamp(min=1).view(-1, 1, 1, 1)
        z = flow.step(z, k, cond) + delta
    res = guide(flow, cond, objective, noise, GuidanceConfig(scale=scale, iterations=1, ck_mode=ck_mode))
    torch.testing.assert_close(res.latent, z.detach(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mode", ["anchored", "no_anchor", "noise_gd"])
def test_modes_follow_their_update_rules(mode):
    flow, cond, noise, objective = setup()
    expected = hand_guide(flow, cond, noise, objective, mode, iterations=4, scale=0.4, ck=[1.0] * 3)
    res = guide(flow, cond, objective, noise, GuidanceConfig(scale=0.4, iterations=4, mode=mode))
    torch.testing.assert_close(res.latent, expected.detach(), atol=1e-5, rtol=1e-5)


def test_modes_differ_and_noise_gd_stays_on_the_flow():
    flow, cond, noise, objective = setup()
    out = {m: guide(flow, cond, objective, noise, GuidanceConfig(scale=0.4, iterations=4, mode=m)).latent
           for m in ("anchored", "no_anchor", "noise_gd")}
    assert not torch.allclose(out["anchored"], out["no_anchor"], atol=1e-4)
    assert not torch.allclose(out["anchored"], out["noise_gd"], atol=1e-4)
    # noise_gd moves only the start: its output is an unmodified flow sample from some noise,
    # so inverting the (monotone, elementwise) windows recovers a finite start point.
    z = out["noise_gd"]
    for k in reversed(range(flow.num_windows)):
        z = invert_step(flow, z, k)
    torch.testing.assert_close(unguided(flow, cond, z), out["noise_gd"], atol=1e-5, rtol=1e-5)


def _k1_linear(mode: str, iterations: int, weight: float, **kw):
    """K=1 flow z -> a z, decode = identity, L = w ||z_1 - t||^2: every ablation has a hand-checkable iterate."""
    a, s = 1.7, 0.3
    flow = LinearFlow(gains=(a,))
    gen = torch.Generator().manual_seed(11)
    noise = torch.randn(2, 3, 2, 2, generator=gen, dtype=torch.float64)
    target = 2.0 * torch.randn(2, 3, 2, 2, generator=gen, dtype=torch.float64)
    cfg = GuidanceConfig(scale=s, iterations=iterations, mode=mode, ck_mode="one", **kw)
    res = guide(flow, flow.encode(["x", "y"], [], 1.0), quadratic(target, weight), noise, cfg)
    return res, a, s, noise, target


@pytest.mark.parametrize("mode,pullback", [("anchored", True), ("no_anchor", False)])
def test_k1_offsets_follow_the_closed_form(mode, pullback):
    """With ||g|| < 1 the error e_n = z_1 - t contracts by (1 - 2 w s a) anchored (the window-start gradient,
    pulled back through a) and by (1 - 2 w s) without anchor (Eq. 8: the gradient at z_1 itself)."""
    w, n = 0.004, 7
    res, a, s, noise, target = _k1_linear(mode, n, w)
    e0 = a * noise - target
    assert float((2 * w * a * e0).flatten(1).norm(dim=1).max()) < 1, "the normalization must be inactive"
    rate = 1 - 2 * w * s * (a if pullback else 1.0)
    # the offsets accumulate in float32
    torch.testing.assert_close(res.latent, target + rate ** n * e0, rtol=1e-6, atol=1e-6)


def test_no_anchor_uses_the_unit_step_where_the_gradient_is_large():
    """Normalized step at z_1: one iteration moves z_1 by exactly s along -(z_1 - t) when ||2 w e|| > 1."""
    w = 1.0
    res, a, s, noise, target = _k1_linear("no_anchor", 1, w)
    e0 = a * noise - target
    unit = e0 / e0.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    torch.testing.assert_close(res.latent, a * noise - s * unit, rtol=1e-6, atol=1e-6)  # offsets accumulate in float32


@pytest.mark.parametrize("l2_target", ["sampled_noise", "zero"])
def test_noise_gd_is_sgd_with_momentum_on_the_raw_gradient(l2_target):
    """torch.optim.SGD semantics written out by hand: v = mu v + (g + l2 pull), z -= 0.4 s v, g not normalized."""
    w, n, mu, l2 = 1.0, 5, 0.9, 1.0
    res, a, s, noise, target = _k1_linear("noise_gd", n, w, l2_target=l2_target)
    z, v = noise.clone(), torch.zeros_like(noise)
    for _ in range(n):
        g = 2 * w * a * (a * z - target)  # dL/dz_0, raw
        pull = z - noise if l2_target == "sampled_noise" else z
        v = mu * v + g + l2 * pull
        z = z - 0.4 * s * v
    assert float((2 * w * a * (a * noise - target)).flatten(1).norm(dim=1).min()) > 1, "raw gradient must be > 1"
    torch.testing.assert_close(res.latent, a * z, rtol=1e-6, atol=1e-6)


def invert_step(flow: TanhFlow, y: torch.Tensor, k: int) -> torch.Tensor:
    z = y.clone()
    for _ in range(200):  # contraction: |h a| < 1
        z = y - flow.h[k] * torch.tanh(flow.a[k] * z + flow.b[k])
    return z


def test_ck_modes():
    flow = TanhFlow(num_windows=4, gammas=PERFLOW_SD15_GAMMAS)
    assert anchor_coefficients(flow, "per_window") == pytest.approx([math.sqrt(1 - g * g) for g in PERFLOW_SD15_GAMMAS])
    assert anchor_coefficients(flow, "legacy") == [0.95796674] * 4
    assert anchor_coefficients(flow, "one") == [1.0] * 4
    assert anchor_coefficients(TanhFlow(num_windows=4), "per_window") == [1.0] * 4


def test_normalization_is_per_image():
    g = torch.zeros(2, 1, 2, 2)
    g[0, 0, 0, 0] = 0.5
    g[1, 0, 0, 0] = 4.0
    out = normalize_window_grad(g)
    assert out[0, 0, 0, 0] == 0.5 and out[1, 0, 0, 0] == 1.0


def test_zero_iterations_is_the_unguided_sample():
    flow, cond, noise, objective = setup()
    res = guide(flow, cond, objective, noise, GuidanceConfig(iterations=0))
    expected = unguided(flow, cond, noise)
    torch.testing.assert_close(res.latent, expected)
    torch.testing.assert_close(res.image, flow.decode(expected))
    assert res.losses == [] and res.stopped_early is None


def test_callback_sees_each_iteration_and_can_cancel():
    flow, cond, noise, objective = setup()
    seen = []

    class Cancelled(Exception):
        pass

    def callback(info):
        seen.append(info)
        if info.iteration == 2:
            raise Cancelled

    result = None
    with pytest.raises(Cancelled):
        result = guide(flow, cond, objective, noise, GuidanceConfig(iterations=10), callback=callback)
    assert result is None
    assert [i.iteration for i in seen] == [0, 1, 2] and all(i.iterations == 10 for i in seen)
    torch.testing.assert_close(seen[0].latent, unguided(flow, cond, noise))
    assert seen[0].loss == pytest.approx(float(objective(flow.decode(unguided(flow, cond, noise))).loss.sum()))


@pytest.mark.parametrize("config,match", [
    (GuidanceConfig(iterations=-1), "iterations N"),
    (GuidanceConfig(mode="dpo"), "unknown solver mode"),
    (GuidanceConfig(ck_mode="half"), "unknown c_k mode"),
    (GuidanceConfig(scale=float("nan")), "guidance scale"),
    (GuidanceConfig(mode="noise_gd", momentum=1.0), "momentum must be in"),
    (GuidanceConfig(mode="anchored_momentum", offset_momentum=-0.1), "offset_momentum must be in"),
    (GuidanceConfig(mode="noise_gd", l2_target="one"), "unknown l2 target"),
    (GuidanceConfig(mode="noise_gd", parallel_rescale=0.0), "noise_gd has none"),
    (GuidanceConfig(parallel_sign="negative"), "unknown parallel_sign"),
])
def test_bad_config_is_rejected(config, match):
    flow, cond, noise, objective = setup()
    with pytest.raises(ValueError, match=match):
        guide(flow, cond, objective, noise, config)


def test_noise_batch_mismatch_is_rejected():
    flow, cond, noise, objective = setup()
    with pytest.raises(ValueError, match="does not match the prompt batch"):
        guide(flow, cond, objective, noise[:1], GuidanceConfig(iterations=1))


def test_non_finite_loss_at_first_iteration_raises():
    flow, cond, noise, _ = setup()
    with pytest.raises(RuntimeError, match="non-finite loss"):
        guide(flow, cond, lambda img: img.sum((1, 2, 3)) * float("nan"), noise, GuidanceConfig(iterations=3))


def failing_after(objective, calls_ok: int):
    """Wrap an objective so its loss turns NaN from call number calls_ok + 1 on."""
    count = [0]

    def wrapped(image):
        count[0] += 1
        out = objective(image)
        return ObjectiveOutput(out.loss * (float("nan") if count[0] > calls_ok else 1.0), out.diagnostics)
    return wrapped


def test_non_finite_loss_mid_run_stops_and_keeps_the_last_good_iterate():
    flow, cond, noise, objective = setup()
    res = guide(flow, cond, failing_after(objective, 3), noise, GuidanceConfig(scale=0.4, iterations=10))
    assert res.stopped_early and "iteration 3" in res.stopped_early
    assert len(res.losses) == 3 and all(math.isfinite(v) for v in res.losses)
    # the iterates the objective scored finitely are those of iterations 0..2; the last one is N=2's output
    good = guide(flow, cond, objective, noise, GuidanceConfig(scale=0.4, iterations=2))
    torch.testing.assert_close(res.latent, good.latent)


class NanGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def test_non_finite_gradient_mid_run_stops_with_a_finite_result():
    flow, cond, noise, objective = setup()
    count = [0]

    def poisoned(image):
        count[0] += 1
        return objective(NanGradient.apply(image) if count[0] > 2 else image)

    res = guide(flow, cond, poisoned, noise, GuidanceConfig(scale=0.4, iterations=10))
    assert res.stopped_early and "non-finite gradient" in res.stopped_early
    assert len(res.losses) == 2 and torch.isfinite(res.latent).all()
    torch.testing.assert_close(res.latent, guide(flow, cond, objective, noise,
                                                 GuidanceConfig(scale=0.4, iterations=2)).latent)


def test_no_graph_or_tensors_survive_an_iteration():
    flow, cond, noise, objective = setup()
    images, live = [], {}

    def tracking(image):
        images.append(weakref.ref(image))
        return objective(image)

    def callback(info):
        assert images[-1]() is None, "the decoded image (and so the autograd graph) outlived its iteration"
        if info.iteration in (2, 29):
            gc.collect()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # isinstance() pokes deprecated torch attributes
                live[info.iteration] = sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    guide(flow, cond, tracking, noise, GuidanceConfig(scale=0.4, iterations=30), callback=callback)
    assert live[29] <= live[2], live


def test_callback_image_is_the_decoded_iterate_the_loss_saw():
    flow, cond, noise, objective = setup()
    seen = []
    guide(flow, cond, objective, noise, GuidanceConfig(scale=0.4, iterations=3), callback=seen.append)
    for info in seen:
        torch.testing.assert_close(info.image, flow.decode(info.latent))
        assert float(objective(info.image).loss.sum()) == pytest.approx(info.loss, rel=1e-5)
