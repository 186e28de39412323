"""JSON mode: ask the model for JSON, then take the first JSON object out of its answer.

This is best effort: the model may not comply. Schema-constrained decoding, which guarantees
valid JSON, belongs in the generation loop of a backend and will replace the instruction.
"""

from __future__ import annotations

import json

JSON_INSTRUCTION = "Answer with a single JSON object and nothing else."


def with_json_instruction(prompt: str) -> str:
    return f"{prompt}\n{JSON_INSTRUCTION}"


def extract_json_object(text: str) -> tuple[str, str]:
    """Return (compact JSON of the first object in `text`, "") or ("", why there is none)."""
    decoder = json.JSONDecoder()
    start = text.find("{")
    if start < 0:
        return "", "the answer holds no JSON object (no '{')"
    first_error = ""
    while start >= 0:
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError as error:
            first_error = first_error or f"{error.msg} at character {error.pos}"
        else:
            if isinstance(value, dict):
                return json.dumps(value, ensure_ascii=False, separators=(",", ":")), ""
        start = text.find("{", start + 1)
    return "", f"the answer holds no valid JSON object ({first_error})"
