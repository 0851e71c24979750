"""Frozen model files shipped with the node (data only; see docs/model-format.md)."""

from importlib.resources import files
from pathlib import Path


def shipped_model_path(filename: str) -> Path:
    return Path(str(files(__name__).joinpath(filename)))
