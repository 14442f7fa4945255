"""Identity objectives: differentiable image -> loss callables for the solver."""
from .base import Objective, ObjectiveOutput, as_output

__all__ = ["Objective", "ObjectiveOutput", "as_output"]
