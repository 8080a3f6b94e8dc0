"""Training: the stage runners (1, 1.1, 2, 2.1), their objectives, the DeepSpeed engine and checkpoints.

Needs the ``[train]`` extra (DeepSpeed, MLflow); the models it trains are in :mod:`m2d2.models`.
"""
