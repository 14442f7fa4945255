"""The benchmark's user-wait rows: first image, next image and plain sampling, with SCRFD in the loop."""
from __future__ import annotations

import numpy as np
from PIL import Image

import tiny_faces
from rectifid_core.benchmark.measure import BenchSettings, measure_in_subprocess
from rectifid_core.benchmark.report import markdown_table


def test_waits_are_measured_with_the_face_objective(tmp_path):
    tiny_faces.build_antelopev2(tmp_path / "insightface")
    face = tiny_faces.face_image((640, 640), ((10, 10, 1.0, 1.0),))[0]
    Image.fromarray((face.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(tmp_path / "ref.png")
    settings = BenchSettings(size=32, iterations=2, floor_repeats=1, faces=str(tmp_path / "insightface"),
                             reference=str(tmp_path / "ref.png"))
    r = measure_in_subprocess(settings, timeout=600)
    # plain sampling is one gradient-free pass; an image is N forward+backward iterations and that pass
    assert 0 < r["plain_sampling_seconds"] < r["next_image_seconds"] <= 2 * r["first_image_seconds"]
    table = markdown_table([r])
    assert "| tiny | 32 | store | off | face (SCRFD in the loop) | 2 |" in table
    assert "first image s" in table
