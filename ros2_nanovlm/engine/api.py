"""The engine's public types: what a backend is given and what it returns.

A backend turns a conversation (system prompt, user/assistant turns, images) into an answer.
The transformers backend is the first; an MLC backend or an OpenAI-compatible client implement
the same `Backend` class. Nothing here imports torch, so callers can type-check without it.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import numpy as np


class EngineError(Exception):
    """Base of every error the engine raises on purpose; the message is meant for the user."""


class InvalidInput(EngineError):
    """The request cannot be answered as given (bad image, empty or overlong prompt, ...)."""


class ModelLoadError(EngineError):
    """The model could not be loaded; the message names the path and the reason."""


@dataclass(frozen=True)
class Turn:
    """One message of a conversation. `image` is an RGB uint8 array (H, W, 3) or None."""

    role: str  # "user" or "assistant"
    text: str
    image: np.ndarray | None = None


@dataclass(frozen=True)
class GenerationRequest:
    system_prompt: str
    turns: tuple[Turn, ...]
    max_new_tokens: int


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
    stop_reason: str  # "eos", "max_new_tokens" or "context_full"
    timings: Timings = field(default_factory=Timings)
    json: str = ""  # first JSON object of the answer (JSON mode only)
    json_error: str = ""  # why `json` is empty in JSON mode

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

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> Answer:
        """Answer the last user turn of `request` greedily; raise InvalidInput for bad requests."""

    def close(self) -> None:  # noqa: B027 - optional: most backends free memory by dropping references
        """Release memory held by the model (optional)."""
