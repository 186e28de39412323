"""Processor-driven VLMs (Qwen2.5-VL, Qwen3-VL, SmolVLM2, InternVL) on the GPU fast path: the
model's own forward prepares the language model's inputs (vision tower, merge, Qwen's 3-D
positions: hf/language_inputs.py), and FastLlama runs the language model (4-bit weights,
CUDA-graph decode steps), as it does for LLaVA.

Not here: Gemma 3 and PaliGemma. Their language models (GELU, four norms a layer, soft-capped
logits) are no Llama, and their prefill attends bidirectionally within images; they stay on
transformers (hf/processor_runner.py).
"""

from __future__ import annotations

import gc

import torch
from torch import nn

from ..hf.language_inputs import LanguageInputs, install_recorder, language_model_of, record_language_inputs
from .fast_llama import FastLlama


class FastEmbedding(nn.Module):
    """Token ids -> FastLlama's input embeddings (int8 rows on 4-bit models): what the VLM's
    forward embeds its prompt with, so transformers' fp16 table need not stay in memory."""

    def __init__(self, lm: FastLlama):
        super().__init__()
        self._lm = lm  # not a submodule: FastLlama's tensors stay where they are

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self._lm.embed(ids.reshape(-1)).view(*ids.shape, -1)


def move_language_model(model, device: torch.device, *, quantize: bool, max_tokens: int, progress=None) -> FastLlama:
    """Convert the language model of a transformers VLM (on the CPU) into a FastLlama on
    `device`, put a recorder in its place (the forward stops there), and move the rest of the
    model (vision tower, projector) to `device` in fp16."""
    language_model, _ = language_model_of(model)
    lm = FastLlama.from_hf(
        language_model, model.lm_head, max_tokens=max_tokens, quantize=quantize, device=device, progress=progress
    )
    # As for LLaVA (loading.fast_llava_from_model): converting on the GPU leaves the allocator
    # with segments that a few live tensors pin among the holes; place the weights afresh.
    state = {name: tensor.cpu() for name, tensor in lm.state_dict().items()}
    del lm
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    lm = FastLlama.from_state(language_model.config, state, max_tokens=max_tokens, device=device)
    install_recorder(model, FastEmbedding(lm))
    model.lm_head = None
    model.to(device, torch.float16)
    return lm


class FastProcessorRunner:
    """generation.py's runner protocol over a processor-driven VLM whose language model is a
    FastLlama. Prefill takes a ProcessorPrompt (only at position 0: these families reuse no
    prefix); decode steps are FastLlama's. Touched only by the thread that generates."""

    def __init__(self, model, lm: FastLlama):
        self._model = model
        self.lm = lm
        self.vocab_size = lm.vocab_size
        self.token_mask = lm.token_mask

    def set_token_mask(self, words) -> None:
        self.lm.set_token_mask(words)

    def language_inputs(self, prompt) -> LanguageInputs:
        return record_language_inputs(self._model, prompt.tensors)

    def prefill(self, prompt, start: int) -> int:
        if start != 0:
            raise ValueError("a processor-driven model prefills its whole prompt (no prefix reuse)")
        inputs = self.language_inputs(prompt)
        length = inputs.embeds.shape[0]
        positions = inputs.positions
        # Decode steps continue from the prompt's largest position (Qwen's rope_deltas; 0 for
        # plain positions), as transformers' generate does.
        self.lm.set_rope_offset(0 if positions is None else int(positions.max()) + 1 - length)
        return self.lm.prefill(inputs.embeds, 0, positions, deepstack_additions(inputs))

    def decode_step(self, token: int, position: int, *, more: bool = False, fill_mask=None) -> int:
        return self.lm.decode_step(token, position, more=more, fill_mask=fill_mask)

    def reset(self) -> None:
        """Nothing to forget: every prefill writes its own positions and KV."""


def deepstack_additions(inputs: LanguageInputs) -> dict | None:
    """Qwen3-VL adds features of its vision tower's middle layers to the image tokens' hidden
    states after the first language-model layers (`deepstack_visual_embeds`, one per layer, at
    `visual_pos_masks`): as FastLlama's layer_additions, or None."""
    features = inputs.extras.get("deepstack_visual_embeds")
    mask = inputs.extras.get("visual_pos_masks")
    if not features or mask is None:
        return None
    rows = mask.reshape(-1).nonzero().squeeze(1)
    return {index: (rows, values) for index, values in enumerate(features)}
