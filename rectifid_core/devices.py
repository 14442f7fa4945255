"""Parse a device choice and refuse one this machine lacks, before any model is loaded onto it."""
from __future__ import annotations

import torch


def parse_device(name: str, what: str = "device") -> torch.device:
    """"auto" (CUDA when available), "cpu", "cuda[:N]" or "mps" -> torch.device; ValueError says what to use instead.

    `what` names the setting in messages (the CLI flag or the node input).
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"{what} {name!r} is not a device torch knows ({exc}); use auto, cpu, cuda or cuda:N") \
            from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{what} {name!r}: torch sees no CUDA GPU on this machine (a CPU-only torch build, or no "
                             "driver); choose cpu (or auto), or install the CUDA build of torch")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"{what} {name!r}: this machine has {count} CUDA GPU(s), numbered 0 to {count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{what} {name!r}: Apple MPS is not available here; choose cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{what} {name!r}: only cpu, cuda[:N] and mps are supported")
    return device
