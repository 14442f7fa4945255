"""Run and validate UI-format workflows with ComfyUI's own code ($COMFYUI_PATH, 0.8.0), as its server does.

What is ComfyUI's and what is ours:
- node set: ComfyUI's nodes.py, then `nodes.init_extra_nodes` (its comfy_extras, and its custom-node loader
  on a temporary custom_nodes folder that holds this repo under a symlink named ComfyUI-RectifID); the API
  nodes (network services) are left out, as with --disable-api-nodes. Extras whose packages are missing fail
  to import exactly as in a server start; `Runtime.import_failures` says which and why.
- folders: folder_paths with --base-directory set to a temporary folder; its `models` is a symlink re-pointed
  at the models folder of each call (ComfyUI layout: checkpoints/, diffusion_models/, diffusers/, ...), input
  and output are set per call as --input-directory / --output-directory would.
- workflow -> prompt: `workflow_to_prompt` does what the frontend's graphToPrompt does, from the node
  definitions the server's /object_info hands the frontend (`node_definitions`); see its docstring.
- validation and execution: `execution.validate_prompt` and `execution.PromptExecutor` themselves, with a
  headless stand-in for the server (`HeadlessServer`: the attributes and send_sync the executor and the
  progress handlers use; it records every message) and main.py's progress hook reduced to its messages.

Isolation: once ComfyUI's modules are imported, every later import of `folder_paths` or `comfy` succeeds, and
the pack believes it runs inside ComfyUI. Tests therefore drive ComfyUI in a child process:

    with ComfyUIProcess() as comfy:                      # skips the test when ComfyUI's source is absent
        result = comfy.run_workflow("workflows/x.json", overrides={"RectifIDSampler": {"width": 16}},
                                    models_dir=tiny_models, input_dir=photos, output_dir=tmp_path)
        result.images        # PNG files written by ComfyUI's SaveImage
        result.ui["12"]      # a node's ui output, e.g. PreviewAny's {"text": [...]}
        result.outputs["7"]  # a node's outputs, one value per output slot (tensors, str, numbers, dicts)
        result.error         # the execution_error message, or None
        check = comfy.validate_workflow("workflows/flux.json", models_dir=stub_models)  # validation only
        check.ok, check.describe()

`validate_workflow` suits workflows whose models cannot be built tiny (FLUX's T5): ComfyUI checks every
combo value against the folder listings, so empty files with the saved names in the right model folders
suffice (tests/test_workflows.py validates a stock FLUX.1-schnell graph that way). `ui_workflow` builds a
small UI-format graph in a test, e.g. LoadImage -> PreviewImage to read what ComfyUI's LoadImage returns.
A node's widgets_values must fit its widgets exactly (`map_widgets` says which node does not): saved
workflows store values by position, so a count that differs means the node changed since it was saved. `run_workflow` raises `WorkflowInvalid` (with ComfyUI's messages) when validation fails. The same
functions run in-process (`run_workflow`, `validate_workflow`, `node_definitions` at module level) in a
process that may import ComfyUI.
"""
from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import json
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import comfy_executor as ce

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
FRONTEND_ONLY = ("Note", "MarkdownNote")  # virtual nodes the frontend draws and never sends
SEED_NAMES = ("seed", "noise_seed")  # INT inputs that get a "control after generate" widget by name
UPLOAD_OPTIONS = ("image_upload", "video_upload", "animated_image_upload")  # combos the frontend adds a button to
MODE_NEVER, MODE_BYPASS = 2, 4  # litegraph's LGraphEventMode values for muted and bypassed nodes
PACK_FOLDER = "ComfyUI-RectifID"
Workflow = Union[dict, str, os.PathLike]


class WorkflowInvalid(ValueError):
    """ComfyUI's validation refused the prompt; the message lists its errors per node."""


# ---------------------------------------------------------------- workflow -> API prompt (no ComfyUI needed)

def input_kind(spec: list | tuple) -> str:
    """The socket/widget type of an input spec; combos (a list of choices, or V3's "COMBO") are "COMBO"."""
    return "COMBO" if isinstance(spec[0], (list, tuple)) else spec[0]


def input_options(spec: list | tuple) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def extra_widget_values(name: str, spec: list | tuple) -> int:
    """Widgets the frontend adds after an input's own widget and never sends: the seed's "control after
    generate" (asked for by the option, or by the name seed/noise_seed when the option is absent) and the
    upload button of an image/video file combo."""
    opts, kind = input_options(spec), input_kind(spec)
    if kind == "INT" and opts.get("control_after_generate", name in SEED_NAMES):
        return 1
    if kind == "COMBO" and any(opts.get(key) for key in UPLOAD_OPTIONS):
        return 1
    return 0


def widget_inputs(definition: dict) -> list[tuple[str, list]]:
    """The inputs the frontend shows as widgets, in the order it stores their values (required, then optional)."""
    found = []
    for section in ("required", "optional"):
        specs = definition["input"].get(section, {})
        for name in definition.get("input_order", {}).get(section, list(specs)):
            spec = specs[name]
            if input_kind(spec) in WIDGET_TYPES and not input_options(spec).get("forceInput"):
                found.append((name, spec))
    return found


def map_widgets(definition: dict, values: list, where: str = "") -> dict[str, Any]:
    """widgets_values -> {input name: value}, skipping the values of widgets the frontend never sends."""
    label = where or definition.get("name", "node")
    if not isinstance(values, list):
        raise ValueError(f"{label}: widgets_values is a {type(values).__name__}; only the list form is supported")
    out, i = {}, 0
    for name, spec in widget_inputs(definition):
        if i >= len(values):
            raise ValueError(f"{label}: widgets_values has {len(values)} values, too few for widget {name!r}")
        out[name] = values[i]
        i += 1 + extra_widget_values(name, spec)
    if i != len(values):
        raise ValueError(f"{label}: widgets_values has {len(values)} values, its widgets take {i}: "
                         f"the workflow was saved with another version of the node")
    return out


def load_workflow(workflow: Workflow) -> dict:
    if isinstance(workflow, dict):
        return workflow
    return json.loads(Path(workflow).read_text(encoding="utf-8"))


def workflow_to_prompt(workflow: Workflow, definitions: dict[str, dict]) -> dict[str, dict]:
    """The API prompt the frontend's graphToPrompt sends for a UI-format workflow.

    Per node: every sent widget's value under its input name (a list value wrapped as {"__value__": list}),
    then every linked input as [source node id as str, source slot] (a link into a widget input replaces its
    value), class_type, and _meta.title. Note/MarkdownNote and muted nodes are not sent, and inputs linked to
    a node that is not sent are dropped. Bypassed nodes, reroutes, primitives, groups and subgraphs are not
    supported and raise.
    """
    workflow = load_workflow(workflow)
    if workflow.get("definitions", {}).get("subgraphs"):
        raise NotImplementedError("workflows with subgraphs are not supported by this harness")
    links = {link[0]: link for link in workflow.get("links", [])}
    prompt: dict[str, dict] = {}
    for node in workflow["nodes"]:
        kind, mode = node["type"], node.get("mode", 0)
        if kind in FRONTEND_ONLY or mode == MODE_NEVER:
            continue
        where = f"node {node['id']} ({kind})"
        if mode == MODE_BYPASS:
            raise NotImplementedError(f"{where} is bypassed; this harness does not reroute around bypassed nodes")
        if kind not in definitions:
            raise ValueError(f"{where}: ComfyUI has no node of this type (a custom node pack that is not "
                             f"installed, or a comfy_extras module that failed to import)")
        inputs = {name: {"__value__": value} if isinstance(value, list) else value
                  for name, value in map_widgets(definitions[kind], node.get("widgets_values", []), where).items()}
        for slot in node.get("inputs", []):
            if slot.get("link") is None:
                continue
            _, source, source_slot, _, _, _ = links[slot["link"]]
            inputs[slot["name"]] = [str(source), int(source_slot)]
        prompt[str(node["id"])] = {"inputs": inputs, "class_type": kind,
                                   "_meta": {"title": node.get("title") or definitions[kind]["display_name"]}}
    for entry in prompt.values():
        for name, value in list(entry["inputs"].items()):
            if isinstance(value, list) and len(value) == 2 and value[0] not in prompt:
                del entry["inputs"][name]
    return prompt


def ui_workflow(nodes: dict[int, tuple[str, list]], links: list[tuple[int, int, int, str, str]]) -> dict:
    """A minimal UI-format workflow for tests: {node id: (type, widgets_values)} and links
    (source id, source slot, target id, target input name, type); only what the conversion reads."""
    workflow = {"nodes": [{"id": i, "type": kind, "mode": 0, "widgets_values": list(values), "inputs": []}
                          for i, (kind, values) in nodes.items()], "links": []}
    by_id = {n["id"]: n for n in workflow["nodes"]}
    for link_id, (source, slot, target, name, kind) in enumerate(links, start=1):
        by_id[target]["inputs"].append({"name": name, "type": kind, "link": link_id})
        workflow["links"].append([link_id, source, slot, target, len(by_id[target]["inputs"]) - 1, kind])
    return workflow


def apply_overrides(prompt: dict[str, dict], overrides: dict[str, dict[str, Any]] | None,
                    definitions: dict[str, dict]) -> dict[str, dict]:
    """Replace input values of every node of a class: {class_type: {input name: value}}."""
    for kind, values in (overrides or {}).items():
        if kind not in definitions:
            raise ValueError(f"override for {kind!r}: ComfyUI has no node of this type")
        known = {n for section in ("required", "optional") for n in definitions[kind]["input"].get(section, {})}
        if set(values) - known:
            raise ValueError(f"override for {kind}: no input named {sorted(set(values) - known)}; it has {sorted(known)}")
        for entry in prompt.values():
            if entry["class_type"] == kind:
                entry["inputs"].update(values)
    return prompt


# ---------------------------------------------------------------- results (plain data, picklable)

@dataclass
class Validation:
    prompt: dict[str, dict]
    ok: bool
    error: dict | None = None
    node_errors: dict[str, dict] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """ComfyUI's validation messages, one line per problem, naming the node."""
        lines = [] if self.error is None else [f"{self.error['message']}: {self.error['details']}".strip()]
        for node_id, entry in self.node_errors.items():
            for err in entry["errors"]:
                lines.append(f"node {node_id} ({entry['class_type']}): {err['message']}: {err['details']}")
        return "\n".join(lines) or "valid"


@dataclass
class Result:
    prompt: dict[str, dict]
    outputs: dict[str, tuple] = field(default_factory=dict)  # node id -> one value per output slot
    ui: dict[str, dict] = field(default_factory=dict)  # node id -> its ui output (history "outputs")
    images: list[Path] = field(default_factory=list)  # files SaveImage wrote, in the order it reported them
    messages: list[tuple[str, Any]] = field(default_factory=list)  # everything sent to the client, in order

    def events(self, name: str) -> list[Any]:
        return [data for event, data in self.messages if event == name]

    @property
    def error(self) -> dict | None:
        """The execution_error message (node_id, exception_message, traceback, ...), or None."""
        errors = self.events("execution_error") + self.events("execution_interrupted")
        return errors[0] if errors else None


def _plain(value: Any) -> Any:
    """A copy made of tensors, numbers, strings and containers only, so it crosses to a process without ComfyUI."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if value is None or type(value) in (bool, int, float, str, bytes):
        return value
    for plain in (bool, int, float, str):  # subclasses (enums, numpy scalars, ComfyUI's AnyType)
        if isinstance(value, plain):
            return plain(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if type(value) is tuple:
        return tuple(_plain(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return f"<{type(value).__module__}.{type(value).__qualname__}>"


# ---------------------------------------------------------------- ComfyUI in this process

class HeadlessServer:
    """What PromptExecutor, its progress handlers and the progress hook use of ComfyUI's PromptServer."""

    def __init__(self) -> None:
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.last_prompt_id: str | None = None
        self.sockets_metadata: dict = {}
        self.messages: list[tuple[Any, Any]] = []

    def send_sync(self, event: Any, data: Any, sid: str | None = None) -> None:
        self.messages.append((event, data))

    def queue_updated(self) -> None:
        """PromptQueue calls this; there is no queue here."""


class _ImportFailures(logging.Handler):
    """Collects ComfyUI's 'Cannot import <file> module for custom nodes: <reason>' warnings."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.reasons: dict[str, str] = {}

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if text.startswith("Cannot import ") and " module for custom nodes: " in text:
            path, reason = text[len("Cannot import "):].split(" module for custom nodes: ", 1)
            self.reasons[os.path.basename(path)] = reason


@dataclass
class Runtime:
    base: Path
    server: HeadlessServer
    import_failures: dict[str, str]  # comfy_extras file -> why it did not import


_RUNTIME: Runtime | None = None


def start(comfyui: str | os.PathLike | None = None) -> Runtime:
    """Import ComfyUI and load its node set as a server start does (CPU); once per process."""
    global _RUNTIME
    if _RUNTIME is not None:
        return _RUNTIME
    path = str(Path(comfyui) if comfyui else ce.comfyui_location())
    repo = os.path.realpath(ce.REPO)
    # the repo's own nodes/ package must not shadow ComfyUI's nodes.py
    sys.path[:] = [path] + [p for p in sys.path if p and os.path.realpath(p) != repo]
    base = Path(tempfile.mkdtemp(prefix="comfyui-base-"))
    atexit.register(shutil.rmtree, base, True)
    for name in ("input", "output", "temp", "custom_nodes", "empty-models"):
        (base / name).mkdir()
    (base / "models").symlink_to(base / "empty-models")
    (base / "custom_nodes" / PACK_FOLDER).symlink_to(repo, target_is_directory=True)

    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    comfy.cli_args.args.base_directory = str(base)
    import comfy.model_management  # noqa: F401  (reads args.cpu)
    import comfy.utils
    import nodes
    from comfy_execution.progress import get_progress_state
    from comfy_execution.utils import get_executing_context

    failures = _ImportFailures()
    logging.getLogger().addHandler(failures)
    try:
        failed = asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    finally:
        logging.getLogger().removeHandler(failures)
    if PACK_FOLDER not in nodes.LOADED_MODULE_DIRS:
        raise ImportError(f"ComfyUI's custom-node loader did not load the pack from {base / 'custom_nodes'}: "
                          f"{failures.reasons.get(PACK_FOLDER, 'see the log above')}")
    server = HeadlessServer()

    def progress_hook(value, total, preview_image, prompt_id=None, node_id=None):
        """main.py's hook, less the binary preview message."""
        context = get_executing_context()
        prompt_id = prompt_id or (context.prompt_id if context else server.last_prompt_id)
        node_id = node_id or (context.node_id if context else server.last_node_id)
        comfy.model_management.throw_exception_if_processing_interrupted()
        get_progress_state().update_progress(node_id, value, total, preview_image)
        server.send_sync("progress", {"value": value, "max": total, "prompt_id": prompt_id, "node": node_id},
                         server.client_id)

    comfy.utils.set_progress_bar_global_hook(progress_hook)
    _RUNTIME = Runtime(base, server, {name: failures.reasons.get(name, "") for name in failed})
    return _RUNTIME


def _point_folders(models_dir: str | os.PathLike | None, input_dir: str | os.PathLike | None,
                   output_dir: str | os.PathLike | None) -> None:
    import folder_paths

    base = start().base
    link = base / "models"
    link.unlink()
    link.symlink_to(Path(models_dir).resolve() if models_dir else base / "empty-models", target_is_directory=True)
    folder_paths.filename_list_cache.clear()
    folder_paths.set_input_directory(str(Path(input_dir).resolve() if input_dir else base / "input"))
    folder_paths.set_output_directory(str(Path(output_dir).resolve() if output_dir else base / "output"))
    folder_paths.set_temp_directory(str(base / "temp"))


def node_definitions() -> dict[str, dict]:
    """What the server's /object_info hands the frontend for every loaded node (JSON data)."""
    start()
    import folder_paths
    import nodes
    from comfy_api.internal import _ComfyNodeInternal

    out = {}
    with folder_paths.cache_helper:
        for name, cls in nodes.NODE_CLASS_MAPPINGS.items():
            if issubclass(cls, _ComfyNodeInternal):
                info = cls.GET_NODE_INFO_V1()
            else:
                schema = cls.INPUT_TYPES()
                info = {"input": schema, "input_order": {k: list(v) for k, v in schema.items()},
                        "output": list(cls.RETURN_TYPES), "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)),
                        "output_is_list": list(getattr(cls, "OUTPUT_IS_LIST", [False] * len(cls.RETURN_TYPES))),
                        "name": name, "display_name": nodes.NODE_DISPLAY_NAME_MAPPINGS.get(name, name),
                        "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
                        "python_module": getattr(cls, "RELATIVE_PYTHON_MODULE", "nodes")}
            out[name] = json.loads(json.dumps(info, default=str))
    return out


def validate_workflow(workflow: Workflow, overrides: dict[str, dict[str, Any]] | None = None,
                      models_dir: str | os.PathLike | None = None, input_dir: str | os.PathLike | None = None
                      ) -> Validation:
    """Convert as the frontend does and check with ComfyUI's execution.validate_prompt; nothing runs."""
    import execution

    start()
    _point_folders(models_dir, input_dir, None)
    definitions = node_definitions()
    prompt = apply_overrides(workflow_to_prompt(workflow, definitions), overrides, definitions)
    ok, error, outputs, node_errors = asyncio.run(execution.validate_prompt(str(uuid.uuid4()), prompt, None))
    return Validation(prompt, bool(ok) and not node_errors, _plain(error), _plain(node_errors), list(outputs))


def run_workflow(workflow: Workflow, overrides: dict[str, dict[str, Any]] | None = None,
                 models_dir: str | os.PathLike | None = None, input_dir: str | os.PathLike | None = None,
                 output_dir: str | os.PathLike | None = None) -> Result:
    """Validate, then execute with ComfyUI's PromptExecutor (fresh caches) as its prompt worker does."""
    import execution

    check = validate_workflow(workflow, overrides, models_dir, input_dir)
    if not check.ok:
        raise WorkflowInvalid(check.describe())
    _point_folders(models_dir, input_dir, output_dir)
    server = start().server
    server.messages = []
    prompt_id = str(uuid.uuid4())
    server.last_prompt_id = prompt_id
    executor = execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC,
                                        cache_args={"lru": 0, "ram": 0})
    executor.execute(check.prompt, prompt_id, {"client_id": "rectifid-tests"}, check.outputs)
    import folder_paths

    result = Result(check.prompt, messages=[(e, _plain(d)) for e, d in server.messages if isinstance(e, str)])
    result.ui = _plain(executor.history_result["outputs"])
    for node_id in check.prompt:
        entry = executor.caches.outputs.get(node_id)
        if entry is not None:
            result.outputs[node_id] = tuple(_plain(v[0] if len(v) == 1 else v) for v in entry.outputs)
    out = Path(folder_paths.get_output_directory())
    result.images = [out / image.get("subfolder", "") / image["filename"] for ui in result.ui.values()
                     for image in ui.get("images", []) if image.get("type") == "output"]
    return result


# ---------------------------------------------------------------- ComfyUI in a child process

def _in_child(comfyui: str, threads: int, fn: Any, *args: Any) -> Any:
    """Start ComfyUI in this child process on its first call (an error there reaches the parent), then call fn."""
    if _RUNTIME is None:
        import torch

        torch.set_num_threads(threads)
        shown = logging.StreamHandler()  # errors only on stderr; start() collects the import warnings
        shown.setLevel(logging.ERROR)
        logging.getLogger().addHandler(shown)
        logging.getLogger().setLevel(logging.WARNING)
        start(comfyui)
    return fn(*args)


def _import_failures() -> dict[str, str]:
    return dict(start().import_failures)


class ComfyUIProcess:
    """ComfyUI loaded in one child process (spawned, so this one never imports it); calls run there in turn."""

    def __init__(self, comfyui: str | os.PathLike | None = None) -> None:
        import torch

        self.path = str(comfyui or ce.comfyui_path())  # skips the calling test when ComfyUI is absent
        self._threads = torch.get_num_threads()
        self._pool = concurrent.futures.ProcessPoolExecutor(max_workers=1,
                                                            mp_context=multiprocessing.get_context("spawn"))
        self._definitions: dict[str, dict] | None = None

    def _call(self, fn: Any, *args: Any) -> Any:
        return self._pool.submit(_in_child, self.path, self._threads, fn, *args).result()

    def call(self, fn: Any, *args: Any) -> Any:
        """Run a module-level function in the ComfyUI process (e.g. a model builder that needs ComfyUI's key maps)."""
        return self._call(fn, *args)

    def run_workflow(self, workflow: Workflow, overrides: dict[str, dict[str, Any]] | None = None,
                     models_dir: str | os.PathLike | None = None, input_dir: str | os.PathLike | None = None,
                     output_dir: str | os.PathLike | None = None) -> Result:
        return self._call(run_workflow, load_workflow(workflow), overrides, models_dir, input_dir, output_dir)

    def validate_workflow(self, workflow: Workflow, overrides: dict[str, dict[str, Any]] | None = None,
                          models_dir: str | os.PathLike | None = None,
                          input_dir: str | os.PathLike | None = None) -> Validation:
        return self._call(validate_workflow, load_workflow(workflow), overrides, models_dir, input_dir)

    def node_definitions(self) -> dict[str, dict]:
        if self._definitions is None:
            self._definitions = self._call(node_definitions)
        return self._definitions

    def import_failures(self) -> dict[str, str]:
        """comfy_extras files that did not import in this environment -> the reason ComfyUI logged."""
        return self._call(_import_failures)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "ComfyUIProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
