"""Schema-guaranteed JSON through the engine, with a tiny random model and with the demo VLM:
every answer parses and validates against its schema, or is an explicit budget error; budget
errors at most 5%. A sample here (a random model writes up to 256 tokens an answer, ~10 ms each
on a CI core); bench/json_validity.py runs the full 100 prompts x 3 schemas."""

from __future__ import annotations

import json

import pytest
from json_answers import BUDGET, check_json_answers

from ros2_nanovlm.engine import EngineConfig, InvalidInput, VLMEngine

MAX_BUDGET_ERRORS = 0.05


@pytest.mark.parametrize("model, count", [("tiny_llava", 8), ("demo_model", 8)])
def test_json_answers_are_valid_for_their_schema_or_a_budget_error(model, count, request, photos):
    engine = VLMEngine.load(EngineConfig(model_path=str(request.getfixturevalue(model)), device="cpu"))
    for name, figures in check_json_answers(engine, photos, count).items():
        assert figures["budget_errors"] <= MAX_BUDGET_ERRORS * count, f"{name}: {figures}"


def test_any_object_mode_and_an_invalid_schema(tiny_llava, photos):
    engine = VLMEngine.load(EngineConfig(model_path=str(tiny_llava), device="cpu"))
    answer = engine.ask("What is in the image?", photos["dogs"], json_output=True, max_new_tokens=BUDGET)
    assert isinstance(json.loads(answer.json), dict)
    with pytest.raises(InvalidInput, match="strng"):
        engine.ask("What is in the image?", photos["dogs"], json_schema={"type": "strng"})
    # The engine goes on: the next answer is plain text again.
    assert engine.ask("What is in the image?", photos["dogs"], max_new_tokens=4).json == ""
