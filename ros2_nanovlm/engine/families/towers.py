"""Find the vision tower an original checkpoint names but does not hold, without a network.

LLaVA-1.5, Obsidian and the first VILA store only the language model and the projector; their
config names the CLIP tower they were trained on (`mm_vision_tower`:
"openai/clip-vit-large-patch14-336") and their own code downloads it. Here it is looked for,
in this order:
  1. an explicit directory: the `vision_tower` argument, else $NANOVLM_VISION_TOWER;
  2. `mm_vision_tower` itself, when it is a local directory (absolute, or inside the model's);
  3. the Hugging Face cache ($HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub),
     read with huggingface_hub's own cache layout and local_files_only.
A tower directory is what the hub holds: config.json (a full CLIP/SigLIP model or only its
vision half), preprocessor_config.json and the weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..api import ModelLoadError
from .checkpoint import load_weights

TOWER_ENV = "NANOVLM_VISION_TOWER"
VISION_MODEL_TYPES = ("clip_vision_model", "siglip_vision_model")


def hub_cache_dir() -> Path:
    """huggingface_hub's cache directory, read from the environment now (huggingface_hub reads
    it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    cache_home = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(cache_home).expanduser() / "huggingface" / "hub"


@dataclass
class VisionTower:
    name: str  # as the checkpoint names it
    path: Path  # the directory it was found in
    config: object  # CLIPVisionConfig or SiglipVisionConfig

    def weights(self) -> dict[str, torch.Tensor]:
        """The tower's vision weights, named as in transformers' vision model (no
        `vision_model.` prefix; a full CLIP/SigLIP checkpoint's text half is left out)."""
        prefix = "vision_model."
        state = load_weights(self.path, keep=lambda name: name.startswith(prefix) or not _is_other_half(name))
        state = {name.removeprefix(prefix): tensor for name, tensor in state.items()}
        if not getattr(self.config, "vision_use_head", True):  # SigLIP's pooling head, unused
            state = {name: tensor for name, tensor in state.items() if not name.startswith("head.")}
        return state

    def image_processor(self, processor_class, **overrides):
        """`processor_class` (a transformers image processor) with the tower's own settings
        (size, crop, mean, std) from its preprocessor_config.json."""
        if not (self.path / "preprocessor_config.json").is_file():
            raise ModelLoadError(
                f"the vision tower '{self.name}' in '{self.path}' has no preprocessor_config.json "
                "(its image size, mean and std)"
            )
        try:
            return processor_class.from_pretrained(str(self.path), local_files_only=True, **overrides)
        except (OSError, ValueError) as error:
            raise ModelLoadError(
                f"cannot read the image settings of the vision tower in '{self.path}': {error}"
            ) from error


def _is_other_half(name: str) -> bool:
    """Weights of a full CLIP/SigLIP checkpoint that are not its vision model."""
    return name.startswith(("text_model.", "text_projection", "visual_projection", "logit_scale", "logit_bias"))


def find_vision_tower(name: str, model_dir: Path, explicit: str | Path | None = None) -> VisionTower:
    """The tower `name` (from the checkpoint's config) as a local directory, or ModelLoadError
    saying where it was looked for and how to provide it."""
    explicit = explicit or os.environ.get(TOWER_ENV) or None
    if explicit:
        path = Path(explicit).expanduser()
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"the vision tower directory '{path}' (given for '{name}') has no config.json")
        return open_tower(name, path)
    if not name:
        raise ModelLoadError(f"'{model_dir}': config.json names no vision tower (mm_vision_tower)")
    named = Path(name).expanduser()
    local = ([named] if named.is_absolute() else []) + [model_dir / name, model_dir / named.name]
    for candidate in local:
        if (candidate / "config.json").is_file():
            return open_tower(name, candidate)
    cache = hub_cache_dir()
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(repo_id=name, cache_dir=str(cache), local_files_only=True))
    except (OSError, ValueError) as error:  # LocalEntryNotFoundError, HFValidationError (a name no repo has)
        raise ModelLoadError(
            f"the vision tower '{name}' that '{model_dir}' names (mm_vision_tower) is not on this machine: "
            f"not in the Hugging Face cache '{cache}' ({type(error).__name__}). Provide it: copy a Hugging Face "
            f"cache that holds it (`hf download {name}` where there is a network) to this machine and set "
            f"HF_HUB_CACHE, or point ${TOWER_ENV} at a directory holding its config.json, "
            "preprocessor_config.json and weights"
        ) from error
    return open_tower(name, path)


def open_tower(name: str, path: Path) -> VisionTower:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"cannot read the config of the vision tower '{name}' in '{path}': {error}") from error
    config = getattr(config, "vision_config", None) or config
    if config.model_type not in VISION_MODEL_TYPES:
        raise ModelLoadError(
            f"the vision tower '{name}' in '{path}' is a '{config.model_type}' model; supported: CLIP, SigLIP"
        )
    if config.model_type == "siglip_vision_model":
        config.vision_use_head = False  # LLaVA-style models read hidden states, never the pooling head
    return VisionTower(name, path, config)
