"""The engine's public types: what a backend is given and what it returns.

A backend turns a conversation (system prompt, user/assistant turns, images) into an answer.
The transformers backend is the first; an MLC backend or an OpenAI-compatible client implement
the same `Backend` class. Nothing here imports torch, so callers can type-check without it.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class EngineError(Exception):
    """Base of every error the engine raises on purpose; the message is meant for the user."""


class InvalidInput(EngineError):
    """The request cannot be answered as given (bad image, empty or overlong prompt, ...)."""


class OutOfMemory(EngineError):
    """An answer ran out of memory (host or GPU); the model stays loaded and the next request
    may fit."""


class ModelLoadError(EngineError):
    """The model could not be loaded; the message names the path and the reason."""


@dataclass(frozen=True)
class Turn:
    """One message of a conversation. `image` is an RGB uint8 array (H, W, 3) or None."""

    role: str  # "user" or "assistant"
    text: str
    image: np.ndarray | None = None


@dataclass(frozen=True)
class JsonRequest:
    """Constrained JSON output: the answer is one JSON value that the grammar guarantees.
    `schema` None = any JSON object; else a JSON Schema (a dict)."""

    schema: dict[str, Any] | None = None


@dataclass(frozen=True)
class GenerationRequest:
    system_prompt: str
    turns: tuple[Turn, ...]
    max_new_tokens: int
    json: JsonRequest | None = None  # None = free text


@dataclass
class GenerationControl:
    """What a caller can do to one generation while it runs. Both callbacks run on the thread
    that generates, between two decode steps.

    on_token: receives each new piece of the answer's text as soon as it is final (a piece never
        ends inside a multi-byte character; whitespace at the end is held back until text
        follows it). The pieces concatenate to exactly `Answer.text`.
    should_stop: polled before every decode step; True stops the answer with stop reason
        "cancelled" (within one token).
    constraint: restricts every token choice (generation.TokenConstraint: a token mask filled
        before each choice, applied by the runner before it picks); JSON mode makes its own."""

    on_token: Callable[[str], None] | None = None
    should_stop: Callable[[], bool] | None = None
    constraint: Any = None


@dataclass
class Timings:
    """Milliseconds spent in each stage of one answer."""

    vision_ms: float = 0.0  # preprocessing + vision encoder + projector (0 on a cache hit)
    prefill_ms: float = 0.0  # new prompt tokens through the LLM
    decode_ms: float = 0.0  # the answer tokens after the first
    total_ms: float = 0.0  # everything, from the request to the decoded string


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    prompt_tokens: int  # tokens of the whole prompt, image tokens included
    reused_tokens: int  # prompt tokens whose KV entries were reused from the cache
    image_cache_hit: bool  # every image of the prompt came from the embedding cache
    stop_reason: str  # "eos", "max_new_tokens", "context_full" or "cancelled"
    timings: Timings = field(default_factory=Timings)
    json: str = ""  # JSON mode: the answer's JSON value, compact; "" when it is not complete
    json_error: str = ""  # JSON mode: why `json` is empty (the budget ran out, cancelled)

    @property
    def generated_tokens(self) -> int:
        return len(self.token_ids)


class Backend(abc.ABC):
    """What an inference backend implements. One request at a time; the engine serialises calls."""

    @property
    @abc.abstractmethod
    def model_name(self) -> str:
        """A short name of the loaded model, for results and logs."""

    @property
    @abc.abstractmethod
    def device(self) -> str:
        """Where the model runs, e.g. "cpu" or "cuda:0"."""

    @property
    def multiple_images(self) -> bool:
        """Whether one conversation may hold several images (VILA does; LLaVA-1.5 was trained
        on one)."""
        return False

    @abc.abstractmethod
    def generate(self, request: GenerationRequest, control: GenerationControl | None = None) -> Answer:
        """Answer the last user turn of `request` greedily; raise InvalidInput for bad requests."""

    @abc.abstractmethod
    def count_tokens(self, text: str) -> int:
        """Tokens `text` takes in a prompt as typed (control tokens counted as text). Called from
        any thread, also while generate() runs on another."""

    def release_cached_memory(self) -> None:  # noqa: B027 - optional: after an out-of-memory error
        """Give cached allocations back (after an out-of-memory error), keeping the model."""

    def prepare_images(self, frames: Sequence[np.ndarray]) -> int:
        """Encode these frames in one batch into the embedding cache; returns how many were
        encoded (frames already cached are skipped). The engine has checked the frames. Optional:
        a backend without an embedding cache encodes nothing and returns 0."""
        return 0

    def close(self) -> None:  # noqa: B027 - optional: most backends free memory by dropping references
        """Release memory held by the model (optional)."""
