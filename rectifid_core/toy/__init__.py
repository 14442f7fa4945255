"""A CPU-sized proof of the solver: class-conditional rectified flow on 8x8 sklearn digits.

The "prompt" is a digit class, the "identity" is one writer's held-out digit; a
contrastive feature network plays the off-the-shelf discriminator and a separately
trained evaluator measures the result. Weights ship in `weights/`; retrain with
`python -m rectifid_core.toy.train`, measure with `python -m rectifid_core.toy.benchmark`.
"""
