"""A static KV cache that knows which tokens it holds, so a request reuses the longest prefix it
shares with the previous one (system prompt, template, earlier turns, the same image)."""
from __future__ import annotations

from typing import Hashable, Sequence

from transformers import StaticCache


class PrefixKVCache:
    """Keys and values for up to `max_tokens` positions, preallocated once.

    `token_keys[i]` identifies what sits at position i: the token id for text, and
    (image digest, index) for an image token, since every image token has the same id.
    Rewinding is free: positions past the rewind point are overwritten by the next prefill
    and, until then, hidden by the causal mask.
    """

    def __init__(self, model_config, max_tokens: int):
        self.max_tokens = max_tokens
        self.cache = StaticCache(config=model_config, max_cache_len=max_tokens)
        self.token_keys: list[Hashable] = []

    def __len__(self) -> int:
        return len(self.token_keys)

    def shared_prefix(self, keys: Sequence[Hashable]) -> int:
        """How many leading positions of `keys` the cache already holds."""
        length = 0
        for held, wanted in zip(self.token_keys, keys):
            if held != wanted:
                break
            length += 1
        return length

    def rewind(self, length: int) -> None:
        del self.token_keys[length:]
        # transformers' StaticLayer writes at its `cumulative_length` (pinned transformers 5.17).
        for layer in self.cache.layers:
            layer.cumulative_length.fill_(length)

    def extend(self, keys: Sequence[Hashable]) -> None:
        self.token_keys.extend(keys)
        assert len(self.token_keys) <= self.max_tokens
