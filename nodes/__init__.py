"""RectifID nodes; the classes are thin, the work happens in rectifid_core."""
from . import comfy_bridge
from .checkpoint_flows import RectifIDCheckpointFlow
from .comfy_sampler import RectifIDComfySample, RectifIDComfySampler
from .loaders import RectifIDClipModelLoader, RectifIDFaceModelLoader, RectifIDFlowLoader, RectifIDObjectModelLoader
from .sampler import RectifIDSampler
from .subjects import RectifIDDetectCrop, RectifIDMatchSubjects, RectifIDSubject

comfy_bridge.register_model_folders()

NODE_CLASS_MAPPINGS = {
    "RectifIDFlowLoader": RectifIDFlowLoader,
    "RectifIDFaceModelLoader": RectifIDFaceModelLoader,
    "RectifIDObjectModelLoader": RectifIDObjectModelLoader,
    "RectifIDClipModelLoader": RectifIDClipModelLoader,
    "RectifIDDetectCrop": RectifIDDetectCrop,
    "RectifIDSubject": RectifIDSubject,
    "RectifIDMatchSubjects": RectifIDMatchSubjects,
    "RectifIDSampler": RectifIDSampler,
    "RectifIDCheckpointFlow": RectifIDCheckpointFlow,
    "RectifIDComfySampler": RectifIDComfySampler,
    "RectifIDComfySample": RectifIDComfySample,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "RectifIDFlowLoader": "Load Rectified Flow (RectifID)",
    "RectifIDFaceModelLoader": "Load Face Model (antelopev2)",
    "RectifIDObjectModelLoader": "Load Object Models (DINOv2 + OWL-ViT)",
    "RectifIDClipModelLoader": "Load CLIP Vision Model (RectifID)",
    "RectifIDDetectCrop": "Detect & Crop Subject (RectifID)",
    "RectifIDSubject": "Reference Subject (RectifID)",
    "RectifIDMatchSubjects": "Match Subjects (RectifID)",
    "RectifIDSampler": "RectifID Sampler (own flow loader)",
    "RectifIDComfySampler": "RectifID Sampler",
    "RectifIDComfySample": "RectifID Sample (ComfyUI model)",
    "RectifIDCheckpointFlow": "RectifID Checkpoint Flow",
}
