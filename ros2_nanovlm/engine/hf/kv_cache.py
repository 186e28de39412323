"""Which tokens the KV cache holds, so a request reuses the longest prefix it shares with the
previous one (system prompt, template, earlier turns, the same image)."""

from __future__ import annotations

from collections.abc import Hashable, Sequence


class PrefixTracker:
    """`keys[i]` identifies what sits at KV position i: the token id for text, and
    (image digest, index) for an image token, since every image token has the same id.
    The runner's cache is rewound to the shared prefix; positions past it are overwritten by the
    next prefill and, until then, hidden by the causal mask."""

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self.keys: list[Hashable] = []

    def __len__(self) -> int:
        return len(self.keys)

    def shared_prefix(self, keys: Sequence[Hashable]) -> int:
        length = 0
        for held, wanted in zip(self.keys, keys):
            if held != wanted:
                break
            length += 1
        return length

    def truncate(self, length: int) -> None:
        del self.keys[length:]

    def extend(self, keys: Sequence[Hashable]) -> None:
        self.keys.extend(keys)
        assert len(self.keys) <= self.max_tokens
