"""Image embeddings by content hash: a question about a frame already seen skips the encoder."""

from __future__ import annotations

from collections import OrderedDict

import torch


class EmbeddingCache:
    """Least-recently-used map digest -> (image tokens, hidden) tensor, `capacity` entries."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, digest: str) -> torch.Tensor | None:
        features = self._entries.get(digest)
        if features is None:
            self.misses += 1
            return None
        self._entries.move_to_end(digest)
        self.hits += 1
        return features

    def put(self, digest: str, features: torch.Tensor) -> None:
        if self.capacity == 0:
            return
        self._entries[digest] = features
        self._entries.move_to_end(digest)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
