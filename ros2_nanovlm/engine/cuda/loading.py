"""Load a LLaVA checkpoint for the GPU fast path: the vision tower and projector stay
transformers modules (fp16), the language model becomes a FastLlama (4-bit or fp16).

4-bit weights are cached on disk beside the model directory (`<dir>.nanovlm-w4.safetensors`,
or under $NANOVLM_HOME/cache when that is not writable): a second start reads about a quarter of
the bytes and skips quantization.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..api import ModelLoadError
from .fast_llama import FastLlama

CACHE_FORMAT = "nanovlm-w4-v3"  # v2: int8 embeddings and LM head, unused vision layers dropped; v3: nibble pairs


def load_fast_llava(model_path: str, device: torch.device, *, quantize: bool, max_tokens: int, cache_home: Path):
    """(vision part of the LLaVA model on `device`, processor, FastLlama ready to run)."""
    from ..families import find

    if find(model_path) is not None:  # an original checkpoint: converted in memory (no 4-bit cache file)
        from ..hf.loading import load_llava

        model, processor = load_llava(model_path, torch.device("cpu"), torch.float16)
        return model.eval(), processor, fast_llava_from_model(model, device, quantize=quantize, max_tokens=max_tokens)
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(model_path, local_files_only=True)
        config = AutoConfig.from_pretrained(model_path, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"cannot load the model in '{model_path}': {error}") from error
    cache_file = quantized_cache_file(model_path, cache_home) if quantize else None
    fingerprint = _fingerprint(model_path)
    if cache_file is not None and _cache_matches(cache_file, fingerprint):
        state = load_file(str(cache_file), device=str(device))
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(config, dtype=torch.float16)
        _drop_language_model(model)
        _drop_unused_vision_layers(model)
        vision_state = {name[4:]: tensor for name, tensor in state.items() if name.startswith("vlm.")}
        result = model.load_state_dict(vision_state, strict=False, assign=True)
        if result.missing_keys or result.unexpected_keys:
            raise ModelLoadError(f"stale 4-bit cache '{cache_file}': {result}; delete it to rebuild")
        lm_state = {name[3:]: tensor for name, tensor in state.items() if name.startswith("lm.")}
        lm = FastLlama.from_state(config.text_config, lm_state, max_tokens=max_tokens, device=device)
    else:
        try:
            model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=torch.float16, local_files_only=True)
        except (OSError, ValueError, KeyError) as error:
            raise ModelLoadError(f"cannot load the model in '{model_path}': {error}") from error
        lm = fast_llava_from_model(model, device, quantize=quantize, max_tokens=max_tokens)
        if cache_file is not None:
            _save_cache(cache_file, fingerprint, model, lm)
    return model.eval(), processor, lm


def fast_llava_from_model(model, device: torch.device, *, quantize: bool, max_tokens: int) -> FastLlama:
    """Move the language model of a transformers LLaVA into a FastLlama (quantizing it on the
    GPU layer by layer, with a progress bar); the rest of `model` goes to `device` in fp16."""
    from tqdm.auto import tqdm

    progress = (lambda layers: tqdm(layers, desc="quantizing to 4 bits", unit="layer")) if quantize else None
    text_config = model.model.language_model.config
    lm = FastLlama.from_hf(
        model.model.language_model,
        model.lm_head,
        max_tokens=max_tokens,
        quantize=quantize,
        device=device,
        progress=progress,
    )
    _drop_language_model(model)
    _drop_unused_vision_layers(model)
    # Converting on the GPU leaves torch's allocator with segments that hold a few live
    # tensors among the holes of the fp16 weights and the quantizer's temporaries: measured
    # 1.9 GB reserved beyond what a 7B 4-bit model uses. Give all of it back and place the
    # weights afresh, as loading the on-disk 4-bit cache does.
    state = {name: tensor.cpu() for name, tensor in lm.state_dict().items()}
    model.to("cpu")
    del lm
    gc.collect()
    torch.cuda.empty_cache()
    model.to(device, torch.float16)
    return FastLlama.from_state(text_config, state, max_tokens=max_tokens, device=device)


def _drop_language_model(model) -> None:
    """FastLlama holds the language model's weights; free transformers' copies."""
    language_model = model.model.language_model
    language_model.layers = torch.nn.ModuleList()
    language_model.embed_tokens = None
    language_model.norm = None
    model.lm_head = None


def _drop_unused_vision_layers(model) -> None:
    """LLaVA takes image features from the vision tower's second-to-last layer
    (vision_feature_layer = -2): the last layer is computed, then thrown away. Drop the layers
    after the one used (25 MB and 1/24 of the encoder's time for CLIP ViT-L) and point
    vision_feature_layer at the new last one."""
    chosen = model.config.vision_feature_layer
    tower = model.model.vision_tower
    encoder = getattr(getattr(tower, "vision_model", tower), "encoder", None)  # transformers 4.x / 5.x
    if not isinstance(chosen, int) or encoder is None or not hasattr(encoder, "layers"):
        return
    count = len(encoder.layers)
    keep = count + 1 + chosen if chosen < 0 else chosen  # hidden_states[i] is the output of i layers
    if 0 < keep < count:
        encoder.layers = encoder.layers[:keep]
        model.config.vision_feature_layer = -1


def quantized_cache_file(model_path: str, cache_home: Path) -> Path:
    source = Path(model_path).expanduser().resolve()
    beside = source.with_name(f"{source.name}.nanovlm-w4.safetensors")
    if os.access(source.parent, os.W_OK):
        return beside
    digest = hashlib.sha256(str(source).encode()).hexdigest()[:16]
    return cache_home / "cache" / f"{source.name}-{digest}.nanovlm-w4.safetensors"


def _fingerprint(model_path: str) -> str:
    """Changes when the checkpoint or the cache format does."""
    source = Path(model_path).expanduser()
    parts = [CACHE_FORMAT, (source / "config.json").read_text()]
    for weights in sorted(source.glob("*.safetensors")):
        stat = weights.stat()
        parts.append(f"{weights.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _cache_matches(cache_file: Path, fingerprint: str) -> bool:
    if not cache_file.is_file():
        return False
    try:
        with safe_open(str(cache_file), framework="pt") as handle:
            return (handle.metadata() or {}).get("fingerprint") == fingerprint
    except (OSError, ValueError):
        return False


def _save_cache(cache_file: Path, fingerprint: str, model, lm: FastLlama) -> None:
    state = {f"vlm.{name}": tensor.contiguous() for name, tensor in model.state_dict().items()}
    state.update({f"lm.{name}": tensor.contiguous() for name, tensor in lm.state_dict().items()})
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    partial = cache_file.with_suffix(".partial")
    save_file(
        state,
        str(partial),
        metadata={
            "fingerprint": fingerprint,
            "format": CACHE_FORMAT,
            "note": json.dumps("4-bit weights made by nanovlm; safe to delete"),
        },
    )
    partial.replace(cache_file)
