"""Speed, memory and convergence benchmarks of the guidance loop (see results/README.md).

`python -m rectifid_core.benchmark` times iterations against their floor and measures peak
memory; `.calibrate` fits the activation-memory model; `.convergence` compares solvers on the toy;
`.detector` times the face detector's two backends (onnxruntime, torch).
"""
