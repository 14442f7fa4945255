"""A CPU-sized proof of the solver: class-conditional rectified flow on 8x8 sklearn digits.

The "prompt" is a digit class, the "identity" is one held-out digit's look (stroke,
slant, thickness); a contrastive feature network plays the off-the-shelf discriminator
and a separately trained evaluator measures the result. Weights ship in `weights/`;
retrain with `python -m rectifid_core.toy.train`, measure with
`python -m rectifid_core.toy.benchmark` (both write to `out/` unless told
`--update-shipped`).
"""
from __future__ import annotations

from pathlib import Path


def output_folder(out: Path | None, update_shipped: bool, shipped: Path, default: Path) -> Path:
    """Where a toy script writes: `out`, else `default`; the package's own `shipped` folder only when asked."""
    if update_shipped and out is not None:
        raise SystemExit("give either --out or --update-shipped, not both")
    return shipped if update_shipped else (out or default)
