"""The chat console's conversation: what each typed line does to one engine chat.

An image line loads the image and holds it for the next question (as NanoLLM's chat does); a
question is answered with the text streamed as it is generated and one line of timings after
it; commands reset the chat, switch JSON mode, show stats or quit. Every error the operator can
cause (a bad path, a second image for a one-image model, a full context) is printed and the
chat goes on.
"""

from __future__ import annotations

import re
import signal
import threading
import traceback
from pathlib import Path
from typing import Any, TextIO

from ..engine import Answer, EngineError, VLMEngine
from ..engine.frames import check_frame
from .chat_commands import Command, ImageLine, Question, help_text, parse_line
from .image_file import ImageError, read_image, resolve_image_path
from .transcript import Transcript, answer_entry, error_entry

# C0/C1 control characters (not tab or newline): a model's text must not drive the terminal
# (a random-weight model writes escape sequences; so may a real one asked to).
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    return CONTROL_CHARS.sub("\ufffd", text)


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def stats_line(answer: Answer) -> str:
    """One line of timings, e.g. [vision 12 ms | prefill 83 tokens 40 ms | decode 24 tokens 31.2 tok/s | eos]."""
    timings = answer.timings
    prefilled = answer.prompt_tokens - answer.reused_tokens
    reused = f" (+{answer.reused_tokens} reused)" if answer.reused_tokens else ""
    # decode_ms covers the tokens after the first (the first comes out of the prefill)
    steps = answer.generated_tokens - 1
    rate = f"{steps * 1000.0 / timings.decode_ms:.1f} tok/s" if steps > 0 and timings.decode_ms > 0 else "- tok/s"
    return (
        f"[vision {timings.vision_ms:.0f} ms | prefill {prefilled} tokens{reused} {timings.prefill_ms:.0f} ms"
        f" | decode {answer.generated_tokens} tokens {rate} | {answer.stop_reason}]"
    )


class ChatConsole:
    """Owns one chat with the engine and what the operator built up in it: the image waiting for
    its question, the path of the chat's latest image, JSON mode, the last answer, the
    transcript. handle() runs on the main thread: it installs the SIGINT handler that cancels an
    answer. Each answer is generated on a worker thread, whose on_token writes to `out`."""

    def __init__(
        self,
        engine: VLMEngine,
        out: TextIO,
        *,
        max_new_tokens: int | None = None,
        json_output: bool = False,
        json_schema: dict[str, Any] | None = None,
        data_roots: list[Path] | None = None,
        transcript: Transcript | None = None,
        system_prompt: str = "",
    ):
        self.engine = engine
        self.out = out
        self.max_new_tokens = max_new_tokens
        self.json_schema = json_schema
        self.json_mode = json_output or json_schema is not None
        self.data_roots = data_roots or []
        self.transcript = transcript or Transcript(None)
        self.chat = engine.chat(system_prompt)
        self.pending_image: tuple[str, Any] | None = None  # (path, RGB frame) for the next question
        self.image_path: str | None = None  # the chat's latest image: what questions are about
        self.questions = 0  # questions in this chat (since the last reset)
        self.last_answer: Answer | None = None
        self.failures = 0  # lines answered with an error message (a scripted run's exit status)
        self._line_open = False  # the streamed answer has not ended its line yet (worker thread writes it)

    def handle(self, line: str) -> bool:
        """Act on one line; False when the operator asked to quit."""
        parsed = parse_line(line)
        if isinstance(parsed, Command):
            return self._command(parsed)
        if isinstance(parsed, ImageLine):
            self._load_image(parsed.text)
        elif isinstance(parsed, Question):
            self._ask(parsed.text)
        return True

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def fail(self, message: str) -> None:
        self.failures += 1
        self.say(f"error: {message}")

    # -- commands ---------------------------------------------------------------------------

    def _command(self, command: Command) -> bool:
        if not command.known:
            self.fail(f"unknown command '/{command.name}': type /help for the commands")
        elif command.name == "quit":
            return False
        elif command.name == "help":
            self.say(help_text())
        elif command.name == "reset":
            self.reset()
            self.say("[chat reset: give an image or ask a question]")
        elif command.name == "image":
            if command.argument:
                self._load_image(command.argument)
            else:
                self.fail("/image needs a path: /image PATH")
        elif command.name == "json":
            self._switch_json(command.argument.lower())
        elif command.name == "stats":
            self._show_stats()
        return True

    def reset(self) -> None:
        self.chat.reset()
        self.pending_image = None
        self.image_path = None
        self.questions = 0

    def _switch_json(self, argument: str) -> None:
        if argument not in ("", "on", "off"):
            self.fail(f"/json takes on or off, not '{argument}'")
            return
        self.json_mode = (not self.json_mode) if argument == "" else argument == "on"
        kind = "JSON valid for the schema" if self.json_schema is not None else "one JSON object"
        self.say(f"[answers: {kind}]" if self.json_mode else "[answers: free text]")

    def _show_stats(self) -> None:
        engine = self.engine
        used = self.last_answer.prompt_tokens + self.last_answer.generated_tokens if self.last_answer else 0
        self.say(
            f"[model {engine.model_name} on {engine.device} | this chat: {plural(self.questions, 'question')}, "
            f"{plural(self.chat.image_count, 'image')}, {used} of {engine.config.max_context_tokens} context tokens]"
        )
        if self.last_answer is not None:
            self.say("last answer: " + stats_line(self.last_answer))

    # -- images -----------------------------------------------------------------------------

    def _load_image(self, text: str) -> None:
        try:
            path = resolve_image_path(text, self.data_roots)
            frame = check_frame(read_image(path), self.engine.config.max_image_pixels)
        except (ImageError, EngineError) as error:
            self.fail(str(error))
            return
        if self.chat.image_count and not self.engine.multiple_images:
            self.fail(f"this model ({self.engine.model_name}) reads one image per chat: type reset, then the new image")
            return
        replaced = f"; it replaces {Path(self.pending_image[0]).name}" if self.pending_image else ""
        self.pending_image = (str(path), frame)
        height, width = frame.shape[:2]
        self.say(f"[image {path.name} {width}x{height}: ask a question about it{replaced}]")

    # -- questions --------------------------------------------------------------------------

    def _ask(self, prompt: str) -> None:
        image_path, frame = self.pending_image if self.pending_image else (self.image_path, None)
        turn = self.questions + 1
        try:
            answer = self._generate(prompt, frame)
        except EngineError as error:
            self.fail(str(error))
            self.transcript.add(error_entry(prompt, image_path, turn, str(error)))
            return
        except Exception as error:  # noqa: BLE001 - a bug in one answer must not end the chat; the traceback says where
            traceback.print_exc()
            self.fail(f"internal error: {error!r}")
            self.transcript.add(error_entry(prompt, image_path, turn, repr(error)))
            return
        if frame is not None:  # the chat holds it now
            self.pending_image = None
            self.image_path = image_path
        self.questions = turn
        self.last_answer = answer
        self._report(answer)
        self.transcript.add(answer_entry(prompt, image_path, turn, answer, self.json_mode))

    def _generate(self, prompt: str, frame) -> Answer:
        """chat.ask on a worker thread, the text streamed to `out` as it comes; Ctrl-C (SIGINT,
        delivered to the main thread) cancels the answer, not the program."""
        cancel = threading.Event()
        done = threading.Event()
        result: dict[str, Any] = {}
        self._line_open = False

        def write_piece(piece: str) -> None:  # worker thread
            self.out.write(printable(piece))
            self.out.flush()
            self._line_open = not piece.endswith("\n")

        def run() -> None:  # worker thread
            try:
                result["answer"] = self.chat.ask(
                    prompt,
                    frame,
                    max_new_tokens=self.max_new_tokens,
                    json_output=self.json_mode and self.json_schema is None,
                    json_schema=self.json_schema if self.json_mode else None,
                    on_token=write_piece,
                    cancel=cancel,
                )
            except Exception as error:  # noqa: BLE001 - handed to the main thread, which reports it
                result["error"] = error
            finally:
                done.set()

        on_main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, lambda *_: cancel.set()) if on_main_thread else None
        try:
            threading.Thread(target=run, name="nanovlm-chat-answer", daemon=True).start()
            # The handler runs on this thread while it waits here (the wait is retried after it):
            # a Ctrl-C only sets `cancel`, and the worker stops within one token.
            done.wait()
        finally:
            if on_main_thread:
                signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
        if self._line_open:
            self.out.write("\n")
        if "error" in result:
            raise result["error"]
        return result["answer"]

    def _report(self, answer: Answer) -> None:
        if answer.stop_reason == "cancelled":
            self.say("[cancelled by Ctrl-C]")
        if self.json_mode and answer.json_error:
            self.say(f"[no JSON: {answer.json_error}]")
        self.say(stats_line(answer))
        if answer.stop_reason == "context_full":
            self.say("[the chat fills the model's context: type reset to start over]")
