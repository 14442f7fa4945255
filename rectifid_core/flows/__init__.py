"""Rectified-flow backends behind one small interface (see base.py)."""
from .base import Conditioning, RectifiedFlow

__all__ = ["Conditioning", "RectifiedFlow"]
