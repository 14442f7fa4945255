"""ComfyUI entry point of the RectifID node pack.

ComfyUI imports this folder as a package. The library next to it,
rectifid_core, is imported absolutely by the node modules, so the pack folder
goes on sys.path first; node modules are imported relatively (an absolute
`import nodes` would hit ComfyUI's own nodes.py).
"""
import os
import sys

_PACK_DIR = os.path.dirname(os.path.abspath(__file__))
if _PACK_DIR not in sys.path:
    sys.path.insert(0, _PACK_DIR)

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
