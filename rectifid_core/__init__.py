"""RectifID core library: rectified-flow backends, anchored classifier guidance, identity objectives.

Pure torch/diffusers/transformers; never imports ComfyUI.
"""
from .guidance import GuidanceConfig, GuidanceResult, IterationInfo, guide, initial_noise

__all__ = ["GuidanceConfig", "GuidanceResult", "IterationInfo", "guide", "initial_noise"]
__version__ = "0.1.0"
