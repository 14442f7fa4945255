"""Speed and memory benchmarks of the guidance loop (see results/README.md).

`python -m rectifid_core.benchmark` times iterations against their floor and measures peak
memory; `.calibrate` fits the activation-memory model; `.detector` times the face detector's two
backends (onnxruntime, torch). Solver convergence is measured on the toy (`python -m rectifid_core.toy.benchmark`).
"""
