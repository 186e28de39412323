"""nanovlm-chat: a chat console on the engine (no ROS), after NanoLLM's `nano_llm.chat`.

    nanovlm-chat                                   the embedded default model, interactive
    nanovlm-chat --model /models/llava-1.5-7b-hf --max-new-tokens 256
    nanovlm-chat --prompt data/images/dogs.jpg --prompt "What breed is it?"
    nanovlm-chat --prompt ../shared/data/prompts/images.json --data-dir ../shared/data --transcript out.json

At `>> PROMPT:` type the path of an image, then questions about it; /help lists the commands.
With --prompt (or lines piped to stdin) the lines run in order and the program exits: with
status 1 when a line got an error, 0 otherwise. Status 2: bad arguments or a model that cannot
be loaded.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..engine import EngineConfig, EngineError, InvalidInput, VLMEngine
from ..engine.config import nanovlm_home
from .chat_console import ChatConsole
from .prompt_sequence import PromptFileError, expand_prompts
from .transcript import Transcript

PROMPT = ">> PROMPT: "
BAD_USAGE = 2
INTERRUPTED = 130  # the shell's status for a program ended by SIGINT


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="nanovlm-chat",
        description="Chat with a vision-language model: type an image path, then questions about it.",
    )
    parser.add_argument("--model", default="", help="local LLaVA-1.5/1.6 directory (default: the embedded demo model)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    parser.add_argument("--max-new-tokens", type=positive_int, default=128, help="longest answer in tokens")
    parser.add_argument(
        "--max-context-len", type=positive_int, default=2048, help="KV cache size: images + chat + answer, in tokens"
    )
    parser.add_argument("--system-prompt", default="", help="system prompt of every chat")
    parser.add_argument(
        "--prompt",
        action="append",
        default=[],
        metavar="LINE|FILE",
        help="run this line (or the lines of a .json list or .txt file) as if typed, then exit; repeatable",
    )
    parser.add_argument("--data-dir", type=Path, help="where /data/... image paths of a prompt sequence point to")
    parser.add_argument("--json", action="store_true", help="answer with one JSON object (constrained decoding)")
    parser.add_argument("--json-schema", metavar="FILE", help="answer with JSON valid for this JSON Schema file")
    parser.add_argument("--transcript", type=Path, metavar="OUT.json", help="write every turn to this JSON file")
    parser.add_argument("--verbose", action="store_true", help="keep the model loader's progress bars and warnings")
    return parser.parse_args(argv)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):
        # A model's text may hold characters the terminal's encoding lacks: replace, never crash.
        sys.stdout.reconfigure(errors="replace")
    try:
        lines, json_schema, transcript = check_arguments(args)
    except (PromptFileError, EngineError) as error:
        print(f"nanovlm-chat: {error}", file=sys.stderr)
        return BAD_USAGE
    try:
        engine, description = load_engine(args)
    except KeyboardInterrupt:
        return INTERRUPTED
    except (EngineError, ValueError) as error:
        print(f"nanovlm-chat: cannot load the model: {error}", file=sys.stderr)
        return BAD_USAGE

    from ..resources import package_file

    # /data/... paths: under --data-dir first, then the repository's own data/ (the same photos)
    data_roots = [args.data_dir] if args.data_dir is not None else []
    data_roots.append(package_file("data"))
    console = ChatConsole(
        engine,
        sys.stdout,
        max_new_tokens=args.max_new_tokens,
        json_output=args.json,
        json_schema=json_schema,
        data_roots=data_roots,
        transcript=transcript,
        system_prompt=args.system_prompt,
    )
    images = "several images per chat" if engine.multiple_images else "one image per chat"
    console.say(f"nanovlm-chat: {engine.model_name} on {engine.device} ({images}){description}")
    if lines or not sys.stdin.isatty():
        return run_script(console, lines if lines else (line.rstrip("\n") for line in sys.stdin))
    console.say("Type an image path, then questions about it; /help lists the commands, Ctrl-D leaves.")
    return run_interactive(console)


def check_arguments(args: argparse.Namespace) -> tuple[list[str], dict | None, Transcript]:
    """The lines of --prompt, the --json-schema and the transcript, before the model loads (which
    takes seconds): a mistyped argument fails at once."""
    lines = expand_prompts(args.prompt)
    json_schema = load_json_schema(args.json_schema)
    if args.data_dir is not None and not args.data_dir.is_dir():
        raise InvalidInput(f"--data-dir '{args.data_dir}' is not a directory")
    transcript = Transcript(args.transcript)
    try:
        transcript.write()  # an unwritable path fails now, not after the first answer
    except OSError as error:
        raise InvalidInput(f"cannot write the transcript '{args.transcript}': {error.strerror or error}") from error
    return lines, json_schema, transcript


def load_json_schema(path: str | None):
    if not path:
        return None
    from ..engine.structured import load_schema

    return load_schema(path)


def load_engine(args: argparse.Namespace) -> tuple[VLMEngine, str]:
    """The engine of --model, or of the embedded default model (built on first use), with a
    line describing the default model ("" for a model the operator chose)."""
    if not args.verbose:
        # The loader's progress bars and tokenizer notices would bury the chat.
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    description = ""
    model_path = args.model
    if not model_path:
        from ..default_model import DEFAULT_MODEL_DESCRIPTION, default_model_path, ensure_default_model

        if not (default_model_path() / "nanovlm_vlm.json").is_file():
            print("Building the embedded default model (once, about 20 s)...", file=sys.stderr, flush=True)
        try:
            model_path = str(ensure_default_model())
        except Exception as error:  # any build failure means the same to the operator
            raise EngineError(f"the embedded default model could not be built: {error}") from error
        description = f"\n{DEFAULT_MODEL_DESCRIPTION}"
    config = EngineConfig(
        model_path=model_path,
        device=args.device,
        max_new_tokens=args.max_new_tokens,
        max_context_tokens=args.max_context_len,
    )
    return VLMEngine.load(config), description


def run_script(console: ChatConsole, lines: Iterable[str]) -> int:
    """Lines from --prompt or a pipe, each echoed after the prompt as if typed."""
    try:
        for line in lines:
            console.say(PROMPT + line)
            if not console.handle(line):
                break
    except KeyboardInterrupt:  # Ctrl-C between answers ends a script (during one it cancels the answer)
        console.say("[interrupted]")
        return INTERRUPTED
    return 1 if console.failures else 0


def run_interactive(console: ChatConsole) -> int:
    for line in prompt_lines():
        try:
            if not console.handle(line):
                break
        except KeyboardInterrupt:  # while an image loads: drop it, as a shell drops a command
            console.say("[interrupted]")
    return 0


def prompt_lines() -> Iterator[str]:
    """Lines typed at `>> PROMPT:` with line editing and history (prompt_toolkit). Ctrl-C
    clears the line, as shells do; Ctrl-D ends."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory, History, InMemoryHistory

    history: History
    try:
        home = nanovlm_home()
        home.mkdir(parents=True, exist_ok=True)
        history = FileHistory(str(home / "chat_history"))
    except OSError:  # a read-only home: history for this run only
        history = InMemoryHistory()
    session: PromptSession[str] = PromptSession(history=history)
    while True:
        try:
            yield session.prompt(PROMPT)
        except KeyboardInterrupt:  # noqa: PERF203 - once per typed line, not a hot loop
            continue
        except EOFError:
            return


if __name__ == "__main__":
    sys.exit(main())
