"""What JSON mode tells the model. The grammar (structured.py) guarantees the form of the answer;
this instruction makes the model expect it, so what it writes inside the form is sensible: a
model that was not told to answer in JSON spends its tokens fighting the mask."""

from __future__ import annotations

import json
from typing import Any

# Schemas longer than this are not repeated to the model (they still constrain the answer).
MAX_SCHEMA_CHARS_IN_PROMPT = 600


def json_instruction(schema: dict[str, Any] | None) -> str:
    """The text appended to the question in JSON mode."""
    if schema is None:
        return "\nAnswer with a single JSON object and nothing else."
    compact = json.dumps(schema, ensure_ascii=False, separators=(",", ":"))
    if len(compact) > MAX_SCHEMA_CHARS_IN_PROMPT:
        keys = ", ".join(schema.get("properties", {}))
        return f"\nAnswer with a single JSON object with the keys {keys} and nothing else."
    return f"\nAnswer with a single JSON object that follows this JSON Schema, and nothing else: {compact}"
