"""The token mask of constrained decoding: which tokens the next choice may take.

One layout everywhere: int32 words, bit c % 32 of word c // 32 set when token c is allowed. The
grammar library fills it on the host (engine/structured.py), the runners apply it before they
choose a token: on the CPU to the logits, on the GPU inside the captured decode step (the greedy
kernel reads the words). All ones when the answer is unconstrained, so one CUDA graph serves both
modes and an unconstrained choice is the plain argmax, bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch


def mask_words(vocab_size: int) -> int:
    return -(-vocab_size // 32)


def words_allowing(tokens, vocab_size: int) -> np.ndarray:
    """The mask allowing exactly `tokens` (an iterable of ids below `vocab_size`)."""
    bits = np.zeros(mask_words(vocab_size) * 32, dtype=bool)
    bits[np.fromiter(tokens, dtype=np.int64)] = True
    return np.packbits(bits, bitorder="little").view("<i4").astype(np.int32)


def allowed_tokens(words: np.ndarray, vocab_size: int) -> np.ndarray:
    """The ids a mask allows (tests and error messages)."""
    bits = np.unpackbits(np.ascontiguousarray(words, dtype="<i4").view(np.uint8), bitorder="little")
    return np.flatnonzero(bits[:vocab_size])


class DeviceTokenMask:
    """The mask a runner reads, on its device: `words` is a static buffer (the captured decode
    step reads its address), rewritten for every constrained token choice.

    Owned by one runner; touched only by the thread that generates."""

    def __init__(self, vocab_size: int, device: torch.device):
        self.vocab_size = vocab_size
        count = mask_words(vocab_size)
        self.words = torch.full((count,), -1, dtype=torch.int32, device=device)
        # Pinned, so the copy to the GPU is asynchronous and ordered before the step that reads it.
        self._host = torch.empty(count, dtype=torch.int32, pin_memory=device.type == "cuda")
        self.unconstrained = True
        self._token_word = self._token_bit = None  # per-token word index and bit, made on first use

    def set(self, words: np.ndarray | None) -> None:
        """Allow what `words` allows for the next choice; None allows every token."""
        if words is None:
            if not self.unconstrained:
                self.words.fill_(-1)
                self.unconstrained = True
            return
        # The previous copy out of _host has finished: the caller read the token chosen with it.
        self._host.numpy()[:] = words
        self.words.copy_(self._host, non_blocking=True)
        self.unconstrained = False

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` (vocab,) with the disallowed tokens at -inf (the same tensor when unconstrained)."""
        if self.unconstrained:
            return logits
        if self._token_word is None:
            ids = torch.arange(logits.shape[-1], device=self.words.device)
            self._token_word, self._token_bit = ids // 32, (ids % 32).to(torch.int32)
        allowed = (self.words[self._token_word] >> self._token_bit) & 1
        return logits.masked_fill(allowed == 0, float("-inf"))
