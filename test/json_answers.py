"""The JSON-validity check shared by test/test_json_answers.py (a sample, in CI) and
bench/json_validity.py (100 prompts x 3 schemas, results committed)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import jsonschema
from test_structured import SCHEMAS

BUDGET = 256
QUESTIONS = [
    "Extract any text from the image as JSON.",
    "What is in the image?",
    "Describe the main object.",
    "Is there an animal in the image?",
    "What colour is the largest object?",
    "List what you see.",
    "Is the path clear?",
    "What kind of place is this?",
    "Read the sign.",
    "Is it safe for the robot to drive here?",
    "How many objects are there?",
    "Where is the nearest person?",
]


def photos() -> dict:
    from ros2_nanovlm.resources import load_photo  # no ROS: this runs on GPU machines too

    directory = Path(__file__).resolve().parent.parent / "data" / "images"
    return {path.stem: load_photo(path, 320) for path in sorted(directory.glob("*.jpg"))}


def prompts(frames: dict, count: int) -> list:
    """`count` distinct (question, photo) pairs, the photos varying fastest."""
    pairs = itertools.product(QUESTIONS, sorted(frames))
    return [(question, frames[name]) for question, name in itertools.islice(pairs, count)]


def check_json_answers(engine, frames: dict, count: int) -> dict:
    """Ask `count` prompts with each schema; assert every answer is valid JSON for its schema or
    an explicit budget error. Returns per schema: valid, budget_errors, lengths."""
    results = {}
    for name, schema in SCHEMAS.items():
        valid, budget_errors, lengths = 0, 0, []
        for question, frame in prompts(frames, count):
            answer = engine.ask(question, frame, json_schema=schema, max_new_tokens=BUDGET)
            lengths.append(answer.generated_tokens)
            if answer.json_error:
                assert answer.json == "" and "max_new_tokens" in answer.json_error, answer.json_error
                assert answer.stop_reason == "max_new_tokens"
                budget_errors += 1
                continue
            value = json.loads(answer.json)
            jsonschema.validate(value, schema)
            assert json.loads(answer.text) == value  # the answer is the JSON, nothing around it
            valid += 1
        assert valid + budget_errors == count
        results[name] = {"valid": valid, "budget_errors": budget_errors, "lengths": lengths}
    return results
