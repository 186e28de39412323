from ros2_nanovlm.engine.json_output import extract_json_object, with_json_instruction


def test_first_object_is_taken_and_compacted():
    text = 'Sure! {"objects": ["dog", "ball"], "count": 2} and {"other": 1}'
    assert extract_json_object(text) == ('{"objects":["dog","ball"],"count":2}', "")


def test_a_broken_brace_before_the_object_is_skipped():
    assert extract_json_object('{oops {"a": 1}')[0] == '{"a":1}'


def test_no_object_says_why():
    assert extract_json_object("a dog")[1] == "the answer holds no JSON object (no '{')"
    json_text, why = extract_json_object('{"a": ')
    assert json_text == "" and "no valid JSON object" in why


def test_arrays_are_not_objects():
    assert extract_json_object('[{"a": 1}]')[0] == '{"a":1}'


def test_instruction_is_appended():
    assert with_json_instruction("What is here?").startswith("What is here?\n")
