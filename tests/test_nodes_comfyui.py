"""The pack against ComfyUI 0.8.0's own code ($COMFYUI_PATH): its model manager and its core nodes.

Each check runs in a fresh interpreter so that ComfyUI's modules, once imported,
do not make the rest of the suite believe it runs inside ComfyUI.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import comfy_executor as ce

GIB = 1024 ** 3


def run_with_comfyui(code: str, startup: str = "") -> dict:
    """Run `code` with ComfyUI importable (CPU mode) and the pack loaded as `pack`; return the JSON it prints.

    `startup` runs before the pack is imported, where ComfyUI reads its command line and extra_model_paths.yaml.
    """
    prelude = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(ce.comfyui_path())!r})
        sys.path.insert(0, {str(ce.REPO / "tests")!r})
        import comfy.cli_args
        comfy.cli_args.args.cpu = True
        import comfy.model_management as mm
        import torch
        import comfy_executor as ce
    """) + textwrap.dedent(startup) + "\npack = ce.load_pack()\n"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, cwd=str(ce.REPO), timeout=300)
    assert proc.returncode == 0, f"ComfyUI's modules did not run (pip install -e '.[test]'?):\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


# A model as ComfyUI's LoadedModel sees one (the ModelPatcher surface it calls), on a simulated 8 GiB GPU whose
# free memory is what the loaded models leave. comfy.model_patcher itself needs torchvision, which the suite lacks.
FAKE_GPU = """
    GIB = 1024 ** 3
    DEVICE = torch.device("cuda", 0)
    TOTAL = 8 * GIB

    class Patcher:
        def __init__(self, name, size):
            self.model = torch.nn.Identity()
            self.model.name = name
            self.size, self.loaded = size, 0
            self.load_device, self.offload_device, self.parent = DEVICE, torch.device("cpu"), None
        def model_size(self): return self.size
        def loaded_size(self): return self.loaded
        def current_loaded_device(self): return DEVICE if self.loaded else self.offload_device
        def model_dtype(self): return torch.float16
        def model_patches_to(self, where): pass
        def model_patches_models(self): return []
        def is_clone(self, other): return False
        def lowvram_patch_counter(self): return 0
        def partially_load(self, device, extra_memory, force_patch_weights=False):
            before = self.loaded
            self.loaded = min(self.size, self.loaded + int(extra_memory))
            return self.loaded - before
        def partially_unload(self, device, memory_to_free, force_patch_weights=False):
            freed = min(self.loaded, int(memory_to_free))
            self.loaded -= freed
            return freed
        def detach(self, unpatch_all=True):
            self.loaded = 0

    patchers = [Patcher("checkpoint A", 2 * GIB), Patcher("checkpoint B", 2 * GIB)]
    real_get_free = mm.get_free_memory
    def simulated_free(dev=None, torch_free_too=False):
        if dev is None or dev != DEVICE:
            return real_get_free(dev, torch_free_too)
        free = TOTAL - sum(p.loaded for p in patchers)
        return (free, 0) if torch_free_too else free
    mm.get_free_memory = simulated_free
    for p in patchers:
        mm.load_models_gpu([p])
"""


def test_bridge_uses_comfyuis_folders_progress_bar_and_preview_settings(tmp_path):
    """Model folders come from folder_paths, extra_model_paths.yaml entries included; progress and previews go
    through comfy.utils.ProgressBar as ComfyUI's command line asks."""
    shared = tmp_path / "shared"
    (shared / "flows" / "perflow-a").mkdir(parents=True)
    (shared / "flows" / "perflow-a" / "model_index.json").write_text("{}")
    (shared / "faces" / "models" / "antelopev2").mkdir(parents=True)
    (shared / "faces" / "models" / "antelopev2" / "glintr100.onnx").write_bytes(b"")
    yaml_file = tmp_path / "extra_model_paths.yaml"
    yaml_file.write_text(f"rectifid:\n    base_path: {shared}\n    diffusers: flows\n    insightface: faces\n")
    out = run_with_comfyui(startup=f"""
        from utils.extra_config import load_extra_path_config
        load_extra_path_config({str(yaml_file)!r})
        comfy.cli_args.args.preview_method = comfy.cli_args.LatentPreviewMethod.Auto
        comfy.cli_args.args.preview_size = 256
    """, code="""
        import comfy.utils, folder_paths
        bridge = pack.nodes.comfy_bridge
        updates = []
        comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None:
                                                 updates.append([value, total, list(preview[::2])]))
        bridge.Progress(5).update(3, preview="image")
        print(json.dumps({"flows": bridge.list_models("diffusers"), "path": bridge.resolve_model("diffusers", "perflow-a"),
                          "faces": bridge.list_models("insightface"), "roots": bridge.model_roots("owlvit"),
                          "models_dir": folder_paths.models_dir, "previews": bridge.previews_enabled(),
                          "updates": updates}))
    """)
    assert out["flows"] == ["perflow-a"] and out["path"] == str(shared / "flows" / "perflow-a")
    assert out["faces"] == ["antelopev2"]
    assert out["roots"] == [os.path.join(out["models_dir"], "owlvit")]  # our folder names are registered
    assert out["previews"] and out["updates"] == [[3, 5, ["JPEG", 256]]]


def test_sampler_frees_only_what_the_run_needs():
    """ComfyUI keeps its models when the run fits, and frees only the shortfall when it does not (the old
    unload_all_models emptied the GPU every run)."""
    out = run_with_comfyui(FAKE_GPU + """
        bridge = pack.nodes.comfy_bridge
        reserve = int(mm.extra_reserved_memory())
        result = {"loaded_before": [p.loaded for p in patchers], "free_before": mm.get_free_memory(DEVICE),
                  "reserve": reserve}
        bridge.free_vram_for_sampling(DEVICE, 1 * GIB)
        result["after_small"] = [p.loaded for p in patchers]
        bridge.free_vram_for_sampling(DEVICE, 5 * GIB)
        result["after_large"] = [p.loaded for p in patchers]
        result["free_after_large"] = mm.get_free_memory(DEVICE)
        bridge.free_vram_for_sampling(torch.device("cpu"), 100 * GIB)  # never frees RAM for a CPU run
        result["after_cpu"] = [p.loaded for p in patchers]
        result["tracked"] = len(mm.current_loaded_models)
        print(json.dumps(result))
    """)
    assert out["loaded_before"] == [2 * GIB, 2 * GIB] and out["free_before"] == 4 * GIB
    assert out["after_small"] == [2 * GIB, 2 * GIB]  # 1 GiB + ComfyUI's reserve fits in the 4 GiB free
    need = 5 * GIB + out["reserve"]
    assert out["free_after_large"] == need  # exactly the shortfall was freed ...
    assert sorted(out["after_large"]) == [2 * GIB - (need - 4 * GIB), 2 * GIB]  # ... from one model only
    assert out["after_cpu"] == out["after_large"] and out["tracked"] == 2


def test_memory_needed_counts_weights_off_the_device_and_the_chosen_modes_activations(monkeypatch):
    from rectifid_core.flows import load_flow
    from rectifid_core.guidance import GuidanceConfig, estimate_guidance_bytes
    from rectifid_core.pipeline import PersonalizeSettings

    sampler = ce.load_pack().nodes.sampler
    flow = load_flow(ce.tiny_models_dir("diffusers") / "diffusers" / ce.MODEL_NAMES["diffusers"], dtype="fp32",
                     device="cpu")
    c = flow.components
    weights = sum(t.numel() * t.element_size() for m in (c.unet, c.vae, c.text_encoder)
                  for t in [*m.parameters(), *m.buffers()])
    for mode, key in (("store", "store"), ("recompute_vae", "recompute_vae"), ("partial:3", "partial:3"),
                      ("checkpoint", "checkpoint"), ("lowest", "checkpoint")):
        settings = PersonalizeSettings(prompt="a photo", width=32, height=48, batch_size=2, cfg_scale=3.0, num_steps=8,
                                       guidance=GuidanceConfig(scale=1.0, memory=mode))
        activations = estimate_guidance_bytes(flow.latent_shape(2, 48, 32), 8, "sd15", torch.float32)[key]
        on_cpu = sampler.memory_needed(flow, settings, torch.device("cpu"))
        elsewhere = sampler.memory_needed(flow, settings, torch.device("meta"))
        assert on_cpu == pytest.approx(1.1 * activations, abs=1)  # weights already there are counted already
        assert elsewhere - on_cpu == weights


def test_sampler_runs_and_cancels_with_comfyuis_own_modules():
    """Inside ComfyUI the sampler reports progress through comfy.utils.ProgressBar and stops on ComfyUI's own
    Cancel flag (set during a model call) with ComfyUI's own exception, before the next model call."""
    out = run_with_comfyui("""
        from rectifid_core.flows import load_flow
        from rectifid_core.objectives.base import ObjectiveOutput
        flow = load_flow(ce.tiny_models_dir("diffusers") / "diffusers" / ce.MODEL_NAMES["diffusers"], dtype="fp32",
                         device="cpu")
        bundle = pack.nodes.common.ObjectiveBundle(lambda image: ObjectiveOutput(image.mean(dim=(1, 2, 3))), ["x"])
        sampler = pack.nodes.sampler.RectifIDSampler()
        args = dict(positive="a photo", negative="", width=16, height=16, seed=0, steps=0, iterations=2,
                    guidance_scale=1.0, cfg=1.0, ck_mode="per_window", solver="anchored", memory="auto", batch_size=1)
        with torch.inference_mode():
            images, latent, plot, report = sampler.sample(flow, bundle, **args)
        bar = pack.nodes.comfy_bridge.last_progress
        calls, step = [], flow.step
        def pressing_cancel(*a, **k):
            calls.append(1)
            if len(calls) == 2:
                mm.interrupt_current_processing(True)
            return step(*a, **k)
        flow.step = pressing_cancel
        try:
            with torch.inference_mode():
                sampler.sample(flow, bundle, **dict(args, iterations=50))
            cancelled = False
        except mm.InterruptProcessingException:
            cancelled = True
        print(json.dumps({"shape": list(images.shape), "report": report, "progress": [bar["value"], bar["total"]],
                          "calls": len(calls), "cancelled": cancelled, "flag_left": mm.processing_interrupted()}))
    """)
    assert out["shape"] == [1, 16, 16, 3] and out["progress"] == [2, 2]
    assert "memory store" in out["report"].splitlines()[0]  # auto on the CPU
    assert out["cancelled"] and out["calls"] == 2 and not out["flag_left"]
