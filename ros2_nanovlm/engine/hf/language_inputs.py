"""What a processor-driven VLM's own forward hands its language model: the input embeddings
(image features already merged in) and the position ids (Qwen's 3-D ones), taken by running
the VLM's forward with a stand-in language model that records its arguments and stops there.

Why this way: each family merges its images differently (Qwen's window-attention ViT and 2 x 2
merger, SmolVLM's tiles and pixel shuffle, InternVL's projector) and Qwen computes its
multimodal positions from the whole prompt. Running the model's own code up to the language
model keeps every one of those the model's business; a faster runner (cuda/processor_fast.py)
then runs only the language model. Nothing of transformers is patched: the stand-in replaces
one attribute of the loaded model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Where a VLM's inner model keeps its language model (Qwen2.5-VL, Qwen3-VL, InternVL, ... and
# SmolVLM's `text_model`).
LANGUAGE_MODEL_ATTRIBUTES = ("language_model", "text_model")


@dataclass
class LanguageInputs:
    """embeds (L, H); positions (S, L) int64, one row per rotary section, or None for the plain
    0..L-1; extras: any other tensor the forward passes (Qwen3-VL's deepstack features)."""

    embeds: torch.Tensor
    positions: torch.Tensor | None
    extras: dict


class _Recorded(Exception):
    def __init__(self, inputs: LanguageInputs):
        super().__init__("language model inputs recorded")
        self.inputs = inputs


class RecordingLanguageModel(nn.Module):
    """Stands in for a VLM's language model: the VLM's forward finds its input embeddings
    here (`embed`, a module from token ids to embeddings) and its call stops the forward with
    the arguments. Touched by the thread that generates."""

    def __init__(self, config, embed: nn.Module):
        super().__init__()
        self.config = config
        self.embed_tokens = embed

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def forward(self, input_ids=None, inputs_embeds=None, position_ids=None, **kwargs):
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if position_ids is not None:
            if position_ids.dim() == 3 and position_ids.shape[0] == 4:
                position_ids = position_ids[1:]  # Qwen prepends the 1-D text positions (for masks)
            position_ids = position_ids.reshape(-1, position_ids.shape[-1])  # (S, L) of batch 1
        extras = {key: value for key, value in kwargs.items() if _is_tensor_data(value) and key != "attention_mask"}
        raise _Recorded(LanguageInputs(inputs_embeds[0], position_ids, extras))


def _is_tensor_data(value) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    return isinstance(value, (list, tuple)) and any(isinstance(each, torch.Tensor) for each in value)


def language_model_of(model) -> tuple[nn.Module, str]:
    """(the language model of a transformers VLM, the attribute of model.model that holds it)."""
    inner = model.model
    for name in LANGUAGE_MODEL_ATTRIBUTES:
        if isinstance(getattr(inner, name, None), nn.Module):
            return getattr(inner, name), name
    raise ValueError(f"{type(model).__name__} keeps its language model under none of {LANGUAGE_MODEL_ATTRIBUTES}")


def install_recorder(model, embed: nn.Module) -> nn.Module:
    """Put a RecordingLanguageModel in place of the VLM's language model; returns the model it
    replaced."""
    language_model, name = language_model_of(model)
    setattr(model.model, name, RecordingLanguageModel(language_model.config, embed))
    return language_model


def record_language_inputs(model, tensors: dict) -> LanguageInputs:
    """Run the VLM's forward on a processor's tensors up to its (recording) language model."""
    inner = model.model
    if hasattr(inner, "rope_deltas"):
        inner.rope_deltas = None  # Qwen caches the last prompt's; a new prompt computes its own
    try:
        inner(**tensors, use_cache=False)
    except _Recorded as recorded:
        return recorded.inputs
    raise RuntimeError(f"{type(model).__name__}'s forward did not call its language model")
