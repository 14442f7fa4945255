"""Rectified-flow backends behind one small interface (see base.py)."""
from .base import Conditioning, RectifiedFlow
from .denoiser import DenoiserFlow
from .euler import EulerVelocityFlow
from .flow_matching import FlowMatchingComponents, FlowMatchingFlow
from .flux import FluxFlow
from .loading import FLOW_TYPES, PREDICTION_TYPES, FlowFolderInfo, inspect_flow_folder, load_flow
from .perflow import PeRFlow
from .sd3 import SD3Flow

__all__ = ["Conditioning", "RectifiedFlow", "PeRFlow", "EulerVelocityFlow", "DenoiserFlow", "FlowMatchingFlow",
           "FlowMatchingComponents", "FluxFlow", "SD3Flow", "load_flow", "inspect_flow_folder", "FlowFolderInfo",
           "FLOW_TYPES", "PREDICTION_TYPES"]
