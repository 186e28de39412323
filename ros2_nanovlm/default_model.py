"""The embedded default model: what the node and the demo load when no model path is given.

The demo VLM (engine/demo_model): EfficientNet-Lite0 -> a projector trained by
training/train_projector.py -> SmolLM2-135M-Instruct, assembled on first use (about 20 s) from
two PyPI weight packages into $NANOVLM_HOME/models. It names the main subject of a photo; it
cannot read signs, count or reason. Pass a LLaVA directory for a real general-purpose VLM.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from .engine.config import nanovlm_home

DEFAULT_MODEL_DESCRIPTION = (
    "nanovlm-demo: EfficientNet-Lite0 -> trained projector -> SmolLM2-135M-Instruct, a tiny real VLM "
    "that names the main subject of a photo (ImageNet classes); it cannot read text, count or reason"
)


def default_model_path() -> Path:
    from .engine.demo_model.build import projector_digest

    return nanovlm_home() / "models" / f"nanovlm-demo-{projector_digest()}"


def ensure_default_model() -> Path:
    """Path of the default model, building it first if it is not there yet."""
    path = default_model_path()
    if (path / "nanovlm_vlm.json").is_file():
        return path
    from .engine.demo_model.build import build_demo_model

    path.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so a concurrent or interrupted build never leaves
    # a half-written model where the next start would load it.
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        build_demo_model(staging)
        try:
            staging.rename(path)
        except OSError:
            if not (path / "nanovlm_vlm.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path
