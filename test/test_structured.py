"""Schema-guaranteed JSON (engine/structured.py)."""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest

from ros2_nanovlm.engine.api import InvalidInput
from ros2_nanovlm.engine.structured import JsonGrammars, load_schema, validate_schema, vocabulary_bytes
from ros2_nanovlm.engine.tiny import byte_level_tokenizer

# The benchmark (bench/grammar_libraries.py) and the generation tests walk these too.
SCHEMAS = {
    "flat": {
        "type": "object",
        "properties": {
            "label": {"type": "string"},
            "confidence": {"type": "number"},
            "visible": {"type": "boolean"},
            "color": {"type": "string", "enum": ["red", "green", "blue", "other"]},
        },
        "required": ["label", "confidence", "visible", "color"],
        "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "location": {
                "type": "object",
                "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
                "required": ["lat", "lon"],
            },
            "tags": {"type": "array", "items": {"type": "string"}},
            "objects": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"label": {"type": "string"}, "count": {"type": "integer", "minimum": 0}},
                    "required": ["label", "count"],
                },
            },
        },
        "required": ["name", "location", "tags", "objects"],
    },
    # The seed's example: "extract any text from the image as json".
    "sign": {
        "type": "object",
        "properties": {"sign": {"type": "string"}, "exit": {"type": "string"}, "distance": {"type": "string"}},
        "required": ["sign", "exit", "distance"],
    },
}
ANY_OBJECT = {"type": "object"}
BUDGET = 256


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


@pytest.fixture(scope="module")
def grammars(tokenizer):
    return JsonGrammars(tokenizer, len(tokenizer), [tokenizer.eos_token_id])


def allowed(mask: np.ndarray, vocab_size: int) -> np.ndarray:
    return np.flatnonzero(np.unpackbits(mask.view(np.uint8), bitorder="little")[:vocab_size])


def walk(grammars, tokenizer, schema, seed, budget=BUDGET, prefer=None):
    """One answer chosen as the argmax of seeded random logits over the allowed tokens (`prefer`:
    ids whose logits get +3). Returns the text, whether the constraint finished, and the largest
    id any mask allowed."""
    rng = np.random.default_rng(seed)
    constraint = grammars.constraint(schema, budget)
    mask = np.empty(constraint.mask_words, dtype=np.int32)
    ids, highest = [], 0
    for tokens_left in range(budget, 0, -1):
        constraint.fill_mask(mask, tokens_left)
        choices = allowed(mask, grammars.vocab_size)
        highest = max(highest, int(choices.max()))
        logits = rng.standard_normal(grammars.vocab_size)
        if prefer is not None:
            logits[prefer] += 3.0
        token = int(choices[np.argmax(logits[choices])])
        assert token not in grammars.stop_ids, "a stop token before the object closed"
        constraint.accept(token)
        ids.append(token)
        if constraint.is_finished():
            break
    text = tokenizer.decode(ids)
    if constraint.is_finished():  # the tokenizer's own decoding and the module's bytes agree, as strict UTF-8
        assert b"".join(grammars.closing.token_bytes[t] for t in ids).decode("utf-8") == text
    return text, constraint.is_finished(), highest


def check_walks(grammars, tokenizer, schema, walks) -> int:
    """Every finished walk is JSON valid against `schema`; returns how many did not finish."""
    unfinished = 0
    for seed in range(walks):
        text, finished, highest = walk(grammars, tokenizer, schema, seed)
        assert highest < len(tokenizer), f"id {highest} is past the tokenizer"
        if not finished:
            unfinished += 1
            continue
        assert "\ufffd" not in text, text
        jsonschema.validate(json.loads(text), schema or ANY_OBJECT)
    return unfinished


@pytest.mark.parametrize("name", [*SCHEMAS, "any object"])
def test_random_walks_give_valid_json(grammars, tokenizer, name):
    unfinished = check_walks(grammars, tokenizer, SCHEMAS.get(name), walks=100)
    assert unfinished <= 5, f"{unfinished} of 100 answers ran out of budget"


@pytest.mark.parametrize("name", [*SCHEMAS, "any object"])
def test_padded_vocabulary_ids_are_never_allowed(tokenizer, name):
    padded = JsonGrammars(tokenizer, len(tokenizer) + 100, [tokenizer.eos_token_id])
    assert padded.mask_words == -(-(len(tokenizer) + 100) // 32)
    unfinished = check_walks(padded, tokenizer, SCHEMAS.get(name), walks=20)
    assert unfinished <= 1


def test_any_object_starts_with_a_brace(grammars, tokenizer):
    constraint = grammars.constraint(None, BUDGET)
    mask = np.empty(constraint.mask_words, dtype=np.int32)
    constraint.fill_mask(mask, BUDGET)
    assert allowed(mask, grammars.vocab_size).tolist() == [tokenizer.convert_tokens_to_ids("{")]


def test_accepting_a_disallowed_token_raises(grammars, tokenizer):
    constraint = grammars.constraint(SCHEMAS["sign"], BUDGET)
    mask = np.empty(constraint.mask_words, dtype=np.int32)
    constraint.fill_mask(mask, BUDGET)
    with pytest.raises(RuntimeError, match="not allowed"):
        constraint.accept(tokenizer.convert_tokens_to_ids("}"))
    constraint.accept(tokenizer.convert_tokens_to_ids("{"))  # the same constraint goes on
    with pytest.raises(RuntimeError, match="not allowed"):
        constraint.accept(tokenizer.convert_tokens_to_ids("x"))  # no mask filled: the grammar decides


def test_the_budget_closes_the_object_in_time(grammars, tokenizer):
    """A model that never closes its string (a quote never wins) still ends with valid JSON,
    on the budget's last tokens."""
    letters = tokenizer.convert_tokens_to_ids(list("abcdefgh"))
    for budget in (40, 41, 57, 100):
        text, finished, _ = walk(grammars, tokenizer, SCHEMAS["sign"], seed=budget, budget=budget, prefer=letters)
        assert finished
        value = json.loads(text)
        jsonschema.validate(value, SCHEMAS["sign"])
        assert len(text) > budget - 16, "the answer stopped long before its budget"


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object", "properties": {"code": {"type": "string", "pattern": "^(ab)+c$"}}, "required": ["code"]},
        {
            "type": "object",
            "properties": {"s": {"type": "string", "minLength": 20, "maxLength": 30}},
            "required": ["s"],
        },
        {
            "type": "object",
            "properties": {"xs": {"type": "array", "items": {"type": "integer", "minimum": 3}, "minItems": 3}},
        },
        {"type": "object", "properties": {"v": {"anyOf": [{"type": "string", "minLength": 5}, {"type": "null"}]}}},
        {
            "$defs": {
                "node": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "children": {"type": "array", "items": {"$ref": "#/$defs/node"}},
                    },
                    "required": ["name", "children"],
                }
            },
            "$ref": "#/$defs/node",
        },
    ],
)
def test_tight_budgets_close_what_the_schema_demands(grammars, tokenizer, schema):
    """Patterns, lengths, minimum items, alternatives, recursion: the closing path satisfies them."""
    shortest = len(grammars.compile(schema).start_path)
    for seed in range(5):
        text, finished, _ = walk(grammars, tokenizer, schema, seed, budget=shortest + 20)
        assert finished
        jsonschema.validate(json.loads(text), schema)


def test_a_budget_below_the_shortest_answer_is_invalid_input(grammars):
    with pytest.raises(InvalidInput, match=r"max_new_tokens 10 is too small.*takes 3[0-9] tokens"):
        grammars.constraint(SCHEMAS["sign"], 10)


def test_multi_byte_characters_stay_whole(grammars, tokenizer):
    """Characters of 2 to 4 bytes are several tokens each with this tokenizer; the walks favour
    their bytes, and the budget cuts the strings: every answer is still valid UTF-8 and JSON."""
    high_bytes = [t for t, text in enumerate(grammars.closing.token_bytes) if len(text) == 1 and text[0] >= 0x80]
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "pattern": "^[äöüß東京😀]+$"}, "note": {"type": "string"}},
        "required": ["city", "note"],
    }
    characters = set()
    for seed in range(10):
        text, finished, _ = walk(grammars, tokenizer, schema, seed, budget=60 + seed, prefer=high_bytes)
        assert finished and "\ufffd" not in text
        value = json.loads(text)
        jsonschema.validate(value, schema)
        characters.update(value["city"] + value["note"])
    assert max(len(c.encode()) for c in characters) == 4  # 😀 was written, byte by byte


def test_compiled_grammars_are_cached_by_content(tokenizer):
    grammars = JsonGrammars(tokenizer, len(tokenizer), [tokenizer.eos_token_id], cache_size=2)
    first = grammars.compile(SCHEMAS["sign"])
    reordered = json.loads(json.dumps(SCHEMAS["sign"]))
    reordered = {key: reordered[key] for key in reversed(list(reordered))}
    assert grammars.compile(reordered) is first
    assert grammars.cache_info()[:2] == (1, 1)  # hits, misses
    grammars.compile(None)
    grammars.compile(SCHEMAS["flat"])  # the third: the least recently used (sign) goes
    assert grammars.cache_info().currsize == 2
    assert grammars.compile(SCHEMAS["sign"]) is not first


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        (
            {"type": "object", "properties": {"a": {"type": "strin"}}},
            "json_schema is not a valid JSON Schema: 'strin' is not valid under any of the given schemas at /properties/a/type",
        ),
        ({"type": "object", "required": "a"}, "'a' is not of type 'array' at /required"),
        (["not", "an", "object"], "json_schema must be a JSON object, not list"),
        ({"type": "array", "uniqueItems": True}, "cannot be enforced: Unimplemented keys"),
        ({"type": "integer", "minimum": 5, "maximum": 3}, "cannot be enforced: Unsatisfiable schema"),
    ],
)
def test_invalid_schemas_name_the_problem(grammars, schema, message):
    with pytest.raises(InvalidInput, match=re.escape(message)):
        grammars.compile(schema)
    with pytest.raises(InvalidInput, match=re.escape(message)):
        load_schema(json.dumps(schema)) if isinstance(schema, dict) else validate_schema(schema)


def test_error_messages_cut_what_they_echo(grammars):
    with pytest.raises(InvalidInput) as raised:
        grammars.compile({"type": "x" * 5000})
    assert "xxxx" in str(raised.value) and len(str(raised.value)) < 300


def test_load_schema_reads_inline_json_and_files(tmp_path):
    assert load_schema("") is None and load_schema("  ") is None
    assert load_schema(json.dumps(SCHEMAS["sign"])) == SCHEMAS["sign"]
    path = tmp_path / "sign.json"
    path.write_text(json.dumps(SCHEMAS["sign"], indent=2))
    assert load_schema(str(path)) == SCHEMAS["sign"]
    path.write_text('{\n  "type": "object",\n  "properties": {,}\n}')
    with pytest.raises(
        InvalidInput, match=r"sign.json is not valid JSON: Expecting property name .* at line 3 column 18"
    ):
        load_schema(str(path))
    with pytest.raises(InvalidInput, match=r"json_schema is not valid JSON: .* at line 1 column 10"):
        load_schema('{"type": }')
    with pytest.raises(InvalidInput, match=r"json_schema file .*missing.json does not exist"):
        load_schema(str(tmp_path / "missing.json"))
    with pytest.raises(InvalidInput, match="cannot be read"):
        load_schema(str(tmp_path))  # a directory


def test_vocabulary_bytes_follow_the_decoder_chain(tokenizer):
    """SmolLM2's GGUF-converted tokenizer decodes through Sequence(ByteFallback, Fuse, Replace,
    ByteLevel): its tokens are byte-level ones all the same ('Ċ' is a newline, not a letter)."""
    from tokenizers import Regex, decoders

    gguf_like = byte_level_tokenizer()
    gguf_like.backend_tokenizer.decoder = decoders.Sequence(
        [decoders.ByteFallback(), decoders.Fuse(), decoders.Replace(Regex("\u2581"), " "), decoders.ByteLevel()]
    )
    for candidate in (tokenizer, gguf_like):
        token_bytes, special_ids = vocabulary_bytes(candidate)
        assert token_bytes[candidate.convert_tokens_to_ids("Ċ")] == b"\n"
        assert token_bytes[candidate.convert_tokens_to_ids("Ġ")] == b" "
        assert candidate.eos_token_id in special_ids
    newline = JsonGrammars(gguf_like, len(gguf_like), [gguf_like.eos_token_id])
    constraint = newline.constraint(None, BUDGET)
    mask = np.empty(constraint.mask_words, dtype=np.int32)
    for token in tokenizer.convert_tokens_to_ids(list('{"ab')):
        constraint.fill_mask(mask, BUDGET)
        constraint.accept(token)
    constraint.fill_mask(mask, BUDGET)
    assert gguf_like.convert_tokens_to_ids("Ċ") not in allowed(mask, newline.vocab_size)  # raw newline in a string
