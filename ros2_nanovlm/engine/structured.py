"""Schema-guaranteed JSON: the token mask that keeps an answer one JSON value, valid against a JSON
Schema (or any JSON object when there is no schema), and that closes the value before the token
budget runs out.

    grammars = JsonGrammars(tokenizer, vocab_size, stop_token_ids)   # once per loaded model
    constraint = grammars.constraint(schema, max_new_tokens)         # once per answer
    constraint.fill_mask(mask, tokens_left); ...; constraint.accept(token); constraint.is_finished()

The grammar library: llguidance 1.9.1, not xgrammar 0.2.9. Both ran the same walks behind the
seam below (`_Library`: compile a schema, fill a mask, accept, fork): bench/grammar_libraries.py,
figures in bench/results/grammar-libraries.json (this 2-core CPU; 3 schemas + any object; 20
walks of up to 256 uniformly random allowed tokens per schema and tokenizer):
- Correctness: xgrammar let 18 of 80 walks on the byte-level tokenizer write invalid UTF-8 (a
  UTF-8-encoded surrogate, ED B3 96, inside a string); llguidance's strings exclude those. Every
  llguidance walk (240) gave JSON that jsonschema accepts.
- Cold compile, per new schema (schemas come with requests): llguidance 0.7-2.0 ms on every
  tokenizer; xgrammar 2-9 ms on 261 tokens but 104 ms (sign) and 232 ms (nested) on the 32000
  one, 165 ms and 334 ms on SmolLM2. Cached: our LRU, 30-105 µs for either.
- Mask fill per token, mean / p95 µs: 261 tokens: llguidance 9 / 26, xgrammar 4 / 6; 32000:
  10 / 23 and 4 / 8; SmolLM2 (49153): 10 / 20 and 13 / 22. All well under 1% of a decode step.
- Weight: llguidance is one 3.1 MB wheel, llguidance-1.9.1-cp39-abi3-manylinux_2_31_x86_64.whl
  (the same file for Python 3.10-3.12), with no dependencies. xgrammar is a per-Python wheel
  (1.3 MB) plus apache-tvm-ffi (3.3 MB) and pydantic, and requires torch, transformers and triton.
- Both take minLength/maxLength, patterns, enums, $ref, anyOf; llguidance names what it cannot do
  ("Unimplemented keys: [\"uniqueItems\"]", "Unknown format: foo"), which becomes the
  InvalidInput message. Both are maintained (llguidance runs in vLLM, SGLang and llama.cpp).
Two llguidance traps, avoided here: a multi-byte key separator (": ") can make its mask allow a
token its matcher then rejects (issue #366, open), so the JSON is compact ("," and ":", fewer
tokens too); and its own reading of a transformers tokenizer misreads SmolLM2's (see
vocabulary_bytes), so it is given each token's bytes.

The budget. A JSON answer cut off by max_new_tokens is invalid, and the loop reports it as an
error, never as JSON. To make that rare without changing what is valid, the constraint keeps an
estimate of the tokens still needed to finish: it walks a copy of the matcher with a closing
policy (forced text first, then a token that closes the open string or structure, then a comma,
then the shortest value: 0, "", {}, ...). While the answer's budget is comfortably larger, the
model chooses freely; once the budget left minus that cost falls to CLOSE_MARGIN, the mask allows
only the closing path's next token, so the value ends on time (a string is cut short, the
remaining required fields get their shortest values). The estimate is refreshed when the model
leaves the path, at budget points halfway to the margin: about 9 closing walks of 0.2-1.7 ms in
an answer that runs into its budget (bench figures), none before the halfway point. The margin
absorbs what one free token can add (an object with required keys). No answer ran out in the
bench's 240 llguidance walks nor in the tests' 480. Strings get no default maxLength: outputs stay
exactly what the user's schema allows, and a string that runs on is cut by the same mechanism. No
whitespace between tokens (a model could spend its budget on blanks). A schema the policy cannot
finish (no end within MAX_CLOSING_TOKENS) still constrains answers, without the budget guard.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict, namedtuple
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .api import InvalidInput

MAX_ECHO_CHARS = 200  # error messages quote user input up to this length
# Tokens of slack (budget left minus the closing cost) at which the closing path is forced. One free
# token can raise the cost by the size of what it opens, so this is a guard, not a lower bound.
CLOSE_MARGIN = 12
MAX_CLOSING_TOKENS = 4096  # the closing walk gives up beyond this (a schema no budget could satisfy)
ANY_OBJECT = {"type": "object"}
# Compact JSON and no free whitespace (see the module docstring: budget, llguidance issue #366).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}

CacheInfo = namedtuple("CacheInfo", "hits misses maxsize currsize")


def _cut(text: str) -> str:
    return text if len(text) <= MAX_ECHO_CHARS else text[: MAX_ECHO_CHARS - 3] + "..."


def validate_schema(schema: Any) -> dict:
    """`schema` itself when it is a JSON Schema the grammar can enforce, else InvalidInput naming
    the problem. Checks the meta-schema (jsonschema) first: its messages point at the field."""
    import jsonschema
    from jsonschema.validators import validator_for

    if not isinstance(schema, dict):
        raise InvalidInput(f"json_schema must be a JSON object, not {type(schema).__name__}")
    try:
        validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as error:
        where = "/" + "/".join(str(part) for part in error.path) if error.path else "the top level"
        raise InvalidInput(f"json_schema is not a valid JSON Schema: {_cut(error.message)} at {_cut(where)}") from None
    problem = _Llguidance.check(schema)
    if problem:
        raise InvalidInput(f"json_schema cannot be enforced: {_cut(problem)}")
    return schema


def load_schema(value: str) -> dict | None:
    """The schema a parameter, service field or console option names: "" = none (any JSON object),
    text starting with "{" = the schema inline, anything else = the path of a JSON file."""
    text = value.strip()
    if not text:
        return None
    source = "json_schema"
    if not text.startswith("{"):
        source = f"json_schema file {_cut(text)}"
        try:
            text = Path(text).expanduser().read_text(encoding="utf-8")
        except FileNotFoundError:
            raise InvalidInput(f"{source} does not exist") from None
        # ValueError: a NUL in the path, or not UTF-8; RuntimeError: "~user" with no such home
        except (OSError, ValueError, RuntimeError) as error:
            raise InvalidInput(f"{source} cannot be read: {_cut(str(error))}") from None
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as error:
        raise InvalidInput(
            f"{source} is not valid JSON: {error.msg} at line {error.lineno} column {error.colno}"
        ) from None
    return validate_schema(schema)


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the character that stands for each byte in a token."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    alphabet = {chr(b): b for b in printable}
    alphabet.update({chr(256 + n): b for n, b in enumerate(others)})
    return alphabet


def vocabulary_bytes(tokenizer) -> tuple[list[bytes], list[int]]:
    """The bytes each token id writes (special tokens: their name) and the special token ids, for
    a transformers fast tokenizer. Read from the tokenizer's decoder chain, not left to the grammar
    library: llguidance 1.9.1 takes SmolLM2's GGUF-converted tokenizer (a Sequence decoder that
    ends in ByteLevel) for a SentencePiece one, and would then allow "Ċ" as a letter where the
    text gets a raw newline (invalid JSON)."""
    decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
    kinds = {part.get("type") for part in decoder.get("decoders", [decoder])}
    alphabet = _byte_level_alphabet() if "ByteLevel" in kinds else {}
    added = tokenizer.added_tokens_decoder
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    tokens = []
    for token, piece in enumerate(pieces):
        piece = piece or ""  # an id the vocabulary skips
        if token in added:
            tokens.append(added[token].content.encode())
        elif alphabet and all(char in alphabet for char in piece):
            tokens.append(bytes(alphabet[char] for char in piece))
        elif "ByteFallback" in kinds and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
            tokens.append(bytes([int(piece[3:5], 16)]))
        else:  # SentencePiece pieces mark a space with U+2581
            tokens.append(piece.replace("\u2581", " ").encode())
    return tokens, sorted(token for token, info in added.items() if info.special)


class _Matcher(Protocol):
    """One parse of one answer, in a grammar library (the seam: the benchmark plugs xgrammar here)."""

    def fill(self, words: np.ndarray) -> None: ...  # the mask, over the library's vocabulary
    def accept(self, token: int) -> bool: ...
    def allows(self, token: int) -> bool: ...  # without accepting it
    def forced_tokens(self) -> list[int]: ...  # tokens the grammar leaves no choice about
    def fork(self) -> _Matcher: ...
    def is_finished(self) -> bool: ...  # nothing but a stop token may follow
    def is_accepting(self) -> bool: ...  # a stop token may follow
    def error(self) -> str: ...


class _Library(Protocol):
    """A grammar library with one vocabulary: constructed as
    (tokenizer, token_bytes, special_ids, stop_ids); its masks have one bit per entry of token_bytes."""

    name: str

    def compile(self, schema: dict) -> _Matcher: ...  # a matcher at the start; ValueError if refused


class _LlgMatcher:
    """llguidance's LLMatcher behind the seam. Advanced only by the thread of its answer (a
    grammar's start matcher is never advanced, only forked)."""

    def __init__(self, matcher):
        self._m = matcher

    def fill(self, words: np.ndarray) -> None:
        self._m.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)

    def accept(self, token: int) -> bool:
        return self._m.consume_token(token)

    def allows(self, token: int) -> bool:
        return self._m.validate_tokens([token]) == 1

    def forced_tokens(self) -> list[int]:
        return self._m.compute_ff_tokens()

    def fork(self) -> _LlgMatcher:
        return _LlgMatcher(self._m.deep_copy())  # shares the compiled grammar: microseconds

    def is_finished(self) -> bool:
        return self._m.is_stopped()

    def is_accepting(self) -> bool:
        return self._m.is_accepting()

    def error(self) -> str:
        return self._m.get_error()


class _LlgVocabulary:
    """What llguidance.TokenizerWrapper reads: the token bytes, and an encoder for forced text."""

    def __init__(self, tokenizer, token_bytes: list[bytes], special_ids: list[int], eos: int):
        self.tokens, self.special_token_ids = token_bytes, special_ids
        self.eos_token_id, self.bos_token_id = eos, None
        # The Rust tokenizer itself: llguidance calls this while it computes masks (to tokenize
        # forced text), and transformers' encode() costs ten times more.
        self._backend = tokenizer.backend_tokenizer

    def __call__(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError("text only")  # tells the wrapper to pass str
        return self._backend.encode(text, add_special_tokens=False).ids


class _Llguidance:
    """llguidance with one vocabulary: turns schemas into matchers. Owned by a JsonGrammars, whose
    lock serialises compile()."""

    name = "llguidance"

    def __init__(self, tokenizer, token_bytes: list[bytes], special_ids: list[int], stop_ids: list[int]):
        import llguidance

        eos = stop_ids[0] if stop_ids else tokenizer.eos_token_id
        wrapper = llguidance.TokenizerWrapper(_LlgVocabulary(tokenizer, token_bytes, special_ids, eos))
        self._tokenizer = llguidance.LLTokenizer(wrapper, eos_token=stop_ids or None)

    @staticmethod
    def grammar(schema: dict) -> str:
        import llguidance

        return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)

    @staticmethod
    def check(schema: dict) -> str:
        """What llguidance cannot do with `schema` ("" when it can): no tokenizer needed."""
        import llguidance

        return llguidance.LLMatcher.validate_grammar(_Llguidance.grammar(schema))

    def compile(self, schema: dict) -> _LlgMatcher:
        import llguidance

        matcher = llguidance.LLMatcher(self._tokenizer, self.grammar(schema), log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return _LlgMatcher(matcher)


OUTSIDE, IN_STRING, ESCAPED = 0, 1, 2  # where a JSON text is, for its next byte


def string_state(state: int, text: bytes) -> int:
    """Where the JSON text is after `text` follows: outside strings, in one, or after a backslash in
    one. (With no whitespace in the grammar, quotes alone decide it.)"""
    for byte in text:
        if state == ESCAPED:
            state = IN_STRING
        elif byte == 0x22:  # "
            state = OUTSIDE if state == IN_STRING else IN_STRING
        elif byte == 0x5C and state == IN_STRING:  # backslash
            state = ESCAPED
    return state


class ClosingPolicy:
    """How an answer ends when its budget runs out: the token choices that finish the JSON value
    soonest. In a string: a quote, best followed by brackets (`"}`); outside: brackets, then an
    empty string, a comma, the shortest values (0, {}, ...); forced text before all of those; the
    first that the grammar allows wins. Built once per tokenizer; read-only, so any thread."""

    def __init__(self, token_bytes: Sequence[bytes], stop_ids: Sequence[int], library_words: int):
        self.token_bytes = token_bytes
        self.library_words = library_words
        self.stop_ids = list(stop_ids)
        by_text: dict[bytes, int] = {}
        for token, text in enumerate(token_bytes):
            by_text.setdefault(text, token)

        def longest_first(pattern: bytes) -> list[int]:
            found = [(-len(text), token) for text, token in by_text.items() if text and re.fullmatch(pattern, text)]
            return [token for _, token in sorted(found)]

        values = [b'""', b"0", b"{}", b"[]", b"null", b"false", b"true"] + [b"%d" % d for d in range(1, 10)]
        values = [by_text[text] for text in values + [b'"', b"{", b"["] if text in by_text]
        self.outside = longest_first(rb"[}\]]+") + longest_first(rb"[}\]]*,") + values
        self.in_string = longest_first(rb'"[}\]]*') + longest_first(rb'"[}\]]*,')

    def path(self, matcher: _Matcher, state: int, limit: int) -> tuple[list[int], bool]:
        """The tokens the policy writes from `matcher`'s state (`state`: string_state there) to the
        end of the value, walked on a fork, and whether it got there within `limit` tokens."""
        probe = matcher.fork()
        path: list[int] = []
        while len(path) < limit:
            if probe.is_finished():
                return path, True
            if probe.is_accepting() and self.stop_ids:
                return path + [self.stop_ids[0]], True  # a value that could go on (a number): stop it
            # Forced text (a key, the rest of an enum value) first: all of it, in one go.
            step = [t for t in probe.forced_tokens()[: limit - len(path)] if t < len(self.token_bytes)]
            if not step:
                candidates = self.in_string if state != OUTSIDE else self.outside
                token = next((t for t in candidates if probe.allows(t)), None)
                if token is None:  # no closing move (a pattern, an enum, inside a character)
                    token = self._any_allowed(probe, turn=len(path))
                step = [] if token is None else [token]
            if not step:
                return path, False
            for token in step:
                if not probe.accept(token):
                    return path, False
                path.append(token)
                state = string_state(state, self.token_bytes[token])
        return path, False

    def _any_allowed(self, probe: _Matcher, turn: int) -> int | None:
        """Some allowed token: taken in turn, so a choice that loops (the `a` of `a+b`) gives way."""
        scratch = np.zeros(self.library_words, dtype=np.int32)
        probe.fill(scratch)
        allowed = np.flatnonzero(np.unpackbits(scratch.view(np.uint8), bitorder="little")[: len(self.token_bytes)])
        allowed = allowed[~np.isin(allowed, self.stop_ids)]
        return int(allowed[turn % allowed.size]) if allowed.size else None


class JsonGrammar:
    """One compiled schema: a matcher at the start (never advanced: each answer forks it) and the
    closing path from the start (the shortest answer the policy writes). Shared by the answers
    that use the schema; read-only after compile."""

    def __init__(self, key: str, start: _Matcher, start_path: list[int], closable: bool):
        self.key = key
        self.start = start
        self.start_path = start_path
        # False: the closing policy found no end within MAX_CLOSING_TOKENS (say, a pattern it cannot
        # finish); answers then go without the budget guard rather than fail.
        self.closable = closable


class JsonGrammars:
    """The JSON grammars of one loaded model: its tokenizer in the grammar library, the closing
    policy's candidate tokens and an LRU cache of compiled schemas (by canonical JSON text).
    compile() and constraint() may be called from any thread (the cache has a lock); each
    JsonConstraint is used by one thread."""

    def __init__(
        self, tokenizer, vocab_size: int, stop_token_ids: Iterable[int], cache_size: int = 32, *, library=None
    ):
        self.vocab_size = vocab_size
        self.mask_words = -(-vocab_size // 32)
        # Only ids the tokenizer has and the logits have may ever be allowed.
        self.usable = min(vocab_size, len(tokenizer))
        self.stop_ids = [t for t in dict.fromkeys(stop_token_ids) if 0 <= t < self.usable]
        self.library_words = -(-len(tokenizer) // 32)
        token_bytes, special_ids = vocabulary_bytes(tokenizer)
        self.library = (library or _Llguidance)(tokenizer, token_bytes, special_ids, self.stop_ids)
        self.closing = ClosingPolicy(token_bytes[: self.usable], self.stop_ids, self.library_words)
        self._cache: OrderedDict[str, JsonGrammar] = OrderedDict()
        self._cache_size = cache_size
        self._hits = self._misses = 0
        self._lock = threading.Lock()

    def cache_info(self) -> CacheInfo:
        return CacheInfo(self._hits, self._misses, self._cache_size, len(self._cache))

    def compile(self, schema: dict | None) -> JsonGrammar:
        """The compiled grammar of `schema` (None = any JSON object), from the cache when it is there."""
        schema = ANY_OBJECT if schema is None else schema
        if not isinstance(schema, dict):
            raise InvalidInput(f"json_schema must be a JSON object, not {type(schema).__name__}")
        key = json.dumps(schema, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        with self._lock:
            grammar = self._cache.get(key)
            if grammar is not None:
                self._hits += 1
                self._cache.move_to_end(key)
                return grammar
            self._misses += 1
            validate_schema(schema)
            try:
                start = self.library.compile(schema)
            except ValueError as error:
                raise InvalidInput(f"json_schema cannot be enforced: {_cut(str(error))}") from None
            path, done = self.closing.path(start, OUTSIDE, MAX_CLOSING_TOKENS)
            grammar = JsonGrammar(key, start, path, done)
            self._cache[key] = grammar
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return grammar

    def constraint(self, schema: dict | None, max_new_tokens: int) -> JsonConstraint:
        """The constraint of one answer of at most `max_new_tokens` tokens."""
        grammar = self.compile(schema)
        if grammar.closable and len(grammar.start_path) > max_new_tokens:
            raise InvalidInput(
                f"max_new_tokens {max_new_tokens} is too small for this JSON Schema: its shortest answer takes"
                f" {len(grammar.start_path)} tokens"
            )
        return JsonConstraint(self, grammar, max_new_tokens)


class JsonConstraint:
    """The token mask of one JSON answer (generation.TokenConstraint): the grammar's mask while the
    budget allows, the closing path's next token once it does not (see the module docstring).

    Owned by one answer; used only by the thread that generates it."""

    def __init__(self, grammars: JsonGrammars, grammar: JsonGrammar, max_new_tokens: int):
        self._grammars = grammars
        self._matcher = grammar.start.fork()
        self.mask_words = grammars.mask_words
        self._direct = grammars.library_words == grammars.mask_words
        self._scratch = None if self._direct else np.zeros(grammars.library_words, dtype=np.int32)
        # Bits of the ids past the usable ones, cleared after the library fills a mask.
        usable = grammars.usable
        self._tail_word, self._tail_bits = usable // 32, np.uint32((1 << (usable % 32)) - 1)
        self._state = OUTSIDE  # string_state after the tokens accepted so far
        # The closing path from here, next token last (pop); its length is the cost of finishing.
        # None once the model left it. The start's path comes with the compiled grammar.
        self._path: list[int] | None = grammar.start_path[::-1] if grammar.closable else None
        self._next_plan_at = self._schedule(max_new_tokens, len(grammar.start_path)) if grammar.closable else -1
        self._mask = np.zeros(self.mask_words, dtype=np.int32)  # a copy of the last mask, for accept()
        self._filled = False  # that mask belongs to the coming choice (no accept() since)

    @staticmethod
    def _schedule(tokens_left: int, cost: int) -> int:
        """The budget at which to plan again if the model leaves the path: halfway to the margin."""
        gap = tokens_left - cost - CLOSE_MARGIN
        return tokens_left - gap // 2 if gap > 1 else tokens_left

    def _plan(self, tokens_left: int) -> None:
        path, done = self._grammars.closing.path(self._matcher, self._state, tokens_left + CLOSE_MARGIN + 1)
        if done:
            self._path = path[::-1]
            self._next_plan_at = self._schedule(tokens_left, len(path))
        else:  # no end within the budget from here (the answer will run out): no use forcing a path
            self._next_plan_at = tokens_left - CLOSE_MARGIN

    def fill_mask(self, out: np.ndarray, tokens_left: int) -> None:
        """Write the allowed tokens of the next choice into `out` (token_mask.py's layout: int32
        words, `mask_words` of them); `tokens_left` counts that choice and those after it."""
        if out.dtype != np.int32 or out.shape != (self.mask_words,) or not out.flags.c_contiguous:
            raise ValueError(f"the mask must be {self.mask_words} contiguous int32 words")
        if self._path is None and tokens_left <= self._next_plan_at:
            self._plan(tokens_left)
        if self._path and tokens_left - len(self._path) <= CLOSE_MARGIN:
            token = self._path[-1]
            out[:] = 0
            out.view(np.uint32)[token // 32] = np.uint32(1 << (token % 32))
        elif self._direct:
            self._matcher.fill(out)
        else:
            self._matcher.fill(self._scratch)
            shared = min(self.mask_words, self._scratch.size)
            out[:shared] = self._scratch[:shared]
            out[shared:] = 0
        if self._tail_word < self.mask_words:
            out.view(np.uint32)[self._tail_word] &= self._tail_bits
            out[self._tail_word + 1 :] = 0
        np.copyto(self._mask, out)
        self._filled = True

    def accept(self, token: int) -> None:
        """The token chosen; RuntimeError unless the last mask allowed it."""
        token = int(token)
        if self._filled:
            allowed = 0 <= token < self._grammars.vocab_size and (int(self._mask[token // 32]) >> (token % 32)) & 1
        else:  # no mask since the last token (the caller chose on its own): the grammar decides
            allowed = 0 <= token < self._grammars.usable and self._matcher.allows(token)
        if not allowed:
            raise RuntimeError(f"token {token} was not allowed by the JSON grammar at this point")
        if not self._matcher.accept(token):
            raise RuntimeError(f"the grammar library refused token {token}: {_cut(self._matcher.error())}")
        self._filled = False
        self._state = string_state(self._state, self._grammars.closing.token_bytes[token])
        if self._path and self._path[-1] == token:
            self._path.pop()  # still on the closing path, one token closer to the end
        else:
            self._path = None

    def is_finished(self) -> bool:
        """The JSON value is complete: only a stop token could follow."""
        return self._matcher.is_finished()
