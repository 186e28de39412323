"""The lines a non-interactive chat runs: `--prompt` values, each a line or a file of lines.

    --prompt "What is this?"          one line
    --prompt seq.json                 a JSON list of strings (NanoLLM's prompts/images.json)
    --prompt seq.txt                  one line per line; blank lines and lines starting with # skipped

Each line is handled as if typed at the prompt: image paths, questions, `reset`, commands.
Pure functions: any thread.
"""

from __future__ import annotations

import json
from pathlib import Path

SEQUENCE_SUFFIXES = (".json", ".txt")


class PromptFileError(ValueError):
    """A --prompt file that is missing or not in the expected form; the message says which."""


def expand_prompts(values: list[str]) -> list[str]:
    """The lines of all --prompt values, in order."""
    lines: list[str] = []
    for value in values:
        if value.lower().endswith(SEQUENCE_SUFFIXES):
            lines.extend(read_prompt_file(Path(value).expanduser()))
        else:
            lines.append(value)
    return lines


def read_prompt_file(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise PromptFileError(f"cannot read prompt file '{path}': {error.strerror or error}") from error
    except UnicodeDecodeError as error:
        raise PromptFileError(f"prompt file '{path}' is not UTF-8 text: {error}") from error
    if path.suffix.lower() == ".txt":
        return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    try:
        entries = json.loads(text)
    except ValueError as error:
        raise PromptFileError(f"prompt file '{path}' is not valid JSON: {error}") from error
    if not isinstance(entries, list) or not all(isinstance(entry, str) for entry in entries):
        raise PromptFileError(f"prompt file '{path}' must hold a JSON list of strings (image paths, questions, reset)")
    return entries
