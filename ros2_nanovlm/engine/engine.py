"""VLMEngine: the one object a caller needs. It checks requests, runs them one at a time on a
backend and handles JSON mode; ChatSession keeps a conversation for follow-up questions."""

from __future__ import annotations

import threading

import numpy as np

from .api import Answer, Backend, GenerationRequest, InvalidInput, Turn
from .config import EngineConfig
from .frames import check_frame
from .json_output import extract_json_object, with_json_instruction


def create_backend(config: EngineConfig) -> Backend:
    """Load the backend that `config.backend` names (heavy imports happen here, not at import)."""
    if config.backend == "transformers":
        from .hf.backend import TransformersBackend

        return TransformersBackend(config)
    raise ValueError(f"unknown backend '{config.backend}'")


class VLMEngine:
    def __init__(self, backend: Backend, config: EngineConfig):
        self._backend = backend
        self.config = config
        # The backend owns one KV cache and one set of buffers: one request at a time.
        self._lock = threading.Lock()

    @classmethod
    def load(cls, config: EngineConfig) -> VLMEngine:
        config.validate()
        return cls(create_backend(config), config)

    @property
    def model_name(self) -> str:
        return self._backend.model_name

    @property
    def device(self) -> str:
        return self._backend.device

    def ask(
        self,
        prompt: str,
        image: np.ndarray | None = None,
        *,
        system_prompt: str = "",
        max_new_tokens: int | None = None,
        json_output: bool = False,
    ) -> Answer:
        """One question about one image, with no history. The KV cache still reuses whatever
        prefix the previous request shared with this one (system prompt, chat template)."""
        return self.chat(system_prompt).ask(prompt, image, max_new_tokens=max_new_tokens, json_output=json_output)

    def chat(self, system_prompt: str = "") -> ChatSession:
        return ChatSession(self, system_prompt)

    def close(self) -> None:
        with self._lock:
            self._backend.close()

    def _answer(
        self,
        system_prompt: str,
        turns: tuple[Turn, ...],
        max_new_tokens: int | None,
        json_output: bool,
    ) -> Answer:
        if max_new_tokens is None:
            max_new_tokens = self.config.max_new_tokens
        if max_new_tokens < 1:
            raise InvalidInput(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        request = GenerationRequest(system_prompt, turns, max_new_tokens)
        with self._lock:
            answer = self._backend.generate(request)
        if json_output:
            answer.json, answer.json_error = extract_json_object(answer.text)
        return answer

    def _check_prompt(self, prompt: str) -> None:
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidInput("prompt is empty")
        if len(prompt) > self.config.max_prompt_chars:
            raise InvalidInput(f"prompt is {len(prompt)} characters, over the limit of {self.config.max_prompt_chars}")


class ChatSession:
    """A conversation: follow-up questions see the earlier turns. Only the tokens that are new
    since the last turn are prefilled; the backend's KV cache holds the rest."""

    def __init__(self, engine: VLMEngine, system_prompt: str = ""):
        self._engine = engine
        self.system_prompt = system_prompt
        self._history: tuple[Turn, ...] = ()

    @property
    def history(self) -> tuple[Turn, ...]:
        return self._history

    def ask(
        self,
        prompt: str,
        image: np.ndarray | None = None,
        *,
        max_new_tokens: int | None = None,
        json_output: bool = False,
    ) -> Answer:
        self._engine._check_prompt(prompt)
        if image is not None:
            check_frame(image, self._engine.config.max_image_pixels)
        text = with_json_instruction(prompt) if json_output else prompt
        turns = self._history + (Turn("user", text, image),)
        answer = self._engine._answer(self.system_prompt, turns, max_new_tokens, json_output)
        self._history = turns + (Turn("assistant", answer.text),)
        return answer

    def reset(self) -> None:
        """Forget the conversation; the next question starts from the system prompt."""
        self._history = ()
