"""m2d2: pre-train, evaluate and publish M2D2 general-purpose audio-language representations."""

__version__ = "0.1.0"
