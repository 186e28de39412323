"""VLMEngine: the one object a caller needs. It checks requests and runs them one at a time on a
backend; ChatSession keeps a conversation for follow-up questions, and streams or cancels an
answer while it is generated."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from .api import (
    Answer,
    Backend,
    EngineError,
    GenerationControl,
    GenerationRequest,
    InvalidInput,
    JsonRequest,
    ModelLoadError,
    OutOfMemory,
    Turn,
)
from .config import MAX_CHARS_PER_TOKEN, EngineConfig, cpu_threads
from .frames import check_frame
from .json_output import json_instruction

# What `cancel` may be: an Event (set() cancels) or a function that returns True to cancel.
Cancel = threading.Event | Callable[[], bool] | None


def create_backend(config: EngineConfig) -> Backend:
    """Load the backend that `config.backend` names (heavy imports happen here, not at import)."""
    if config.backend == "transformers":
        from .hf.backend import TransformersBackend

        return TransformersBackend(config)
    raise ValueError(f"unknown backend '{config.backend}'")


class VLMEngine:
    """Owns one loaded model (its backend) and serialises the requests to it: any thread may
    call ask(); one answer is generated at a time, the others wait on the lock."""

    def __init__(self, backend: Backend, config: EngineConfig):
        self._backend = backend
        self.config = config
        # The backend owns one KV cache and one set of buffers: one request at a time.
        self._lock = threading.Lock()

    @classmethod
    def load(cls, config: EngineConfig) -> VLMEngine:
        config.validate()
        import torch  # the backends' own dependency; imported here only to size its thread pool

        torch.set_num_threads(cpu_threads(config.cpu_threads))  # process-wide: torch has one pool
        try:
            backend = create_backend(config)
        except EngineError:
            raise
        except Exception as error:
            # A model directory is user input: whatever a malformed one makes transformers or
            # torch raise, the caller gets one kind of error that names the directory.
            raise ModelLoadError(
                f"cannot load '{config.model_path}': {type(error).__name__}: {str(error)[:300]}"
            ) from error
        return cls(backend, config)

    @property
    def model_name(self) -> str:
        return self._backend.model_name

    @property
    def device(self) -> str:
        return self._backend.device

    @property
    def multiple_images(self) -> bool:
        """Whether one conversation may hold several images."""
        return self._backend.multiple_images

    def ask(
        self,
        prompt: str,
        image: np.ndarray | None = None,
        *,
        system_prompt: str = "",
        max_new_tokens: int | None = None,
        json_output: bool = False,
        json_schema: dict[str, Any] | None = None,
        on_token: Callable[[str], None] | None = None,
        cancel: Cancel = None,
    ) -> Answer:
        """One question about one image, with no history. The KV cache still reuses whatever
        prefix the previous request shared with this one (system prompt, chat template).
        See ChatSession.ask for the options."""
        return self.chat(system_prompt).ask(
            prompt,
            image,
            max_new_tokens=max_new_tokens,
            json_output=json_output,
            json_schema=json_schema,
            on_token=on_token,
            cancel=cancel,
        )

    def prepare_images(self, frames: Sequence[np.ndarray]) -> int:
        """Run `frames` (RGB uint8, as ask() takes them) through the vision encoder in one batch
        and keep their embeddings in the embedding cache, so that the next ask() about each of
        them skips the encoder (Answer.image_cache_hit, vision_ms 0). For frames of several
        cameras that wait at once: one batched forward costs less than one forward per frame.

        Returns how many frames were encoded: frames already cached and repeats are skipped, and
        at most embedding_cache_size are encoded (more would evict each other before they are
        asked about). Raises InvalidInput, and encodes nothing, if any frame is one that ask()
        refuses."""
        if isinstance(frames, np.ndarray) and frames.ndim == 3:
            raise InvalidInput("prepare_images takes a list of frames, not one frame: pass [frame]")
        try:
            frames = list(frames)
        except TypeError:
            raise InvalidInput(f"frames must be a list of images, got {type(frames).__name__}") from None
        # Every frame is checked before any is encoded: a request fails as a whole.
        for frame in frames:
            check_frame(frame, self.config.max_image_pixels)
        if not frames:
            return 0
        with self._lock:
            return self._backend.prepare_images(frames)

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
        json: JsonRequest | None,
        control: GenerationControl | None = None,
    ) -> Answer:
        if max_new_tokens is None:
            max_new_tokens = self.config.max_new_tokens
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InvalidInput(f"max_new_tokens must be at least 1, got {max_new_tokens!r}")
        request = GenerationRequest(system_prompt, turns, max_new_tokens, json)
        with self._lock:
            try:
                answer = self._backend.generate(request, control)
            except Exception as error:
                if not _is_out_of_memory(error):
                    raise
                self._backend.release_cached_memory()
                raise OutOfMemory(
                    f"out of memory while answering ({str(error)[:200]}); the model stays loaded: "
                    "retry, or ask for fewer tokens"
                ) from error
        if json is not None:
            answer.json, answer.json_error = _json_result(answer)
        return answer

    def count_tokens(self, text: str) -> int:
        """Tokens `text` takes in a prompt, as typed (a control token typed counts as its text).
        Safe from any thread, also while an answer is generated."""
        return self._backend.count_tokens(text)

    def check_prompt(self, prompt: str, what: str = "prompt", allow_empty: bool = False) -> int:
        """Raise InvalidInput unless `prompt` fits max_prompt_tokens; returns its token count."""
        if not isinstance(prompt, str):
            raise InvalidInput(f"{what} must be text, got {type(prompt).__name__}")
        if not prompt.strip():
            if allow_empty:
                return 0
            raise InvalidInput(f"{what} is empty")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as error:  # a lone surrogate: no tokenizer takes it
            raise InvalidInput(f"{what} is not valid Unicode text (at character {error.start})") from None
        limit = self.config.max_prompt_tokens
        if len(prompt) > limit * MAX_CHARS_PER_TOKEN:
            raise InvalidInput(
                f"{what} is {len(prompt)} characters, far over max_prompt_tokens={limit} (not tokenized)"
            )
        tokens = self.count_tokens(prompt)
        if tokens > limit:
            raise InvalidInput(f"{what} is {tokens} tokens, over max_prompt_tokens={limit}")
        return tokens


class ChatSession:
    """A conversation: follow-up questions see the earlier turns. Only the tokens that are new
    since the last turn are prefilled; the backend's KV cache holds the rest.

    A cancelled answer stays in the history as the assistant's turn, cut where it stopped: the
    operator saw it, and the next question ("go on", "and the other one?") may refer to it.

    Not thread-safe: one caller asks at a time (stream() runs the answer on its own thread, and
    the session must not be used again until that stream has ended)."""

    def __init__(self, engine: VLMEngine, system_prompt: str = ""):
        self._engine = engine
        self.system_prompt = system_prompt
        self._history: tuple[Turn, ...] = ()

    @property
    def history(self) -> tuple[Turn, ...]:
        return self._history

    @property
    def image_count(self) -> int:
        return sum(turn.image is not None for turn in self._history)

    def ask(
        self,
        prompt: str,
        image: np.ndarray | None = None,
        *,
        max_new_tokens: int | None = None,
        json_output: bool = False,
        json_schema: dict[str, Any] | None = None,
        on_token: Callable[[str], None] | None = None,
        cancel: Cancel = None,
    ) -> Answer:
        """Answer `prompt` (about `image`, an RGB uint8 frame, when given).

        json_output / json_schema: the answer is one JSON object (any, or valid for the JSON
            Schema), guaranteed by constrained decoding; `Answer.json` holds it, or
            `Answer.json_error` says why not (the budget ran out first, or a cancel).
        on_token: called with each new piece of text as it is generated (pieces join to the
            answer's text).
        cancel: an Event, or a function returning True, checked before every token: the answer
            stops within one token with stop reason "cancelled"."""
        engine = self._engine
        engine.check_prompt(prompt)
        engine.check_prompt(self.system_prompt, "system prompt", allow_empty=True)
        if image is not None:
            check_frame(image, engine.config.max_image_pixels)
            if self.image_count and not engine.multiple_images:
                raise InvalidInput(
                    f"'{engine.model_name}' reads one image per conversation; reset the chat before another image"
                )
        json = JsonRequest(json_schema) if json_output or json_schema is not None else None
        text = prompt + json_instruction(json_schema) if json else prompt
        turns = self._history + (Turn("user", text, image),)
        control = GenerationControl(on_token=on_token, should_stop=_stop_check(cancel))
        answer = engine._answer(self.system_prompt, turns, max_new_tokens, json, control)
        self._history = turns + (Turn("assistant", answer.text),)
        return answer

    def stream(self, prompt: str, image: np.ndarray | None = None, **options) -> AnswerStream:
        """ask() as an iterator of text pieces: `for piece in chat.stream(...)`; the Answer is
        `.answer` once the iteration ended. Leaving the loop early (or `.cancel()`) cancels."""
        return AnswerStream(self, prompt, image, options)

    def reset(self) -> None:
        """Forget the conversation; the next question starts from the system prompt."""
        self._history = ()


class AnswerStream:
    """The pieces of one answer as an iterator. The answer is generated on a thread of its own
    (so the consumer's loop body never delays the model by more than the queue's slack); the
    consumer's thread iterates. An error of the answer is raised from the iteration."""

    def __init__(self, chat: ChatSession, prompt: str, image, options: dict):
        self._pieces: queue.Queue = queue.Queue()
        self._cancelled = threading.Event()
        self.answer: Answer | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(chat, prompt, image, options), name="nanovlm-stream", daemon=True
        )
        self._thread.start()

    def _run(self, chat: ChatSession, prompt: str, image, options: dict) -> None:
        try:
            self.answer = chat.ask(prompt, image, on_token=self._pieces.put, cancel=self._cancelled, **options)
        except BaseException as error:  # noqa: BLE001 - re-raised on the consumer's thread
            self._error = error
        finally:
            self._pieces.put(None)

    def __iter__(self) -> Iterator[str]:
        try:
            while (piece := self._pieces.get()) is not None:
                yield piece
        finally:
            self.cancel()  # a consumer that stops early stops the model too
            self._thread.join()
        if self._error is not None:
            raise self._error

    def cancel(self) -> None:
        self._cancelled.set()


def _stop_check(cancel: Cancel) -> Callable[[], bool] | None:
    if cancel is None:
        return None
    if isinstance(cancel, threading.Event):
        return cancel.is_set
    if callable(cancel):
        return cancel
    raise InvalidInput(f"cancel must be a threading.Event or a function, got {type(cancel).__name__}")


def _json_result(answer: Answer) -> tuple[str, str]:
    """(compact JSON, "") of a complete constrained answer, else ("", why there is none)."""
    import json

    if answer.stop_reason == "eos":
        # The grammar allowed nothing else: the text parses (a failure here is a bug, said so).
        try:
            value = json.loads(answer.text)
        except ValueError as error:
            return "", f"internal error: the constrained answer is not JSON ({error})"
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")), ""
    if answer.stop_reason == "cancelled":
        return "", "cancelled before the JSON was complete"
    limit = "max_new_tokens" if answer.stop_reason == "max_new_tokens" else "the context"
    return "", (
        f"the answer reached {limit} ({answer.generated_tokens} tokens) before its JSON was complete; "
        "raise max_new_tokens or ask for less"
    )


def _is_out_of_memory(error: BaseException) -> bool:
    """Host MemoryError, or torch's OutOfMemoryError (CUDA and others), without importing torch."""
    return isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError"
