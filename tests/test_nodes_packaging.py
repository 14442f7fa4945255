"""The pack as ComfyUI and a user's checkout see it: no shadowed modules, tests that run under any folder name."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import comfy_executor as ce

COPY_IGNORE = shutil.ignore_patterns(".git", "__pycache__", ".pytest_cache", ".venv*", "out", "build", "*.egg-info")


def _clean_env() -> dict[str, str]:
    """The environment without anything that would put this checkout on sys.path."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def test_importing_the_pack_shadows_no_other_module(tmp_path):
    """Another pack's (or ComfyUI's) `nodes` and `tests` modules stay importable after our pack is loaded."""
    other = tmp_path / "other_pack_modules"
    (other / "tests").mkdir(parents=True)
    (other / "nodes.py").write_text("WHO = 'other nodes'\n")
    (other / "tests" / "__init__.py").write_text("WHO = 'other tests'\n")
    code = textwrap.dedent(f"""
        import importlib.util, json, os, sys
        sys.path.insert(0, {str(other)!r})
        pack_dir = {str(ce.REPO)!r}
        spec = importlib.util.spec_from_file_location("ComfyUI-RectifID", os.path.join(pack_dir, "__init__.py"))
        pack = importlib.util.module_from_spec(spec)
        sys.modules["ComfyUI-RectifID"] = pack
        spec.loader.exec_module(pack)
        import nodes, tests, rectifid_core
        print(json.dumps({{"nodes": getattr(nodes, "WHO", nodes.__file__), "tests": getattr(tests, "WHO", tests.__file__),
                          "core": rectifid_core.__file__, "n": len(pack.NODE_CLASS_MAPPINGS),
                          "pack_on_path": any(os.path.realpath(p or ".") == os.path.realpath(pack_dir)
                                              for p in sys.path)}}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(tmp_path),
                          env=_clean_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["nodes"] == "other nodes" and out["tests"] == "other tests"
    assert not out["pack_on_path"]
    assert Path(out["core"]).resolve() == (ce.REPO / "rectifid_core" / "__init__.py").resolve()
    assert out["n"] == len(ce.load_pack().NODE_CLASS_MAPPINGS)


def test_readme_test_command_runs_in_a_checkout_named_like_the_pack(tmp_path):
    """`cd ComfyUI-RectifID && python -m pytest` must not import the root __init__.py as a test package (its
    folder name is no Python identifier); a folder name that is one must work as well."""
    for name in ("ComfyUI-RectifID", "rectifid_pack"):
        checkout = tmp_path / name
        shutil.copytree(ce.REPO, checkout, ignore=COPY_IGNORE)
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               "tests/test_nodes.py::test_mappings_agree"], capture_output=True, text=True,
                              cwd=str(checkout), env=_clean_env(), timeout=300)
        assert proc.returncode == 0 and "1 passed" in proc.stdout, (name, proc.stdout[-3000:], proc.stderr[-2000:])
