"""One personalization call shared by the ComfyUI nodes, the CLI and Python users.

prompts -> encode once -> seeded noise -> anchored guidance -> images, latent,
per-iteration history and the final similarity of every subject. Keeping this
in one place is what makes a node graph, `python -m rectifid_core` and a script
give the same image for the same seed.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .flows.base import RectifiedFlow
from .guidance import GuidanceConfig, GuidanceResult, IterationInfo, auto_guidance_scale, guide, initial_noise
from .objectives.base import Objective, as_output
from .objectives.detections import SELECTIONS, LocatedSubject, box_mask, select
from .plots import draw_boxes


@dataclass
class PersonalizeSettings:
    """Everything besides the models. None means auto (`resolve_settings`): width, height and CFG from the flow
    as the reference scripts sample it; steps the flow's own (its K trained windows unless it was loaded with
    more steps); the guidance scale s from the objective."""

    prompt: str
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    seed: int = 0
    batch_size: int = 1
    cfg_scale: float | None = None
    num_steps: int | None = None  # model calls per pass; more than K on PeRFlow = sub-steps inside its windows
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)

    def validate(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError("the prompt is empty; describe the image, e.g. 'a photo of a person at the beach'")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch size must be an integer >= 1, got {self.batch_size!r}")
        if self.cfg_scale is not None and (not math.isfinite(self.cfg_scale) or self.cfg_scale < 1.0):
            raise ValueError(f"CFG scale must be a finite number >= 1 (or auto), got {self.cfg_scale!r}")
        if self.num_steps is not None and (not isinstance(self.num_steps, int) or self.num_steps < 1):
            raise ValueError(f"steps must be an integer >= 1 (or auto), got {self.num_steps!r}")
        self.guidance.validate()


def resolve_settings(settings: PersonalizeSettings, flow: RectifiedFlow, objective: Objective) -> PersonalizeSettings:
    """A copy with every auto (None) value resolved from the flow and the objective; the input is not changed."""
    settings.validate()
    unset = [name for name in ("width", "height", "cfg_scale") if getattr(settings, name) is None]
    defaults = flow.defaults()
    if unset and defaults is None:
        raise ValueError(f"{type(flow).__name__} has no default image size or CFG scale; set {', '.join(unset)}")
    scale = settings.guidance.scale
    return dataclasses.replace(
        settings,
        width=defaults.width if settings.width is None else settings.width,
        height=defaults.height if settings.height is None else settings.height,
        cfg_scale=defaults.cfg_scale if settings.cfg_scale is None else settings.cfg_scale,
        num_steps=flow.num_steps if settings.num_steps is None else settings.num_steps,
        guidance=dataclasses.replace(settings.guidance,
                                     scale=auto_guidance_scale(objective) if scale is None else scale))


@dataclass
class PersonalizeResult:
    images: torch.Tensor  # [B,3,H,W] float32 in 0..1, on the CPU
    latent: torch.Tensor  # z_K as the flow's VAE expects it (scaled), on the CPU
    losses: list[float]  # objective loss per iteration (summed over the batch)
    similarities: dict[str, list[float | None]]  # subject label -> mean similarity per iteration
    final_similarities: dict[str, float | None]  # subject label -> mean similarity of the output
    final_loss: float | None
    stopped_early: str | None
    warnings: list[str] = field(default_factory=list)  # what the user must know: subjects not steered, fallbacks
    settings: PersonalizeSettings | None = None  # the resolved settings the run used

    def history(self) -> dict[str, Any]:
        """JSON-friendly record (the CLI writes it next to the images)."""
        return {
            "losses": self.losses,
            "similarities": self.similarities,
            "final_similarities": self.final_similarities,
            "final_loss": self.final_loss,
            "stopped_early": self.stopped_early,
            "warnings": self.warnings,
            "settings": None if self.settings is None else dataclasses.asdict(self.settings),
        }


ProgressCallback = Callable[[IterationInfo], None]


def _as_float(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        value = value.detach().float().mean().item() if value.numel() else None
    if isinstance(value, (int, float)) and math.isfinite(float(value)):
        return float(value)
    return None


def unique_labels(labels: list[str]) -> list[str]:
    """Subject names as report keys: blanks become "subject j", repeats get their position ("person #2")."""
    names = [label.strip() or f"subject {j + 1}" for j, label in enumerate(labels)]
    return [f"{n} #{j + 1}" if names.count(n) > 1 else n for j, n in enumerate(names)]


def subject_similarities(diagnostics: dict[str, Any], labels: list[str] | None = None) -> dict[str, float | None]:
    """Mean (over the batch) similarity per subject from an objective's diagnostics.

    Understands diagnostics["similarity"] as a number, a list per image, or a list per
    image of lists per subject (the multi-subject combiner); None where a subject was not found.
    """
    sim = diagnostics.get("similarity")
    if sim is None:
        return {}
    if isinstance(sim, torch.Tensor):
        sim = sim.detach().float().cpu().tolist()
    if not isinstance(sim, (list, tuple)):
        sim = [sim]
    per_image = [s if isinstance(s, (list, tuple)) else [s] for s in sim]
    n = max((len(s) for s in per_image), default=0)
    names = unique_labels(labels) if labels and len(labels) == n else [f"subject {j + 1}" for j in range(n)]
    out: dict[str, float | None] = {}
    for j, name in enumerate(names):
        values = [v for v in (_as_float(s[j]) if j < len(s) else None for s in per_image) if v is not None]
        out[name] = sum(values) / len(values) if values else None
    return out


_NOT_STEERED_HINT = ("name the subject in the prompt (e.g. 'a photo of a person'), check that the reference "
                     "shows it clearly, or try another seed")


def _subject_name(j: int, labels: list[str] | None) -> str:
    names = unique_labels(labels) if labels else []
    return f"subject {names[j]!r} ({j + 1})" if j < len(names) else f"subject {j + 1}"


def missing_subject_warnings(iterations: list[dict[str, Any]], final: dict[str, Any],
                             labels: list[str] | None = None) -> list[str]:
    """Warnings for subjects the objective did not steer, from its diagnostics["missing"].

    "missing" holds, per image of the batch, the 0-based indices of the subjects that got
    no guidance in that evaluation. Subjects are counted from 1 in the messages; the
    image is named only for batches.
    """
    counts: dict[tuple[int, int], int] = {}
    batch = 1
    for diagnostics in iterations:
        per_image = diagnostics.get("missing") or []
        batch = max(batch, len(per_image))
        for b, subjects in enumerate(per_image):
            for j in set(subjects):
                counts[(b, j)] = counts.get((b, j), 0) + 1
    final_missing = final.get("missing") or []
    batch = max(batch, len(final_missing))

    def where(b: int) -> str:
        return f" of image {b + 1}" if batch > 1 else ""

    n = len(iterations)
    out = []
    for (b, j), count in sorted(counts.items(), key=lambda item: (item[0][1], item[0][0])):
        if count == n:
            out.append(f"{_subject_name(j, labels)} was not found in {count} of {n} iterations{where(b)} and was not "
                       f"steered; {_NOT_STEERED_HINT}")
        else:
            out.append(f"{_subject_name(j, labels)} was not found in {count} of {n} iterations{where(b)} "
                       "(those iterations did not steer it)")
    for b, subjects in enumerate(final_missing):
        for j in sorted(set(subjects)):
            image = f"final image {b + 1}" if batch > 1 else "final image"
            out.append(f"{_subject_name(j, labels)} is not found in the {image}; {_NOT_STEERED_HINT}")
    return out


def personalize(flow: RectifiedFlow, objective: Objective, settings: PersonalizeSettings,
                callback: ProgressCallback | None = None, labels: list[str] | None = None,
                interrupt: Callable[[], None] | None = None) -> PersonalizeResult:
    """Generate `batch_size` images of `prompt` steered towards the objective's reference(s).

    Auto (None) settings are resolved first (`resolve_settings`); the result carries them.
    `callback` sees every iteration (progress, previews); `interrupt` is called before every
    step's model call; raising from either cancels. `labels` names the subjects in the
    similarity history and the warnings (default "subject 1", ...).
    """
    settings = resolve_settings(settings, flow, objective)
    flow = flow.with_steps(settings.num_steps)
    shape = flow.latent_shape(settings.batch_size, settings.height, settings.width)
    cond = flow.encode([settings.prompt] * settings.batch_size, [settings.negative_prompt] * settings.batch_size,
                       settings.cfg_scale)
    noise = initial_noise(shape, settings.seed, flow.device, flow.dtype)
    result: GuidanceResult = guide(flow, cond, objective, noise, settings.guidance, callback, interrupt)
    return dataclasses.replace(summarize(result, objective, labels, flow.device), settings=settings)


def summarize(result: GuidanceResult, objective: Objective, labels: list[str] | None,
              device: torch.device | str) -> PersonalizeResult:
    """A guidance run as the user reads it: similarity history and final similarity per subject, the final loss
    (the objective scored once more on the output) and every warning; `settings` is left for the caller."""
    per_iteration = [subject_similarities(d, labels) for d in result.diagnostics]
    names = list(dict.fromkeys(k for d in per_iteration for k in d))
    similarities = {name: [d.get(name) for d in per_iteration] for name in names}
    with torch.no_grad():
        final = as_output(objective(result.image.to(device)))
    final_loss = _as_float(final.loss.sum())
    warnings = missing_subject_warnings(result.diagnostics, final.diagnostics, labels)
    if result.stopped_early:
        warnings.append(f"guidance stopped early: {result.stopped_early}")
    warnings += result.warnings
    return PersonalizeResult(
        images=result.image.float().cpu(),
        latent=result.latent.float().cpu(),
        losses=list(result.losses),
        similarities=similarities,
        final_similarities=subject_similarities(final.diagnostics, labels),
        final_loss=final_loss,
        stopped_early=result.stopped_early,
        warnings=warnings,
    )


# -- discriminators and per-subject objectives ----------------------------------------------------

SUBJECT_KINDS = ("face", "object", "clip")
INSTALL_HINT = ("install the pack's requirements with the Python that runs ComfyUI (or the CLI): "
                "python -m pip install -r requirements.txt")


@dataclass
class Discriminator:
    """Loaded models that judge one kind of subject: "face" (antelopev2), "object" (DINOv2 + OWL-ViT), "clip"."""

    kind: str
    models: dict[str, Any]
    description: str


def auto_dtype(device: torch.device | str, flow_type: str | None = None) -> str:
    """fp16 on a GPU (half the memory, the speed of the paper's setup), fp32 on the CPU.

    FLUX.1 and SD3.x get bf16 on a GPU, as their model cards load them (their T5 overflows fp16).
    """
    from .flows.loading import TRANSFORMER_FLOW_TYPES

    if torch.device(device).type != "cuda":
        return "fp32"
    return "bf16" if flow_type in TRANSFORMER_FLOW_TYPES else "fp16"


def _missing(exc: ImportError, what: str) -> ImportError:
    """A missing package as the user must read it; our own ImportErrors already say what to install."""
    if not exc.name:
        return ImportError(f"{what}: {exc}; or {INSTALL_HINT}")
    return ImportError(f"{what} needs the Python package '{exc.name}', which is not installed; {INSTALL_HINT}",
                       name=exc.name)


def load_face_discriminator(path: str | os.PathLike, provider: str = "auto",
                            device: torch.device | str = "cpu", detector_backend: str = "auto") -> Discriminator:
    """antelopev2 (SCRFD in torch or onnxruntime, see `load_face_models`; ArcFace in torch on `device`)."""
    try:
        from .objectives import load_face_models
        models = load_face_models(path, provider=provider, device=device, detector_backend=detector_backend)
    except ImportError as exc:
        raise _missing(exc, "loading the face models") from exc
    return Discriminator("face", {"faces": models},
                         f"faces ({os.path.basename(os.fspath(path))}, {models.detector.description})")


def load_object_discriminator(dinov2_path: str | os.PathLike, owlvit_path: str | os.PathLike,
                              device: torch.device | str = "cpu") -> Discriminator:
    """DINOv2 (identity feature) + OWL-ViT (finds the subject) from transformers folders."""
    try:
        from .objectives import load_dinov2, load_owlvit
        models = {"encoder": load_dinov2(dinov2_path, device=device),
                  "detector": load_owlvit(owlvit_path, device=device)}
    except ImportError as exc:
        raise _missing(exc, "loading the object models") from exc
    names = " + ".join(os.path.basename(os.fspath(p)) for p in (dinov2_path, owlvit_path))
    return Discriminator("object", models, f"objects ({names})")


def load_clip_discriminator(path: str | os.PathLike, device: torch.device | str = "cpu") -> Discriminator:
    """CLIP vision encoder from a transformers folder: whole-image similarity."""
    try:
        from .objectives import load_clip_vision
        encoder = load_clip_vision(path, device=device)
    except ImportError as exc:
        raise _missing(exc, "loading the CLIP model") from exc
    return Discriminator("clip", {"encoder": encoder}, f"CLIP ({os.path.basename(os.fspath(path))})")


def subject_objective(discriminator: Discriminator, references: list[torch.Tensor], *, label: str = "",
                      selection: str = "insightface", index: int = 0, region: torch.Tensor | None = None,
                      l1_weight: float = 0.0) -> Objective:
    """The identity objective of one subject from its reference photos ([1,3,H,W] each).

    Faces: selection/index/region choose the face steered in the generated image; the same
    selection and index choose the face of each reference photo ("mask": insightface's ranking).
    Objects: `label` names the subject for OWL-ViT; `l1_weight` ~1000 for rigid objects.
    """
    if not references:
        raise ValueError("no reference image given for the subject")
    kind = discriminator.kind
    if kind == "face":
        from .objectives import FaceIdentityObjective
        return FaceIdentityObjective(discriminator.models["faces"], references, selection=selection, index=index,
                                     region=region,
                                     reference_selection="insightface" if selection == "mask" else selection)
    if kind == "object":
        from .objectives import SubjectIdentityObjective
        return SubjectIdentityObjective(discriminator.models["encoder"], references,
                                        detector=discriminator.models["detector"], query=label,
                                        l1_weight=float(l1_weight))
    if kind == "clip":
        from .objectives import ClipImageObjective
        return ClipImageObjective(discriminator.models["encoder"], references)
    raise ValueError(f"unknown discriminator kind {kind!r}; expected one of {', '.join(SUBJECT_KINDS)}")


def multi_subject_objective(objectives: list[Objective], kinds: list[str], labels: list[str],
                            weights: list[float] | None = None) -> Objective:
    """Several subjects in one image, matched to the references each iteration (Hungarian assignment)."""
    for j, (kind, label) in enumerate(zip(kinds, labels)):
        if kind == "clip":
            raise ValueError(f"subject {j + 1} ({label!r}) uses a CLIP model, which compares whole images and "
                             "cannot be matched to one subject; use a face or object model")
    from .objectives import MultiSubjectObjective
    return MultiSubjectObjective(objectives, weights)


# -- finding and cropping a subject in a reference photo ------------------------------------------

LOCATE_POLICIES = SELECTIONS


def locate_subject(image: torch.Tensor, *, face_models: Any = None, detector: Any = None, label: str = "",
                   policy: str = "insightface", index: int = 0, mask: torch.Tensor | None = None) -> LocatedSubject:
    """Detect faces (antelopev2) or a text-named object (OWL-ViT) in one image [1,3,H,W] and pick one.

    policy: a detection selection (insightface's ranking, largest, nearest the centre,
    index-th from the left, largest at least half inside `mask` ([H,W], any resolution); the
    mask is used by "mask" only). Faces are found as a reference photo's face is (FaceIdentityObjective).
    """
    if policy not in LOCATE_POLICIES:
        raise ValueError(f"unknown selection {policy!r}; choose one of {', '.join(LOCATE_POLICIES)}")
    if policy == "mask" and mask is None:
        raise ValueError("selection 'mask' needs a mask input that marks the subject to keep")
    if (face_models is None) == (detector is None):
        raise ValueError("give exactly one of face_models (faces) or detector (objects)")
    region = mask if policy == "mask" else None
    if face_models is not None:
        from .objectives.faces import locate_face
        return locate_face(face_models, image, selection=policy, index=index, region=region)
    if not label.strip():
        raise ValueError("name the object to find (e.g. 'dog'): OWL-ViT locates it by this text label")
    found = detector.detect_text(image[0], label.strip())
    chosen = select(found, tuple(image.shape[-2:]), policy, index, region) if len(found) else None
    return LocatedSubject(found, chosen)


def reference_previews(references: list[torch.Tensor], located: list[LocatedSubject] | None) -> torch.Tensor:
    """Each reference photo [1,3,H,W] with its detections drawn (the chosen one red, numbered from 1;
    located None: photos as they are), padded with grey to the largest so they form one batch [B,3,H,W]."""
    drawn = [ref[0] if located is None else draw_boxes(ref[0], found.boxes, found.chosen)
             for ref, found in zip(references, located or references)]
    h, w = max(d.shape[-2] for d in drawn), max(d.shape[-1] for d in drawn)
    out = torch.full((len(drawn), 3, h, w), 0.5)
    for k, d in enumerate(drawn):
        out[k, :, : d.shape[-2], : d.shape[-1]] = d.float().cpu()
    return out


def square_crop(image: torch.Tensor, box: tuple[float, float, float, float], padding: float,
                size: int) -> torch.Tensor:
    """Square crop [1,3,size,size] centred on `box`, grown by `padding` x its longer side on every side.

    Parts outside the image repeat the border, so a face at the edge keeps its position in the crop.
    """
    if padding < 0 or size < 1:
        raise ValueError(f"padding must be >= 0 and size >= 1, got padding={padding}, size={size}")
    h, w = image.shape[-2:]
    x1, y1, x2, y2 = box
    side = max(x2 - x1, y2 - y1, 1.0) * (1.0 + 2.0 * padding)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    # affine_grid works in [-1, 1] image coordinates (align_corners=False: pixel edges at +-1)
    theta = torch.tensor([[[side / w, 0.0, 2 * cx / w - 1], [0.0, side / h, 2 * cy / h - 1]]],
                         dtype=torch.float32, device=image.device)
    grid = torch.nn.functional.affine_grid(theta, [1, 3, size, size], align_corners=False)
    return torch.nn.functional.grid_sample(image.float(), grid, mode="bilinear", padding_mode="border",
                                           align_corners=False).clamp(0, 1)
