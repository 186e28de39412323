"""VLMs composed from separate parts: a vision encoder, a projector and a causal LM whose input
embeddings receive the projected image tokens (the LLaVA recipe, without a LLaVA checkpoint).

A composed model is a directory with `nanovlm_vlm.json`:
    {"format": "nanovlm-composed-v1",
     "vision": {"architecture": "efficientnet_lite0", "weights": "vision/efficientnet-lite0.pth"},
     "projector": "projector",            # projector.json + projector.safetensors
     "language_model": "language_model"}  # a transformers causal-LM directory with its tokenizer
The embedded demo model (default_model.py) is one: EfficientNet-Lite0 -> projector -> SmolLM2.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..api import ModelLoadError

MANIFEST = "nanovlm_vlm.json"
FORMAT = "nanovlm-composed-v1"
VISION_ARCHITECTURES = ("efficientnet_lite0",)


def is_composed(model_path: str) -> bool:
    return (Path(model_path).expanduser() / MANIFEST).is_file()


def read_manifest(model_path: str) -> dict:
    path = Path(model_path).expanduser() / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot read '{path}': {error}") from error
    if manifest.get("format") != FORMAT:
        raise ModelLoadError(f"'{path}' is format {manifest.get('format')!r}; expected {FORMAT!r}")
    architecture = manifest.get("vision", {}).get("architecture")
    if architecture not in VISION_ARCHITECTURES:
        raise ModelLoadError(f"'{path}': vision architecture {architecture!r} is not one of {VISION_ARCHITECTURES}")
    return manifest


class ComposedImageEncoder:
    """Frame -> vision encoder features -> projector -> (image tokens, LM hidden size)."""

    def __init__(self, vision, projector, preprocess, device: torch.device, dtype: torch.dtype):
        self._vision = vision
        self._projector = projector
        self._preprocess = preprocess
        self._device = device
        self._dtype = dtype

    @torch.inference_mode()
    def __call__(self, frame: np.ndarray) -> torch.Tensor:
        pixels = self._preprocess(frame).to(self._device)
        return self._projector(self._vision.forward_features(pixels))[0].to(self._dtype)

    @torch.inference_mode()
    def encode_batch(self, frames: list[np.ndarray]) -> list[torch.Tensor]:
        """Several frames through one forward of encoder and projector: per frame what __call__
        gives (every frame is preprocessed to the same size and gives the same token count)."""
        pixels = torch.cat([self._preprocess(frame) for frame in frames]).to(self._device)
        tokens = self._projector(self._vision.forward_features(pixels)).to(self._dtype)
        # A copy each, not views of the batch: evicting one frame from the cache frees its memory.
        return [each.clone() for each in tokens]


def load_composed(model_path: str, device: torch.device, dtype: torch.dtype):
    """(language model, tokenizer, image encoder, default system prompt, image token)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..demo_model.efficientnet_lite import load_efficientnet_lite0, preprocess_rgb
    from ..demo_model.projector import load_projector

    root = Path(model_path).expanduser()
    manifest = read_manifest(model_path)
    try:
        vision = load_efficientnet_lite0(str(root / manifest["vision"]["weights"])).to(device)
        projector = load_projector(str(root / manifest["projector"]), device=device)
        language_model = (
            AutoModelForCausalLM.from_pretrained(root / manifest["language_model"], dtype=dtype, local_files_only=True)
            .to(device)
            .eval()
        )
        tokenizer = AutoTokenizer.from_pretrained(root / manifest["language_model"], local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ModelLoadError(f"cannot load the composed model in '{model_path}': {error}") from error
    encoder = ComposedImageEncoder(vision, projector, preprocess_rgb, device, dtype)
    config = projector.config
    return language_model, tokenizer, encoder, config.system_prompt, config.image_token
