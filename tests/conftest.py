"""Shared test setup: make the tests folder importable for the tiny-model builders; shared fixtures."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def pack_root(tmp_path_factory):
    """A tiny antelopev2 pack (tests/tiny_faces.py) under <root>/models/antelopev2."""
    import tiny_faces

    root = tmp_path_factory.mktemp("insightface")
    tiny_faces.build_antelopev2(root, "models")
    return root


@pytest.fixture(scope="session")
def comfyui():
    """ComfyUI 0.8.0's real engine with our pack, in a child process (tests/comfyui_runtime.py); skips without
    its source."""
    import comfyui_runtime

    with comfyui_runtime.ComfyUIProcess() as process:
        yield process
