"""Command line for RectifID without ComfyUI: same pipeline, same seeds, same images as the nodes.

    python -m rectifid_core --flow models/diffusers/perflow-sd15-dreamshaper \\
        --faces models/insightface --subject face:alice=alice.jpg \\
        --prompt "a photo of a person in a snowy park" --iterations 20 --output out/alice.png

A subject is KIND[:LABEL]=IMAGE[,IMAGE...] with KIND face (needs --faces), object
(needs --dinov2 and --owlvit; LABEL names it for the detector, e.g. object:dog=dog.jpg)
or clip (needs --clip). Several --subject options make one image with several subjects.
Writes one PNG per prompt and batch image, and a JSON file with the loss and the
similarities per iteration.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .compiled import check_compile_support, show_compile_progress
from .devices import parse_device
from .guidance import (CK_MODES, MEMORY_MODES, SOLVER_MODES, GuidanceConfig, IterationInfo, check_memory_mode,
                       estimate_guidance_bytes, memory_family, recomputed_steps, resolve_memory_mode)
from .objectives.faces import FACE_SELECTIONS
from .objectives.onnx_convert import UnsupportedOnnxOperator
from .objectives.scrfd import DETECTOR_BACKENDS
from .pipeline import (SUBJECT_KINDS, PersonalizeSettings, auto_dtype, load_clip_discriminator,
                       load_face_discriminator, load_object_discriminator, multi_subject_objective, personalize,
                       subject_objective, unique_labels)

def auto_or(kind: type) -> Callable[[str], int | float | None]:
    """argparse type: "auto" -> None (resolved from the flow or the objective), else a number of `kind`."""
    def parse(text: str) -> int | float | None:
        if text.strip().lower() == "auto":
            return None
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected 'auto' or {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
    return parse


class UsageError(ValueError):
    """Bad command-line input; reported without a traceback, exit status 2."""


@dataclass
class SubjectSpec:
    kind: str
    label: str
    images: list[Path]


def parse_subject(text: str) -> SubjectSpec:
    """KIND[:LABEL]=IMAGE[,IMAGE...] -> SubjectSpec (the image files are checked to exist)."""
    head, sep, paths = text.partition("=")
    if not sep or not paths.strip():
        raise UsageError(f"--subject {text!r}: expected KIND[:LABEL]=IMAGE[,IMAGE...], e.g. face=alice.jpg "
                         "or object:dog=dog1.jpg,dog2.jpg")
    kind, _, label = head.partition(":")
    kind = kind.strip().lower()
    if kind not in SUBJECT_KINDS:
        raise UsageError(f"--subject {text!r}: unknown kind {kind!r}; use one of {', '.join(SUBJECT_KINDS)}")
    images = [Path(p.strip()).expanduser() for p in paths.split(",") if p.strip()]
    for path in images:
        if not path.is_file():
            raise UsageError(f"--subject {text!r}: reference image not found: {path}")
    if kind == "object" and not label.strip():
        raise UsageError(f"--subject {text!r}: an object subject needs a label naming it for the detector, "
                         "e.g. object:dog=dog.jpg")
    return SubjectSpec(kind, label.strip() or ("person" if kind == "face" else kind), images)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rectifid", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    m = p.add_argument_group("models (local folders; nothing is downloaded)")
    m.add_argument("--flow", required=True, type=Path,
                   help="diffusers folder of a rectified flow (PeRFlow, InstaFlow, 2-rectified flow, "
                        "FLUX.1-schnell, SD3.5 Large Turbo)")
    m.add_argument("--flow-type", default="auto",
                   help="auto, perflow, euler_velocity, flux or sd3 (default auto: from the folder)")
    m.add_argument("--prediction-type", default="auto", help="PeRFlow prediction type (default auto)")
    m.add_argument("--faces", type=Path, help="insightface folder holding antelopev2 (face subjects)")
    m.add_argument("--provider", default="auto",
                   help="onnxruntime provider for the face detector when it runs in onnxruntime (default auto)")
    m.add_argument("--detector", default="auto", choices=DETECTOR_BACKENDS,
                   help="where the face detector runs: torch (on --device) or onnxruntime (on --provider); "
                        "auto = torch on CUDA, else onnxruntime")
    m.add_argument("--dinov2", type=Path, help="transformers DINOv2 folder (object subjects)")
    m.add_argument("--owlvit", type=Path, help="transformers OWL-ViT folder (object subjects)")
    m.add_argument("--clip", type=Path, help="transformers CLIP vision folder (clip subjects)")
    m.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    m.add_argument("--dtype", default="auto", choices=("auto", "fp16", "bf16", "fp32"),
                   help="weights precision (default: fp16 on a GPU, bf16 for FLUX / SD3 as their model cards load "
                        "them, fp32 on the CPU)")

    s = p.add_argument_group("subjects")
    s.add_argument("--subject", action="append", required=True, metavar="KIND[:LABEL]=IMAGE[,IMAGE...]",
                   help="a reference subject; repeat for several subjects in one image")
    s.add_argument("--weight", action="append", type=float, metavar="W",
                   help="per-subject weight, in --subject order (several subjects only; default 1)")
    s.add_argument("--l1-weight", type=float, default=0.0,
                   help="objects: pixel L1 weight on the crop, ~1000 for rigid objects (default 0)")
    s.add_argument("--selection", default="insightface", choices=[c for c in FACE_SELECTIONS if c != "mask"],
                   help="single face subject: which face of each reference and of the generated image is used "
                        "(default insightface: its own ranking, as RectifID's code)")
    s.add_argument("--index", type=int, default=0,
                   help="with --selection index: which face, counted from the left from 0 (-1 = rightmost)")

    g = p.add_argument_group("generation")
    g.add_argument("--prompt", action="append", required=True, help="prompt; repeat for several outputs")
    g.add_argument("--negative", default="", help="negative prompt (default empty)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=1, help="images per prompt (default 1)")
    g.add_argument("--width", type=auto_or(int), default=None, metavar="auto|W",
                   help="image width (default auto: 512 SD1.5 and 2-RF/InstaFlow, 768 SD2.1, 1024 SDXL, FLUX.1, "
                        "SD3.5)")
    g.add_argument("--height", type=auto_or(int), default=None, metavar="auto|H", help="image height (default auto)")
    g.add_argument("--steps", type=auto_or(int), default=None, metavar="auto|S",
                   help="model calls per pass (default auto: the flow's K trained windows, 4 for PeRFlow; more "
                        "steps run inside PeRFlow's windows; 2-RF/InstaFlow, FLUX and SD3 take it as their Euler "
                        "steps, 4 for FLUX.1-schnell and SD3.5 Large Turbo)")
    g.add_argument("--iterations", type=int, default=20, help="N guidance iterations: 20 fast, 50, 100 best")
    g.add_argument("--scale", type=auto_or(float), default=None, metavar="auto|S",
                   help="guidance scale s (default auto: 1.0 for faces, 2.0 when an object subject is present)")
    g.add_argument("--cfg", type=auto_or(float), default=None, metavar="auto|W",
                   help="classifier-free guidance (default auto: 3.0 PeRFlow SD1.5, 4.5 SD2.1, 1.0 SDXL, "
                        "1.5 2-RF/InstaFlow, 1.0 = off for FLUX.1-schnell and SD3.5 Large Turbo; above 1 runs "
                        "true CFG with --negative)")
    g.add_argument("--ck-mode", default="per_window", choices=CK_MODES)
    g.add_argument("--solver", default="anchored", choices=SOLVER_MODES)
    g.add_argument("--memory", default="auto", type=memory_mode, metavar="|".join(MEMORY_MODES) + "|partial:N",
                   help="store: keep activations (fastest); recompute_vae: keep the UNet's, recompute the VAE "
                        "decoder's in the backward pass; partial:N: also recompute the UNet calls of the first N "
                        "steps (one extra UNet forward each), partial: the fewest N that fit in free GPU memory; "
                        "checkpoint: recompute every step (least VRAM of these, slowest); lowest: also one CFG half "
                        "at a time; auto: the fastest of store, recompute_vae, partial:N, checkpoint that fits in "
                        "free GPU memory (default)")
    g.add_argument("--compile", action="store_true",
                   help="run the guidance iteration through torch.compile (CUDA graphs on CUDA); the first run of "
                        "a size compiles (minutes), later runs reuse the kernels cached under "
                        "~/.cache/rectifid/torch_compile")

    o = p.add_argument_group("output")
    o.add_argument("--output", type=Path, default=Path("rectifid.png"),
                   help="PNG path; with several prompts or images, _PP_BB is added before the suffix")
    o.add_argument("--history", type=Path, help="JSON of losses/similarities (default: OUTPUT with .json)")
    o.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return p


def _check_dir(path: Path | None, flag: str, needed_for: str) -> Path:
    if path is None:
        raise UsageError(f"{needed_for} needs {flag}")
    if not path.expanduser().is_dir():
        raise UsageError(f"{flag} {path}: folder not found")
    return path.expanduser()


def check_writable(path: Path, flag: str) -> None:
    """Refuse an output path that cannot be written, before minutes of loading and sampling are spent."""
    path = path.expanduser()
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder; give a file name such as {path / 'rectifid.png'}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{flag} {path}: {parent} is a file, so the folder cannot be created there")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UsageError(f"{flag} {path}: no permission to write in {parent}; choose another location")


def check_image_format(path: Path, flag: str) -> None:
    """The output's suffix must name a format PIL can write; found out at the end, it would lose the images."""
    from PIL import Image

    Image.init()
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise UsageError(f"{flag} {path}: cannot tell which image format to write from the suffix "
                         f"{path.suffix or '(none)'!r}; end the name in .png (lossless), .jpg or .webp")


def check_image_size(width: int | None, height: int | None, factor: int) -> None:
    """Width and height must be positive multiples of the flow's pixel block (None = the flow's default)."""
    for flag, value in (("--width", width), ("--height", height)):
        if value is not None and (value <= 0 or value % factor):
            near = sorted({max(factor, value // factor * factor), max(factor, -(-value // factor) * factor)})
            raise UsageError(f"{flag} {value} is not a positive multiple of {factor} (the flow works on "
                             f"{factor}x{factor} pixel blocks); use {' or '.join(map(str, near))}")


def memory_mode(value: str) -> str:
    """argparse type of --memory: one of MEMORY_MODES or partial:N."""
    try:
        check_memory_mode(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def memory_refusal(flow, shape: tuple[int, ...], memory: str, free_bytes: int, num_steps: int) -> str | None:
    """Why a generation of latent `shape` will not fit in `free_bytes`, or None when the estimate says it fits.

    Uses the mode asked for, or for "auto" and "partial" the leanest they may fall back to.
    """
    need = estimate_guidance_bytes(shape, num_steps, memory_family(flow), flow.dtype)
    mode = resolve_memory_mode(memory, flow, shape, free_bytes=0, num_steps=num_steps)  # the leanest choice
    recomputed_steps(mode, num_steps)  # partial:N with N >= the steps: a clear error
    if need[mode] <= free_bytes:
        return None
    gib = 1024 ** 3
    _, _, h, w = shape
    f = flow.vae_scale_factor
    return (f"{w * f}x{h * f} with batch size {shape[0]} needs about {need[mode] / gib:.1f} GiB of GPU memory for "
            f"guidance (memory mode {mode}), but only {free_bytes / gib:.1f} GiB are free; use a smaller size or "
            "batch size" + ("" if need[mode] <= need["checkpoint"] else ", or --memory checkpoint")
            + ", or close other GPU jobs")


def output_paths(output: Path, prompts: int, batch: int) -> list[list[Path]]:
    """One path per prompt and batch image; the plain path when there is only one image."""
    if prompts == 1 and batch == 1:
        return [[output]]
    suffix = output.suffix or ".png"
    return [[output.with_name(f"{output.stem}_{i:02d}_{b:02d}{suffix}") for b in range(batch)]
            for i in range(prompts)]


class StderrProgress:
    """One rewritten stderr line per prompt: iteration, loss, similarity per subject, elapsed time."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.label, self.enabled, self.start = label, enabled, time.monotonic()

    def __call__(self, info: IterationInfo) -> None:
        if not self.enabled:
            return
        sims = info.diagnostics.get("similarity")
        shown = ""
        if isinstance(sims, list) and sims and not isinstance(sims[0], list):
            sims = [sims]
        if isinstance(sims, list) and sims:
            values = [v for v in sims[0] if v is not None]
            shown = "  similarity " + " ".join(f"{v:.3f}" for v in values) if values else "  (subject not found)"
        elapsed = time.monotonic() - self.start
        sys.stderr.write(f"\r{self.label} iteration {info.iteration + 1}/{info.iterations}  "
                         f"loss {info.loss:.3f}{shown}  {elapsed:.0f}s ")
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def _save_png(image: torch.Tensor, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    array = (image.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array).save(path)


def _settings(args: argparse.Namespace, prompt: str, config: GuidanceConfig) -> PersonalizeSettings:
    return PersonalizeSettings(prompt=prompt, negative_prompt=args.negative, width=args.width, height=args.height,
                               seed=args.seed, batch_size=args.batch_size, cfg_scale=args.cfg, num_steps=args.steps,
                               guidance=config)


def run(args: argparse.Namespace) -> dict:
    """Load everything once, then personalize every prompt; returns the history written to JSON."""
    from .flows import load_flow
    from .flows.loading import image_size_multiple, inspect_flow_folder
    from .images import load_image

    # every check that needs no model runs first: a mistake must not cost minutes of loading
    specs = [parse_subject(s) for s in args.subject]
    if args.weight is not None and (len(specs) == 1 or len(args.weight) != len(specs)):
        raise UsageError(f"--weight is per subject in a multi-subject run: got {len(args.weight)} weights for "
                         f"{len(specs)} subjects")
    if any(not p.strip() for p in args.prompt):
        raise UsageError("--prompt must not be empty")
    config = GuidanceConfig(scale=args.scale, iterations=args.iterations, mode=args.solver, ck_mode=args.ck_mode,
                            memory=args.memory, compile="on" if args.compile else "off")
    try:  # numbers are checked before minutes of loading; auto values (None) are resolved later
        for prompt in args.prompt:
            _settings(args, prompt, config).validate()
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    flow_dir = _check_dir(args.flow, "--flow", "the flow")
    kinds = {s.kind for s in specs}
    faces_dir = _check_dir(args.faces, "--faces", "a face subject") if "face" in kinds else None
    object_dirs = (_check_dir(args.dinov2, "--dinov2", "an object subject"),
                   _check_dir(args.owlvit, "--owlvit", "an object subject")) if "object" in kinds else None
    clip_dir = _check_dir(args.clip, "--clip", "a clip subject") if "clip" in kinds else None
    device = parse_device(args.device, "--device")
    if args.compile:  # before anything is loaded
        try:
            check_compile_support(device)
        except RuntimeError as exc:
            raise UsageError(str(exc)) from exc
        if not args.quiet:  # the first-run compile notice and its duration
            show_compile_progress()
    check_writable(args.output, "--output")
    check_image_format(args.output, "--output")
    if args.history is not None:
        check_writable(args.history, "--history")
    info = inspect_flow_folder(flow_dir, flow_type=args.flow_type, prediction_type=args.prediction_type)
    check_image_size(args.width, args.height, image_size_multiple(flow_dir))
    references = {path: load_image(path) for spec in specs for path in spec.images}
    discriminators = {}
    if faces_dir:
        discriminators["face"] = load_face_discriminator(faces_dir, provider=args.provider, device=device,
                                                         detector_backend=args.detector)
    if object_dirs:
        discriminators["object"] = load_object_discriminator(*object_dirs, device=device)
    if clip_dir:
        discriminators["clip"] = load_clip_discriminator(clip_dir, device=device)
    dtype = auto_dtype(device, info.flow_type) if args.dtype == "auto" else args.dtype
    flow = load_flow(flow_dir, flow_type=args.flow_type, prediction_type=args.prediction_type, dtype=dtype,
                     device=device)

    if device.type == "cuda":  # auto sizes are the flow's own, known once it is loaded
        native = flow.defaults()
        height = native.height if args.height is None else args.height
        width = native.width if args.width is None else args.width
        free, _ = torch.cuda.mem_get_info(device)
        steps = flow.num_steps if args.steps is None else args.steps
        refusal = memory_refusal(flow, flow.latent_shape(args.batch_size, height, width), args.memory, free, steps)
        if refusal:
            raise UsageError(refusal)

    objectives = []
    for spec in specs:
        refs = [t for path in spec.images for t in references[path].split(1)]
        objectives.append(subject_objective(discriminators[spec.kind], refs, label=spec.label,
                                            selection=args.selection, index=args.index,
                                            l1_weight=args.l1_weight))
    labels = unique_labels([s.label for s in specs])
    objective = objectives[0] if len(specs) == 1 else multi_subject_objective(
        objectives, [s.kind for s in specs], labels, args.weight)

    paths = output_paths(args.output, len(args.prompt), args.batch_size)
    history = {"flow": str(flow_dir), "subjects": [{**asdict(s), "images": [str(p) for p in s.images]}
                                                   for s in specs],
               "settings": {"seed": args.seed, "width": args.width, "height": args.height,
                            "steps": args.steps, "iterations": args.iterations, "scale": args.scale, "cfg": args.cfg,
                            "ck_mode": args.ck_mode, "solver": args.solver, "negative": args.negative,
                            "compile": args.compile},
               "runs": []}
    for i, prompt in enumerate(args.prompt):
        settings = _settings(args, prompt, config)
        progress = StderrProgress(f"[{i + 1}/{len(args.prompt)}]", not args.quiet)
        result = personalize(flow, objective, settings, callback=progress, labels=labels)
        progress.done()
        for b, path in enumerate(paths[i]):
            _save_png(result.images[b], path)
        history["runs"].append({"prompt": prompt, "images": [str(p) for p in paths[i]], **result.history()})
        for warning in result.warnings:
            sys.stderr.write(f"rectifid: warning: {warning}\n")
        if not args.quiet:
            sims = ", ".join(f"{k} {v:.3f}" if v is not None else f"{k} not found"
                             for k, v in result.final_similarities.items())
            sys.stderr.write(f"wrote {', '.join(str(p) for p in paths[i])}  (similarity: {sims or 'n/a'})\n")
    history_path = args.history or args.output.with_suffix(".json")
    history_path.parent.mkdir(parents=True, exist_ok=True)
    history_path.write_text(json.dumps(history, indent=1), encoding="utf-8")
    return history


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `rectifid` / `python -m rectifid_core`; returns the exit status.

    User errors (bad arguments, missing or damaged files, wrong models, a missing
    package) print one `rectifid: error: ...` message and exit with 2; running out
    of GPU memory exits with 1; anything else is a bug and keeps its traceback.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run(args)
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        sys.stderr.write(f"rectifid: error: {exc}\n")
        return 2
    except (ValueError, OSError, ImportError, UnsupportedOnnxOperator) as exc:  # FileNotFoundError, DamagedModelFile..
        sys.stderr.write(f"\nrectifid: error: {exc}\n")
        return 2
    except torch.OutOfMemoryError as exc:
        sys.stderr.write(f"\nrectifid: error: out of GPU memory ({str(exc).splitlines()[0]}); use --memory "
                         "checkpoint, a smaller --width/--height or --batch-size 1\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("\nrectifid: interrupted\n")
        return 130
    return 0
