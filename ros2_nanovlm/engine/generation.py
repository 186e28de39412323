"""THE token loop: prefill, decode steps, stop. Every local backend generates through `generate()`,
whichever runner computes the tokens (transformers on any device, FastLlama's CUDA graphs).

Per token the loop can: stream the new text (`GenerationControl.on_token`), stop on request
(`should_stop`, checked before every decode step, so a cancel takes effect within one token) and
restrict the choice with a token mask (a `TokenConstraint`, e.g. a JSON grammar), which the
runner applies before it picks the token: on the GPU inside the captured step.

A runner offers (hf/lm_runner.py, cuda/fast_llama.py):
    vocab_size                          the logits' width
    set_token_mask(words | None)        the mask of the next choice (token_mask.py), None = all
    prefill(embeds, start) -> token     positions start.., their KV written; the first token
    decode_step(token, position, more=, fill_mask=)
                                        feed `token` at `position`; the next token. `more`: the
                                        caller will probably feed the result back, so the runner
                                        may start that step before returning (never with a mask:
                                        the next mask depends on this token). `fill_mask`: sets
                                        this choice's mask; the runner calls it once the step's
                                        layers are under way (FastLlama: while the GPU runs them)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .api import GenerationControl
from .token_mask import mask_words


class TokenConstraint(Protocol):
    """Restricts each token choice of one answer (structured.py's JsonConstraint is one)."""

    def fill_mask(self, out: np.ndarray, tokens_left: int) -> None:
        """Write the allowed tokens of the next choice into `out` (token_mask.py's layout);
        `tokens_left` counts that choice and the ones the budget still allows after it."""

    def accept(self, token: int) -> None:
        """The token chosen (one the last mask allowed)."""

    def is_finished(self) -> bool:
        """Nothing but a stop token may follow: the answer is complete."""


@dataclass
class Generated:
    token_ids: list[int]  # the answer's tokens, without the stop token
    text: str  # the answer's text: exactly the pieces handed to on_token, joined
    stop_reason: str  # "eos", "max_new_tokens", "context_full" or "cancelled"
    prefill_ms: float
    decode_ms: float


class TextStream:
    """Token ids to text pieces, as they come: a piece is final once the tokens after it cannot
    change it. Decoding keeps a short window of earlier tokens, so a tokenizer that drops a
    word's leading space at the start of a decode (SentencePiece) decodes the same text as for
    the whole answer, and a piece never ends inside a multi-byte character (the decoder then
    writes U+FFFD, and the piece waits for the next token). Whitespace at the start of the answer
    is dropped and whitespace at its end held back, so the pieces join to decode(ids).strip().

    Used by one generation, on the thread that generates."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0  # the window's start: tokens before it are never decoded again
        self._read_offset = 0  # tokens up to here are in the text already handed out
        self._held = ""  # trailing whitespace not handed out yet
        self._started = False
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        """The new final text after `token` ("" when nothing is final yet)."""
        self._ids.append(token)
        window = self._ids[self._prefix_offset :]
        before = self._decode(self._ids[self._prefix_offset : self._read_offset])
        after = self._decode(window)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return self._release(after[len(before) :], final=False)

    def finish(self) -> str:
        """What is left when the answer ends (a character cut by the budget stays as U+FFFD)."""
        before = self._decode(self._ids[self._prefix_offset : self._read_offset])
        after = self._decode(self._ids[self._prefix_offset :])
        self._read_offset = len(self._ids)
        return self._release(after[len(before) :], final=True)

    def _release(self, piece: str, final: bool) -> str:
        text = self._held + piece
        if not self._started:
            text = text.lstrip()
            self._started = bool(text)
        kept = text.rstrip()
        self._held = "" if final else text[len(kept) :]
        self.text += kept
        return kept


def generate(
    runner,
    embeds,
    start: int,
    *,
    max_new_tokens: int,
    budget: int,
    stop_ids: set[int],
    text: TextStream,
    kv_keys: Callable[[list[Hashable]], None],
    control: GenerationControl | None = None,
    constraint: TokenConstraint | None = None,
) -> Generated:
    """Prefill `embeds` at positions start.., then decode greedily until a stop token, the
    constraint's end, `budget` tokens (≤ max_new_tokens; less when the context is full) or a
    cancel. `kv_keys` is told each token whose KV the runner wrote (the prefix tracker)."""
    control = control or GenerationControl()
    should_stop = control.should_stop or (lambda: False)
    mask = np.empty(mask_words(runner.vocab_size), dtype=np.int32) if constraint else None

    def choose_next(tokens_left: int) -> None:
        if constraint is not None:
            constraint.fill_mask(mask, tokens_left)
            runner.set_token_mask(mask)

    started = time.perf_counter()
    generated: list[int] = []
    runner.set_token_mask(None)
    choose_next(budget)
    token = runner.prefill(embeds, start)
    prefill_ms = (time.perf_counter() - started) * 1000.0

    decode_started = time.perf_counter()
    position = start + embeds.shape[0]  # where the next fed token goes
    stop_reason = ""
    while True:
        if token in stop_ids:
            stop_reason = "eos"
            break
        generated.append(token)
        if constraint is not None:
            constraint.accept(token)
        piece = text.push(token)
        if piece and control.on_token:
            control.on_token(piece)
        if constraint is not None and constraint.is_finished():
            stop_reason = "eos"
            break
        if len(generated) >= budget:
            stop_reason = "max_new_tokens" if len(generated) >= max_new_tokens else "context_full"
            break
        if should_stop():
            stop_reason = "cancelled"
            break
        # more: unless this is the last token the budget allows, or the next choice needs a
        # mask that depends on this token, the runner may start the next step right away.
        if constraint is None:
            token = runner.decode_step(token, position, more=len(generated) + 1 < budget)
        else:
            tokens_left = budget - len(generated)
            token = runner.decode_step(token, position, fill_mask=lambda left=tokens_left: choose_next(left))
        kv_keys([generated[-1]])
        position += 1
    last = text.finish()
    if last and control.on_token:
        control.on_token(last)
    runner.set_token_mask(None)
    decode_ms = (time.perf_counter() - decode_started) * 1000.0
    return Generated(generated, text.text, stop_reason, prefill_ms, decode_ms)
