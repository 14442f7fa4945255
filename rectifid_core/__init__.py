"""RectifID core library: rectified-flow backends, anchored classifier guidance, identity objectives.

Pure torch/diffusers/transformers; never imports ComfyUI. Heavy model libraries load
only when a loader needs them.
"""
from .guidance import GuidanceConfig, GuidanceResult, IterationInfo, guide, initial_noise
from .pipeline import PersonalizeResult, PersonalizeSettings, personalize, resolve_settings

__all__ = ["GuidanceConfig", "GuidanceResult", "IterationInfo", "PersonalizeResult", "PersonalizeSettings",
           "guide", "initial_noise", "personalize", "resolve_settings"]
__version__ = "0.1.0"
