"""What a line typed at the chat console is: a command, an image path or a question.

Commands start with a slash and one word (`/reset`, `/help`), which no question starts with
and no absolute path is (a path has a second slash or names an existing file). NanoLLM's plain
words `reset`, `clear`, `exit` and `quit` work too, alone on a line. Everything else that does
not name an image file is a question. Pure functions: any thread.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .image_file import looks_like_image_path, unquote

# name -> (argument help, what it does); the first name of each group is the one /help shows
COMMANDS = {
    "help": ("", "list the commands"),
    "reset": ("", "start a new chat (forget the images and questions so far); also: clear, reset"),
    "image": ("PATH", "load an image for the next question (a path ending in .jpg, .png, ... works without it)"),
    "json": ("[on|off]", "answer with one JSON object (with --json-schema: valid for the schema)"),
    "stats": ("", "the model, this chat's size and the last answer's timings"),
    "quit": ("", "leave (also: exit, quit, Ctrl-D)"),
}
ALIASES = {"clear": "reset", "exit": "quit"}
# NanoLLM's chat takes these words alone on a line as commands.
PLAIN_WORDS = {"reset": "reset", "clear": "reset", "exit": "quit", "quit": "quit"}
COMMAND_RE = re.compile(r"/([A-Za-z][A-Za-z_-]*)(?:\s+(.*))?$")


@dataclass(frozen=True)
class Command:
    name: str  # a key of COMMANDS, or an unknown name as typed
    argument: str = ""

    @property
    def known(self) -> bool:
        return self.name in COMMANDS


@dataclass(frozen=True)
class ImageLine:
    text: str  # the path as typed (resolved later: --data-dir, ~)


@dataclass(frozen=True)
class Question:
    text: str


def parse_line(line: str) -> Command | ImageLine | Question | None:
    """What `line` asks for; None for a blank line."""
    text = line.strip()
    if not text:
        return None
    word = text.lower()
    if word in PLAIN_WORDS:
        return Command(PLAIN_WORDS[word])
    match = COMMAND_RE.match(text)
    if match:
        name = match.group(1).lower()
        name = ALIASES.get(name, name)
        # "/tmp" or "/photo" typed as a path that exists is a path, unless it is a command's name
        if name in COMMANDS or not Path(unquote(text)).exists():
            return Command(name, (match.group(2) or "").strip())
    if looks_like_image_path(text):
        return ImageLine(text)
    return Question(text)


def help_text() -> str:
    lines = ["Type a question, or the path of an image to ask about. Commands:"]
    for name, (argument, meaning) in COMMANDS.items():
        lines.append(f"  /{name} {argument}".ljust(20) + meaning)
    lines.append("Ctrl-C cancels an answer while it is written; at the prompt it clears the line.")
    return "\n".join(lines)
