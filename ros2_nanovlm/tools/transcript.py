"""The --transcript file of a chat run: every question with its image, answer and timings.

The file is a JSON list, rewritten after every turn (a temporary file, then a rename), so a
run that ends in an error, a Ctrl-C or a kill still leaves every turn it finished, and a reader
never sees half a file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..engine import Answer


def answer_entry(prompt: str, image: str | None, turn: int, answer: Answer, json_mode: bool) -> dict[str, Any]:
    """One turn as the transcript stores it. `image` is the file the question is about (the
    chat's latest image; None before any), `turn` counts the questions since the last reset."""
    timings = answer.timings
    entry: dict[str, Any] = {
        "prompt": prompt,
        "image": image,
        "turn": turn,
        "answer": answer.text,
        "stop_reason": answer.stop_reason,
        "timings_ms": {
            "vision": round(timings.vision_ms, 2),
            "prefill": round(timings.prefill_ms, 2),
            "decode": round(timings.decode_ms, 2),
            "total": round(timings.total_ms, 2),
        },
        "tokens": {
            "prompt": answer.prompt_tokens,
            "reused": answer.reused_tokens,
            "generated": answer.generated_tokens,
        },
    }
    if json_mode:
        entry["json"] = json.loads(answer.json) if answer.json else None
        entry["json_error"] = answer.json_error
    return entry


def error_entry(prompt: str, image: str | None, turn: int, error: str) -> dict[str, Any]:
    """A question the engine refused (context full, prompt too long, ...)."""
    return {"prompt": prompt, "image": image, "turn": turn, "answer": None, "error": error}


class Transcript:
    """Owns the turns of one run and the file they go to (None: kept in memory only). Used by
    the console's main thread only."""

    def __init__(self, path: Path | None):
        self.path = path
        self.turns: list[dict[str, Any]] = []

    def add(self, entry: dict[str, Any]) -> None:
        self.turns.append(entry)
        self.write()

    def write(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(self.turns, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(temporary, self.path)
