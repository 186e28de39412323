"""The embedded default model: what the node and the demo load when no model path is given.

For now a tiny LLaVA with random weights, built locally on first use (a few seconds), because no
pretrained VLM can be fetched on the machines this project is built on. Its answers are noise.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from .engine.config import nanovlm_home

DEFAULT_MODEL_NAME = "tiny-llava-random"
DEFAULT_MODEL_IS_RANDOM = True


def default_model_path() -> Path:
    return nanovlm_home() / "models" / DEFAULT_MODEL_NAME


def ensure_default_model() -> Path:
    """Path of the default model, building it first if it is not there yet."""
    path = default_model_path()
    if (path / "config.json").is_file():
        return path
    from .engine.tiny import build_tiny_llava

    path.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so a concurrent or interrupted build never leaves
    # a half-written model where the next start would load it.
    staging = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}-", dir=path.parent))
    try:
        build_tiny_llava(staging)
        try:
            staging.rename(path)
        except OSError:
            if not (path / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path
