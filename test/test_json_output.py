from ros2_nanovlm.engine.json_output import MAX_SCHEMA_CHARS_IN_PROMPT, json_instruction


def test_any_object_asks_for_one_json_object():
    assert json_instruction(None) == "\nAnswer with a single JSON object and nothing else."


def test_a_schema_is_shown_compact_and_a_long_one_by_its_keys():
    schema = {"type": "object", "properties": {"sign": {"type": "string"}}}
    assert '{"type":"object","properties":{"sign":{"type":"string"}}}' in json_instruction(schema)
    long_schema = {
        "type": "object",
        "properties": {f"field_{i}": {"type": "string", "description": "x" * 40} for i in range(20)},
    }
    text = json_instruction(long_schema)
    assert len(text) < MAX_SCHEMA_CHARS_IN_PROMPT and "field_0, field_1" in text
