"""Train the toy flow (1-RF, then reflow to 2-RF), the guiding FeatureNet and the EvaluatorNet.

    python -m rectifid_core.toy.train                    # writes out/toy-weights/
    python -m rectifid_core.toy.train --update-shipped   # replaces rectifid_core/toy/weights/

Evaluate retrained weights with `python -m rectifid_core.toy.benchmark --weights out/toy-weights`.

Everything is seeded and sized for two CPU cores (a few minutes in all).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import output_folder
from .data import DigitSplit, augment, load_split, to_latent
from .flow import euler_sample
from .models import NULL_CLASS, WEIGHTS_DIR, EvaluatorNet, FeatureNet, VelocityNet, save_weights

LABEL_DROPOUT = 0.1
REFLOW_PAIRS = 4096
REFLOW_STEPS = 16
REFLOW_CFG = 1.5
DEFAULT_OUT = Path("out/toy-weights")


def _adam(model: torch.nn.Module, lr: float, steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)


def train_flow(x0: torch.Tensor, noise: torch.Tensor | None, labels: torch.Tensor, steps: int, seed: int,
               init: VelocityNet | None = None, batch: int = 256) -> VelocityNet:
    """Eq. 2 with t=1 noise, t=0 data: regress v on (noise - x0) along x_t = t*noise + (1-t)*x0.

    With `noise` given the couplings are fixed (reflow); otherwise noise is drawn fresh
    and labels are dropped to the null class at rate LABEL_DROPOUT for CFG.
    """
    gen = torch.Generator().manual_seed(seed)
    net = VelocityNet()
    if init is not None:
        net.load_state_dict(init.state_dict())
    net.train().requires_grad_(True)
    opt, sched = _adam(net, 2e-3 if init is None else 5e-4, steps)
    for _ in range(steps):
        idx = torch.randint(0, x0.shape[0], (batch,), generator=gen)
        x, y = x0[idx], labels[idx].clone()
        eps = noise[idx] if noise is not None else torch.randn(x.shape, generator=gen)
        if noise is None:
            y[torch.rand(batch, generator=gen) < LABEL_DROPOUT] = NULL_CLASS
        t = torch.rand(batch, generator=gen)
        xt = t.view(-1, 1, 1, 1) * eps + (1 - t.view(-1, 1, 1, 1)) * x
        loss = F.mse_loss(net(xt, t, y), eps - x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval().requires_grad_(False)


@torch.no_grad()
def reflow_pairs(teacher: VelocityNet, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noise, teacher ODE endpoint, class) couplings; a tenth unconditional so CFG still works after reflow."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(REFLOW_PAIRS, 1, 8, 8, generator=gen)
    labels = torch.randint(0, NULL_CLASS, (REFLOW_PAIRS,), generator=gen)
    labels[torch.rand(REFLOW_PAIRS, generator=gen) < LABEL_DROPOUT] = NULL_CLASS
    neg = torch.full_like(labels, NULL_CLASS)
    # CFG with positive = negative = null is just the unconditional velocity, so one scale serves all rows.
    ends = torch.cat([euler_sample(teacher, z, y, n, REFLOW_CFG, REFLOW_STEPS)
                      for z, y, n in zip(noise.split(2048), labels.split(2048), neg.split(2048))])
    return noise, ends, labels


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """SimCLR loss: each view must pick its partner among all 2B-1 others."""
    z = F.normalize(torch.cat([a, b]), dim=1)
    sim = z @ z.t() / temperature
    sim.fill_diagonal_(float("-inf"))
    n = a.shape[0]
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(sim, target)


def train_feature(images: torch.Tensor, steps: int, seed: int, batch: int = 128) -> FeatureNet:
    """Instance discrimination on clean training digits: features that tell one digit image from another."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = FeatureNet().train()
    opt, sched = _adam(net, 2e-3, steps)
    for _ in range(steps):
        idx = torch.randperm(images.shape[0], generator=gen)[:batch]
        x = images[idx]
        loss = nt_xent(net.head(net(augment(x, gen))), net.head(net(augment(x, gen))))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval().requires_grad_(False)


def train_evaluator(images: torch.Tensor, labels: torch.Tensor, steps: int, seed: int,
                    batch: int = 256) -> EvaluatorNet:
    """Denoising autoencoder + classifier: a different objective, architecture and seed than FeatureNet."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = EvaluatorNet().train()
    opt, sched = _adam(net, 2e-3, steps)
    for _ in range(steps):
        idx = torch.randint(0, images.shape[0], (batch,), generator=gen)
        x, y = images[idx], labels[idx]
        xa = augment(x, gen, strength=0.5)
        code = net.encoder(xa.flatten(1))
        recon = torch.sigmoid(net.decoder(code)).view_as(x)
        loss = F.mse_loss(recon, xa) * 10.0 + F.cross_entropy(net.classifier(code), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net.eval().requires_grad_(False)
    with torch.no_grad():
        net.center.copy_(net.encoder(images.flatten(1)).mean(0))
    return net


@torch.no_grad()
def flow_report(name: str, net: VelocityNet, evaluator: EvaluatorNet, scale: float, seed: int = 123) -> str:
    """4-step class accuracy and straightness (RMS gap between the 4-step and 64-step endpoints)."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(1000, 1, 8, 8, generator=gen)
    y = torch.arange(1000) % 10
    neg = torch.full_like(y, NULL_CLASS)
    few = euler_sample(net, noise, y, neg, scale, 4)
    many = euler_sample(net, noise, y, neg, scale, 64)
    acc = (evaluator((few + 1).clamp(0, 2) / 2)[1].argmax(1) == y).float().mean()
    gap = ((few - many) / 2).pow(2).mean().sqrt()
    return f"{name} (cfg {scale}): 4-step class acc {acc:.3f}, 4-vs-64-step RMS gap {gap:.4f} (0..1 pixels)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None,
                        help=f"folder for the .safetensors files (default {DEFAULT_OUT})")
    parser.add_argument("--update-shipped", action="store_true",
                        help=f"write into the package's weights folder ({WEIGHTS_DIR}), replacing the shipped files")
    parser.add_argument("--flow-steps", type=int, default=1500)
    parser.add_argument("--feature-steps", type=int, default=500)
    parser.add_argument("--evaluator-steps", type=int, default=800)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine may be shared)")
    args = parser.parse_args(argv)
    args.out = output_folder(args.out, args.update_shipped, WEIGHTS_DIR, DEFAULT_OUT)
    torch.set_num_threads(args.threads)
    split: DigitSplit = load_split()
    x0 = to_latent(split.train_images)
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)

    evaluator = train_evaluator(split.train_images, split.train_labels, args.evaluator_steps, seed=2)
    with torch.no_grad():
        acc = (evaluator(split.held_images)[1].argmax(1) == split.held_labels).float().mean()
    log(f"evaluator: held-out class accuracy {acc:.3f} -> {save_weights(evaluator, 'evaluator', args.out)}")
    feature = train_feature(split.train_images, args.feature_steps, seed=1)
    log(f"feature net -> {save_weights(feature, 'feature', args.out)}")
    rf1 = train_flow(x0, None, split.train_labels, args.flow_steps, seed=0)
    log(f"1-rectified flow -> {save_weights(rf1, 'flow_1rf', args.out)}")
    noise, ends, labels = reflow_pairs(rf1, seed=3)
    log(f"reflow: {len(noise)} couplings from {REFLOW_STEPS}-step CFG {REFLOW_CFG} samples")
    rf2 = train_flow(ends, noise, labels, args.flow_steps, seed=4, init=rf1)
    log(f"2-rectified flow -> {save_weights(rf2, 'flow', args.out)}")
    log(flow_report("1-RF", rf1, evaluator, REFLOW_CFG))
    log(flow_report("2-RF", rf2, evaluator, 1.0))


if __name__ == "__main__":
    main()
