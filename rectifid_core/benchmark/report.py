"""Benchmark results as JSON (everything) and a markdown table (the numbers people compare)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f}"


def markdown_table(results: list[dict[str, Any]]) -> str:
    """One row per configuration; memory columns say what was measured on that device."""
    env = results[0]["environment"] if results else {}
    head = (f"Device: {env.get('device_name', '?')}, torch {env.get('torch', '?')}, "
            f"diffusers {env.get('diffusers', '?')}, CPU threads {env.get('cpu_threads', '?')}\n\n")
    rows = ["| family | width | size | batch | K | dtype | memory | mode | s/it | floor s | overhead "
            "| CUDA peak MiB | CPU torch peak MiB | RSS peak +MiB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        s = r["settings"]
        memory = r.get("memory_resolved", s["memory"])
        rows.append(
            f"| {s['family']} | {s['width_scale']} | {s['size']} | {s['batch']} | {s['windows']} | {s['dtype']} "
            f"| {memory} | {s['mode']} | {r['seconds_per_iteration']:.4f} | {r['floor_seconds']:.4f} "
            f"| {r['overhead']:.3f} | {_mib(r['cuda_peak_allocated_bytes'])} | {_mib(r['cpu_profiled_peak_bytes'])} "
            f"| {_mib(r['rss_peak_above_start_bytes'])} |")
    note = ("\ns/it and floor s are medians of their own samples; overhead is the median of each iteration's "
            "ratio to the floor pass run right after it (drifts of a shared machine's load cancel). CPU memory: "
            "peak of live torch allocations in one iteration (profiler accounting) and peak RSS growth of the "
            "fresh process during two iterations.\n")
    return head + "\n".join(rows) + "\n" + note + waits_table(results)


def waits_table(results: list[dict[str, Any]]) -> str:
    """What a user waits for, each number beside its comparison: plain sampling, the first image (compilation
    included), the next one; empty for results measured before these were recorded."""
    timed = [r for r in results if "first_image_seconds" in r]
    if not timed:
        return ""
    rows = ["\n| family | size | memory | compile | objective | N | plain sampling s | first image s | next image s "
            "| s/it | floor s (eager) |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in timed:
        s = r["settings"]
        objective = "face (SCRFD in the loop)" if s.get("faces") else "recognizer only"
        rows.append(
            f"| {s['family']} | {s['size']} | {r.get('memory_resolved', s['memory'])} | {s.get('compile', 'off')} "
            f"| {objective} | {s['iterations']} | {r['plain_sampling_seconds']:.3f} | {r['first_image_seconds']:.3f} "
            f"| {r['next_image_seconds']:.3f} | {r['seconds_per_iteration']:.4f} | {r['floor_seconds']:.4f} |")
    note = ("\nFirst image: the first guide() call of a fresh process (N iterations + the final pass; compilation "
            "included with compile on); next image: the same call again; plain sampling: the same settings with "
            "N=0, warm. The floor is always eager, so with compile on overhead < 1 is the compiled speed-up.\n")
    return "\n".join(rows) + "\n" + note


def write_results(results: list[dict[str, Any]], out_dir: str | Path, name: str) -> tuple[Path, Path]:
    """Write `<name>.json` and `<name>.md` under out_dir; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    json_path.write_text(json.dumps(results, indent=2), encoding="utf-8")
    md_path.write_text(markdown_table(results), encoding="utf-8")
    return json_path, md_path
