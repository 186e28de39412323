"""Find, check and load a Hugging Face-format VLM directory, with errors that name the path."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..api import ModelLoadError

# model_type in config.json -> what the backend knows how to run
SUPPORTED_MODEL_TYPES = ("llava", "llava_next")


def read_model_config(model_path: str) -> dict:
    """Parse config.json of `model_path`, or raise ModelLoadError saying what is wrong."""
    path = Path(model_path).expanduser()
    if not model_path:
        raise ModelLoadError("no model path given")
    if not path.exists():
        raise ModelLoadError(f"model path '{model_path}' does not exist")
    if not path.is_dir():
        raise ModelLoadError(f"model path '{model_path}' is not a directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"model path '{model_path}' has no config.json: not a Hugging Face model directory")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot read '{config_file}': {error}") from error
    family = _original_family(model_path)
    if family is not None:  # an original checkpoint (LLaVA, Obsidian, VILA): converted on load
        return {"model_type": "llava", "text_config": family.text_config(model_path), "family": family.__name__}
    from ..families import PROCESSOR_MODEL_TYPES  # run by hf/processor_runner.py

    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES + PROCESSOR_MODEL_TYPES:
        supported = ", ".join(SUPPORTED_MODEL_TYPES + PROCESSOR_MODEL_TYPES)
        raise ModelLoadError(f"model path '{model_path}' holds a '{model_type}' model; supported: {supported}")
    return config


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device '{name}' was asked for, but CUDA is not available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # float16 is the fast path on GPUs; most CPU kernels are fastest (and exact) in float32.
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def load_llava(model_path: str, device: torch.device, dtype: torch.dtype):
    """Load a LLaVA-1.5 or LLaVA-1.6 (llava_next) model and its processor from a local directory."""
    read_model_config(model_path)
    family = _original_family(model_path)
    if family is not None:
        model, processor = family.load(model_path, dtype=dtype)
        return model.to(device).eval(), processor
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(model_path, local_files_only=True)
        model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=dtype, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"cannot load the model in '{model_path}': {error}") from error
    return model.to(device).eval(), processor


def _original_family(model_path: str):
    """The model family (engine/families) whose original, non-transformers layout the directory
    holds, or None for a transformers directory."""
    from ..families import find

    return find(model_path)
