"""'RectifID Checkpoint Flow': PeRFlow / 2-RF / InstaFlow checkpoints from ComfyUI's loaders, sampled as their flows."""
from __future__ import annotations

from typing import Any

from rectifid_core.flows import PREDICTION_TYPES

from . import comfy_flow_sampling as fs
from .common import CATEGORY


class RectifIDCheckpointFlow:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "model": ("MODEL", {
                "tooltip": "The UNet of a PeRFlow, 2-rectified-flow or InstaFlow checkpoint from Load Checkpoint "
                           "(LoRAs may be applied before this node)."}),
            "flow_type": (list(fs.FLOW_KINDS), {
                "default": "perflow",
                "tooltip": "Which flow the checkpoint was trained as. perflow = piecewise rectified flow (4 straight "
                           "windows); 2-rf and instaflow are SD1.x UNets predicting velocity, sampled with Euler "
                           "steps (InstaFlow is distilled for 1 step)."}),
            "prediction_type": (list(PREDICTION_TYPES), {
                "default": "auto",
                "tooltip": "PeRFlow parameterisation. auto = velocity for v-prediction checkpoints (SD2.1), ddim_eps "
                           "for SDXL, diff_eps otherwise (SD1.5). Keep auto for 2-rf and instaflow."}),
            "steps": ("INT", {
                "default": 0, "min": 0, "max": 1000,
                "tooltip": "Model calls per image. 0 = one per trained window (4). PeRFlow splits its 4 windows into "
                           "sub-steps when given more and refuses fewer; 2-rf / instaflow take any number."}),
        }}

    RETURN_TYPES = ("MODEL", "SIGMAS")
    RETURN_NAMES = ("model", "sigmas")
    OUTPUT_TOOLTIPS = (
        "The model sampled as its flow (flow-matching sigmas, the flow's window rule) with the rule the RectifID "
        "sampler follows; also right for ComfyUI's own euler sampler.",
        "The flow's steps as sigmas (timestep / 1000, then 0) for SamplerCustomAdvanced; the RectifID sampler "
        "refuses any others.")
    FUNCTION = "patch"
    CATEGORY = f"{CATEGORY}/sampling"
    DESCRIPTION = ("Samples a PeRFlow, 2-rectified-flow or InstaFlow checkpoint loaded by Load Checkpoint as the flow "
                   "it was trained as: Load Checkpoint -> this -> CFGGuider + SamplerCustomAdvanced (RectifID or "
                   "euler sampler, these sigmas).")

    def patch(self, model: Any, flow_type: str, prediction_type: str, steps: int) -> tuple:
        flow = fs.checkpoint_flow(model, flow_type, prediction_type, steps)
        return (fs.patch_model(model, flow), fs.flow_sigmas(flow))
