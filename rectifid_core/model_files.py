"""Checks on model files before a library reads them.

A truncated download, a zero-byte placeholder or a folder of the wrong model
otherwise surfaces as a raw safetensors / protobuf / transformers error (or,
for the face detector, as a CUDA failure). These checks read only headers and
small JSON files, name the file, say what is wrong and what to do.
"""
from __future__ import annotations

import json
import os
import posixpath
import struct
import zipfile
from pathlib import Path
from typing import Any, Iterable, Union

PathLike = Union[str, os.PathLike]

REDOWNLOAD = "download the file again (a download that stopped early or a git-lfs pointer leaves such files)"


class DamagedModelFile(ValueError):
    """A model file exists but cannot be what it claims to be."""


def read_json_file(path: PathLike, what: str) -> dict[str, Any]:
    """Parse a JSON object file; DamagedModelFile names the file and the problem."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise DamagedModelFile(f"{path} ({what}) is not a text file: {exc}; {REDOWNLOAD}") from exc
    except json.JSONDecodeError as exc:
        raise DamagedModelFile(f"{path} ({what}) is not valid JSON: {exc}; {REDOWNLOAD}") from exc
    if not isinstance(data, dict):
        raise DamagedModelFile(f"{path} ({what}) must hold a JSON object, found {type(data).__name__}; {REDOWNLOAD}")
    return data


def _size(path: Path) -> int:
    """Bytes in `path`; an empty file (a placeholder, a failed download) is refused."""
    size = path.stat().st_size
    if size == 0:
        raise DamagedModelFile(f"{path} is empty (0 bytes); {REDOWNLOAD}")
    return size


def check_safetensors(path: PathLike) -> None:
    """Header of a .safetensors file: length, JSON, and every tensor's bytes inside the file."""
    path = Path(path)
    size = _size(path)
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise DamagedModelFile(f"{path} is {size} bytes, too short for a safetensors file; {REDOWNLOAD}")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            raise DamagedModelFile(
                f"{path} is not a complete safetensors file (its header claims {length} bytes, the file has "
                f"{size}); {REDOWNLOAD}")
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DamagedModelFile(f"{path} is not a safetensors file (unreadable header: {exc}); {REDOWNLOAD}") from exc
    if not isinstance(header, dict):
        raise DamagedModelFile(f"{path} is not a safetensors file (its header is not a JSON object); {REDOWNLOAD}")
    data_bytes = size - 8 - length
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and 0 <= offsets[0] <= offsets[1]):
            raise DamagedModelFile(f"{path}: tensor {name!r} has no valid data_offsets; {REDOWNLOAD}")
        if offsets[1] > data_bytes:
            raise DamagedModelFile(
                f"{path} is truncated: tensor {name!r} ends at byte {offsets[1]} of the data, the file holds "
                f"{data_bytes}; {REDOWNLOAD}")


def _inside(name: str, flat: bool) -> bool:
    """Whether a file name taken from a model file stays in the model's folder (`flat`: directly in it).

    Judged on the name itself, not on resolved paths, so that the symlinks of a
    Hugging Face cache snapshot (pointing into ../blobs) stay allowed.
    """
    norm = posixpath.normpath(name.replace("\\", "/"))
    if not name or posixpath.isabs(norm) or ":" in norm or norm in (".", "..") or norm.startswith("../"):
        return False
    return not flat or "/" not in norm


def check_shard_index(path: PathLike) -> list[Path]:
    """A `*.index.json` shard index: every shard it names lies in its folder and exists; returns the shards."""
    path = Path(path)
    index = read_json_file(path, "shard index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise DamagedModelFile(f"{path} has no 'weight_map' naming the weight shards; {REDOWNLOAD}")
    folder = path.parent
    shards = []
    for name in sorted(set(map(str, weight_map.values()))):
        if not _inside(name, flat=True):
            raise DamagedModelFile(
                f"{path} names the shard {name!r}, which lies outside the model folder {folder}; refusing to read "
                f"it. Use the index that came with the model.")
        shard = folder / name
        if not shard.is_file():
            raise FileNotFoundError(f"{path} names the shard {name!r}, not found in {folder}; download all shards")
        shards.append(shard)
    return shards


def check_weight_files(folder: PathLike, names: Iterable[str]) -> None:
    """Check the given weight files of `folder`: safetensors headers, torch checkpoints, shard indexes and shards."""
    folder = Path(folder)
    for name in names:
        path = folder / name
        _size(path)
        for weights in check_shard_index(path) if name.endswith(".json") else [path]:
            if weights.suffix == ".safetensors":
                check_safetensors(weights)
            elif weights.suffix == ".bin":
                check_torch_bin(weights)


def check_torch_bin(path: PathLike) -> None:
    """A torch `.bin` checkpoint: a zip archive with its directory at the end (which a cut download loses),
    or a pre-1.6 pickle, which can only be recognised by its first byte."""
    path = Path(path)
    _size(path)
    if zipfile.is_zipfile(path):
        return
    with path.open("rb") as f:
        if f.read(1) == b"\x80":  # pickle protocol marker of the legacy format
            return
    raise DamagedModelFile(f"{path} is not a complete torch checkpoint (no zip directory at its end); {REDOWNLOAD}")


def check_model_type(folder: PathLike, expected: Iterable[str], what: str, slot: str) -> dict[str, Any]:
    """config.json of a transformers folder must name one of `expected` model types; returns the config."""
    folder = Path(folder)
    expected = tuple(expected)
    config = read_json_file(folder / "config.json", f"{what} config")
    found = config.get("model_type")
    if found not in expected:
        raise ValueError(
            f"{folder} holds a {found!r} model (config.json model_type), not {what} "
            f"(model_type {' or '.join(repr(e) for e in expected)}); choose a {what} folder for {slot}")
    return config


def check_onnx_file(path: PathLike) -> Any:
    """Parse an ONNX file with its external data checked to lie in its folder; returns the ModelProto."""
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    _size(path)
    try:
        model = onnx.load(os.fspath(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
        raise DamagedModelFile(f"{path} is not a readable ONNX model ({exc}); {REDOWNLOAD}") from exc
    if not len(model.graph.node):
        raise DamagedModelFile(f"{path} holds no ONNX graph (is it truncated?); {REDOWNLOAD}")
    folder = path.parent
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        target = folder / info.get("location", "")
        if not _inside(info.get("location", ""), flat=False):
            raise DamagedModelFile(
                f"{path}: weight {tensor.name!r} points to external data {info.get('location')!r} outside the model "
                f"folder {folder}; refusing to read it. Use the model as released.")
        if not target.is_file():
            raise FileNotFoundError(f"{path}: external data file {target} for weight {tensor.name!r} is missing")
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        if end > target.stat().st_size:
            raise DamagedModelFile(f"{target} (external data of {path.name}) is truncated; {REDOWNLOAD}")
    return model
