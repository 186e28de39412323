"""Runs the language model of a transformers VLM: embeddings in, greedy tokens out, KV cache
kept between calls. The GPU fast path (cuda/fast_llama.py) offers the same four methods."""

from __future__ import annotations

import torch
from transformers import DynamicCache, StaticCache

from ..token_mask import DeviceTokenMask


class TransformersLMRunner:
    """The model's own forward: any architecture transformers supports, on any device (the CPU
    path, and GPUs for models FastLlama does not cover).

    On the CPU the KV cache grows with the prompt (attention covers only the tokens held); on a
    GPU it is static (fixed shapes)."""

    def __init__(self, model, max_tokens: int):
        self._model = model
        self.max_tokens = max_tokens
        self._device = next(model.parameters()).device
        self._static = self._device.type != "cpu"
        if self._static:
            self._cache = StaticCache(config=model.config, max_cache_len=max_tokens)
        else:
            self._cache = DynamicCache(config=model.config)
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.token_mask = DeviceTokenMask(self.vocab_size, self._device)

    def set_token_mask(self, words) -> None:
        """The tokens the next choice may take (token_mask.py's layout); None = all."""
        self.token_mask.set(words)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self._model.get_input_embeddings()(ids)

    def rewind(self, length: int) -> None:
        if self._static:
            # transformers' StaticLayer writes at its `cumulative_length` (pinned transformers 5.17).
            for layer in self._cache.layers:
                layer.cumulative_length.fill_(length)
            return
        held = self._cache.get_seq_length()
        if held > length:
            self._cache.crop(length - held)  # a negative value removes that many tokens

    def prefill(self, embeds: torch.Tensor, start: int) -> int:
        return self._forward(start, inputs_embeds=embeds[None])

    def decode_step(self, token: int, position: int, *, more: bool = False, fill_mask=None) -> int:
        """The next token after `token` at `position`; `more` (a hint that the caller will feed
        the result back) changes nothing here: eager transformers has no step to start early.
        fill_mask sets this choice's mask (called first: nothing runs asynchronously here)."""
        if fill_mask is not None:
            fill_mask()
        return self._forward(position, input_ids=torch.tensor([[token]], device=self._device))

    def _forward(self, start: int, *, input_ids=None, inputs_embeds=None) -> int:
        length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        positions = torch.arange(start, start + length, device=self._device).unsqueeze(0)
        output = self._model(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            position_ids=positions,
            past_key_values=self._cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return int(self.token_mask.apply(output.logits[0, -1]).argmax())
