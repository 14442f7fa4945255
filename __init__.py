"""ComfyUI entry point of the RectifID node pack.

ComfyUI imports this folder as a package under its folder name. The node
modules import the library next to them, rectifid_core, absolutely; rather than
putting this folder on sys.path (where its `nodes/` and `tests/` would shadow
modules of those names for ComfyUI and every other pack), rectifid_core is
loaded from its file location when it is not already imported, and the node
modules are imported relatively.
"""
import importlib.util
import os
import sys

_PACK_DIR = os.path.dirname(os.path.realpath(__file__))
_CORE_DIR = os.path.join(_PACK_DIR, "rectifid_core")


def _load_core() -> None:
    """Put this pack's rectifid_core into sys.modules (a copy imported from elsewhere is refused, not mixed in)."""
    loaded = sys.modules.get("rectifid_core")
    if loaded is not None:
        where = os.path.dirname(os.path.realpath(getattr(loaded, "__file__", None) or ""))
        if os.path.normcase(where) != os.path.normcase(_CORE_DIR):
            raise ImportError(f"another copy of rectifid_core is already imported from {where}; the RectifID pack "
                              f"needs its own ({_CORE_DIR}). Remove the other copy (pip uninstall comfyui-rectifid) "
                              f"or the other pack that ships it, then restart ComfyUI.")
        return
    spec = importlib.util.spec_from_file_location("rectifid_core", os.path.join(_CORE_DIR, "__init__.py"),
                                                  submodule_search_locations=[_CORE_DIR])
    module = importlib.util.module_from_spec(spec)
    sys.modules["rectifid_core"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["rectifid_core"]
        raise


_load_core()

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
