"""What the solver expects from an identity objective: image in, loss out."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Union

import torch


@dataclass
class ObjectiveOutput:
    """`loss` is per image [B] (or a scalar for B=1); lower is better.

    `diagnostics` carries JSON-friendly facts for the user (similarities, boxes,
    assignments, skipped detections); the solver records it per iteration.
    """

    loss: torch.Tensor
    diagnostics: dict[str, Any] = field(default_factory=dict)


ObjectiveResult = Union[ObjectiveOutput, torch.Tensor]
Objective = Callable[[torch.Tensor], ObjectiveResult]


def as_output(result: ObjectiveResult) -> ObjectiveOutput:
    """Let plain callables returning a tensor serve as objectives."""
    if isinstance(result, ObjectiveOutput):
        return result
    if isinstance(result, torch.Tensor):
        return ObjectiveOutput(loss=result)
    raise TypeError(f"objective must return a tensor or ObjectiveOutput, got {type(result).__name__}")
