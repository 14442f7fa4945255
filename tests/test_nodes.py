"""ComfyUI's node contract for every class the pack registers, and the pack's import guarantees."""
from __future__ import annotations

import inspect
import json
import re
import os
import subprocess
import sys
import textwrap

import pytest

import comfy_executor as ce
import comfyui_runtime as cr

PACK = ce.load_pack()
CLASSES = PACK.NODE_CLASS_MAPPINGS
SOCKET_TYPES = {"IMAGE", "MASK", "LATENT", "RECTIFIED_FLOW", "RECTIFID_DISCRIMINATOR", "RECTIFID_SUBJECT",
                "RECTIFID_OBJECTIVE", "MODEL", "VAE", "CONDITIONING", "SAMPLER", "SIGMAS"}  # the last five: ComfyUI's own


@pytest.fixture(params=sorted(CLASSES), ids=str)
def node(request):
    return request.param, CLASSES[request.param]


def test_mappings_agree():
    assert set(CLASSES) == set(PACK.NODE_DISPLAY_NAME_MAPPINGS)
    assert all(name.strip() for name in PACK.NODE_DISPLAY_NAME_MAPPINGS.values())
    assert len(set(PACK.NODE_DISPLAY_NAME_MAPPINGS.values())) == len(CLASSES)


def test_input_schema(node):
    name, cls = node
    schema = cls.INPUT_TYPES()
    assert set(schema) <= {"required", "optional", "hidden"}, name
    assert schema.get("required"), f"{name} has no required inputs"
    for section in ("required", "optional"):
        for inp, spec in schema.get(section, {}).items():
            assert isinstance(spec, tuple) and 1 <= len(spec) <= 2, (name, inp)
            kind, opts = cr.input_kind(spec), cr.input_options(spec)
            assert opts.get("tooltip", "").strip(), f"{name}.{inp} has no tooltip"
            if kind == "COMBO":
                choices = list(spec[0])
                assert choices and all(isinstance(c, str) for c in choices), (name, inp)
                assert opts.get("default", choices[0]) in choices, (name, inp)
            elif kind in ("INT", "FLOAT"):
                assert opts["min"] <= opts["default"] <= opts["max"], (name, inp, opts)
                assert isinstance(opts["default"], int if kind == "INT" else float), (name, inp)
            elif kind == "STRING":
                assert isinstance(opts.get("default", ""), str), (name, inp)
            else:
                assert kind in SOCKET_TYPES, f"{name}.{inp}: unexpected type {kind!r}"


def test_outputs_and_function(node):
    name, cls = node
    assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES) == len(cls.OUTPUT_TOOLTIPS), name
    assert all(t in SOCKET_TYPES | {"STRING"} for t in cls.RETURN_TYPES), name
    assert cls.CATEGORY.split("/")[0] == "RectifID", name
    assert cls.DESCRIPTION.strip(), name
    params = inspect.signature(getattr(cls, cls.FUNCTION)).parameters
    schema = cls.INPUT_TYPES()
    names = set(schema["required"]) | set(schema.get("optional", {}))
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    accepted = {n for n, p in params.items() if n != "self" and p.kind is not p.VAR_KEYWORD}
    assert set(schema["required"]) <= accepted, f"{name}: {set(schema['required']) - accepted} not accepted"
    assert var_kw or names <= accepted, f"{name}: optional inputs {names - accepted} not accepted"
    required_params = {n for n, p in params.items() if n != "self" and p.default is p.empty
                       and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    assert required_params <= set(schema["required"]), f"{name}: {required_params - set(schema['required'])}"


def test_seed_widget_has_generate_control():
    seed = CLASSES["RectifIDSampler"].INPUT_TYPES()["required"]["seed"]
    assert cr.extra_widget_values("seed", seed) == 1


def test_sampler_inputs_and_outputs():
    """Saved workflows store widget values by position: the order of the inputs is part of the node's contract."""
    sampler = CLASSES["RectifIDSampler"]
    req = sampler.INPUT_TYPES()["required"]
    assert list(req) == ["flow", "objective", "positive", "negative", "width", "height", "seed", "steps", "iterations",
                         "guidance_scale", "cfg", "ck_mode", "solver", "memory", "batch_size", "compile"]
    for name in ("width", "height", "steps", "guidance_scale", "cfg"):
        assert req[name][1]["default"] == 0 and req[name][1]["min"] == 0, name  # 0 = auto
        assert "0 = auto" in req[name][1]["tooltip"], name
    assert req["iterations"][1]["default"] == 20 and req["iterations"][1]["max"] >= 200
    assert {"anchored", "no_anchor", "noise_gd"} <= set(req["solver"][0]) and req["solver"][1]["default"] == "anchored"
    assert sampler.RETURN_TYPES == ("IMAGE", "LATENT", "IMAGE", "STRING")
    assert sampler.RETURN_NAMES == ("images", "latent", "history_plot", "report")


def test_sampler_auto_tooltips_say_what_auto_resolves_to():
    from types import SimpleNamespace

    from rectifid_core.flows import euler, perflow
    from rectifid_core.guidance import auto_guidance_scale

    req = CLASSES["RectifIDSampler"].INPUT_TYPES()["required"]
    tip = {name: req[name][1]["tooltip"] for name in ("width", "height", "cfg", "guidance_scale")}
    for name in ("width", "height"):
        for defaults, flows in ((perflow._SD15, "SD1.5 flows"), (perflow._SD21, "SD2.1"), (perflow._SDXL, "SDXL"),
                                (euler._DEFAULTS, "SD1.5 flows")):
            assert f"{getattr(defaults, name)} for {flows}" in tip[name]
    for defaults, flows in ((perflow._SD15, "PeRFlow SD1.5"), (perflow._SD21, "PeRFlow SD2.1"),
                            (perflow._SDXL, "PeRFlow SDXL"), (euler._DEFAULTS, "2-rectified flow and InstaFlow")):
        assert f"{defaults.cfg_scale} for {flows}" in tip["cfg"]
    obj, face = SimpleNamespace(kind="subject"), SimpleNamespace(kind="face")
    assert f"{auto_guidance_scale(SimpleNamespace(subjects=[face, obj]))} when a subject is an object" in tip[
        "guidance_scale"]
    assert f"else {auto_guidance_scale(face)} (faces, CLIP" in tip["guidance_scale"]
    assert auto_guidance_scale(SimpleNamespace(kind="clip")) == auto_guidance_scale(face)


# a choice a tooltip names: "name = ..." / "name / ..." or a snake_case word; file names and paths are not choices
NAMED_CHOICE = re.compile(r"(?<![\w./-])([a-z][a-z0-9_]*)\s+(?:=|/)\s|(?<![\w./-])([a-z][a-z0-9]*_[a-z0-9_]+)(?![\w./-])")
MATH_SYMBOL = re.compile(r"[a-z]+_[a-z0-9]")  # c_k, gamma_k
STATED_DEFAULT = re.compile(r"\bdefault[: ]\s*'?([\w.]+)|'?([\w.]+)'? \(the default\)|\b([\w.]+) default\b")


def _as_number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def test_tooltips_name_real_choices_and_true_defaults(node):
    """A combo's tooltip names only choices that exist; a default a tooltip states is the input's real default."""
    name, cls = node
    for section in ("required", "optional"):
        for inp, spec in cls.INPUT_TYPES().get(section, {}).items():
            kind, opts = cr.input_kind(spec), cr.input_options(spec)
            tooltip = opts.get("tooltip", "")
            if kind == "COMBO":
                for match in NAMED_CHOICE.finditer(tooltip):
                    word = match.group(1) or match.group(2)
                    assert word in spec[0] or MATH_SYMBOL.fullmatch(word), \
                        f"{name}.{inp}: the tooltip names {word!r}, which is not one of {list(spec[0])}"
            for match in STATED_DEFAULT.finditer(tooltip):
                stated = next(g for g in match.groups() if g)
                real = opts.get("default", spec[0][0] if kind == "COMBO" else None)
                number = _as_number(stated)
                if number is None and kind != "COMBO":
                    continue  # "default" in prose about something else
                same = number == real if number is not None and isinstance(real, (int, float)) else stated == real
                assert same, f"{name}.{inp}: tooltip states default {stated!r}, the real default is {real!r}"


def test_model_combos_list_folders(tmp_path, monkeypatch):
    """Loader combos show what is in the folders, and a missing model names the folders searched."""
    monkeypatch.setenv("RECTIFID_MODELS_DIR", str(tmp_path))
    (tmp_path / "diffusers" / "sd15-base").mkdir(parents=True)
    (tmp_path / "diffusers" / "sd15-base" / "model_index.json").write_text("{}")
    (tmp_path / "diffusers" / "nested" / "perflow-sd15").mkdir(parents=True)
    (tmp_path / "diffusers" / "nested" / "perflow-sd15" / "model_index.json").write_text("{}")
    (tmp_path / "insightface" / "models" / "antelopev2").mkdir(parents=True)
    (tmp_path / "insightface" / "models" / "antelopev2" / "glintr100.onnx").write_bytes(b"")
    (tmp_path / "insightface" / "models" / "empty").mkdir()
    flows = CLASSES["RectifIDFlowLoader"].INPUT_TYPES()["required"]["flow_folder"][0]
    assert flows == ["nested/perflow-sd15", "sd15-base"]  # PeRFlow first
    packs = CLASSES["RectifIDFaceModelLoader"].INPUT_TYPES()["required"]["model_pack"][0]
    assert packs == ["antelopev2"]
    assert CLASSES["RectifIDObjectModelLoader"].INPUT_TYPES()["required"]["dinov2"][0] == [
        "(no models in models/dinov2)"]
    with pytest.raises(FileNotFoundError) as err:
        CLASSES["RectifIDFlowLoader"]().load("missing-flow", "auto", "auto", "auto", "cpu")
    assert str(tmp_path / "diffusers") in str(err.value) and "sd15-base" in str(err.value)


def _run_blocked(code: str, env_dir: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter where insightface, onnxruntime and onnx cannot be imported."""
    blocker = textwrap.dedent("""
        import importlib.abc, sys
        class _Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("insightface", "onnxruntime", "onnx"):
                    raise ImportError(f"No module named {name!r}", name=name)
                return None
        sys.meta_path.insert(0, _Block())
    """)
    env = dict(os.environ, RECTIFID_MODELS_DIR=env_dir, PYTHONPATH=str(ce.REPO / "tests"))
    return subprocess.run([sys.executable, "-c", blocker + textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, cwd=str(ce.REPO.parent), timeout=120)


def test_pack_imports_without_insightface_and_onnxruntime(tmp_path):
    pack = tmp_path / "insightface" / "models" / "antelopev2"
    pack.mkdir(parents=True)
    for f in ("scrfd_10g_bnkps.onnx", "glintr100.onnx"):
        (pack / f).write_bytes(b"")
    proc = _run_blocked("""
        import json, sys, torch
        import comfy_executor as ce
        pack = ce.load_pack()
        out = {"nodes": sorted(pack.NODE_CLASS_MAPPINGS),
               "blocked_loaded": [m for m in ("insightface", "onnxruntime", "onnx") if m in sys.modules]}
        try:
            with torch.inference_mode():
                pack.NODE_CLASS_MAPPINGS["RectifIDFaceModelLoader"]().load("antelopev2", "auto", "cpu")
        except Exception as exc:
            out["error"] = f"{type(exc).__name__}: {exc}"
        print(json.dumps(out))
    """, str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["nodes"] == sorted(CLASSES)
    assert out["blocked_loaded"] == []
    assert out["error"].startswith("ImportError") and "onnxruntime" in out["error"]
    assert "pip install -r requirements.txt" in out["error"]
