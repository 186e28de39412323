"""llguidance or xgrammar for JSON mode? Both run the same walk behind engine/structured.py's seam
(a `_Library`: compile a schema, fill a mask, accept, fork), on this machine's CPU:

- compile per schema: cold (the library's own compile, and JsonGrammars.compile, which adds the
  schema check and the closing path from the start) and cached (a JsonGrammars cache hit);
- per token, on walks of up to 256 tokens that pick uniformly among the allowed tokens (seeded):
  JsonConstraint.fill_mask (the library's mask, plus the closing plans when due; their share is
  reported apart) and accept; and whether each walk ends in JSON that validates, or unfinished.

Tokenizers: the tiny models' byte-level one (261 tokens), the same padded to 32000 (the GPU
benchmark models) and the demo model's SmolLM2 (49152, BPE; built into --demo-model if missing).
The schemas are test/test_structured.py's SCHEMAS plus "any object".

    python bench/grammar_libraries.py [--walks 20] [--demo-model /tmp/demo-model]

Writes bench/results/grammar-libraries.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path

import jsonschema
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "test"))

from test_structured import SCHEMAS  # noqa: E402

from ros2_nanovlm.engine import structured  # noqa: E402
from ros2_nanovlm.engine.structured import JsonConstraint, JsonGrammars  # noqa: E402
from ros2_nanovlm.engine.token_mask import allowed_tokens  # noqa: E402

MAX_NEW_TOKENS = 256


class _XgrMatcher:
    """xgrammar's GrammarMatcher behind structured.py's seam."""

    def __init__(self, matcher):
        self._m = matcher

    def fill(self, words: np.ndarray) -> None:
        self._m.fill_next_token_bitmask(words.reshape(1, -1))  # numpy speaks DLPack

    def accept(self, token: int) -> bool:
        return self._m.accept_token(token)

    def allows(self, token: int) -> bool:
        if not self._m.accept_token(token):
            return False
        self._m.rollback(1)
        return True

    def forced_tokens(self) -> list[int]:
        return self._m.find_jump_forward_tokens()

    def fork(self) -> _XgrMatcher:
        return _XgrMatcher(self._m.fork())

    def is_finished(self) -> bool:
        return self._m.is_terminated()

    def is_accepting(self) -> bool:
        return self._m.is_completed()

    def error(self) -> str:
        return ""


class Xgrammar:
    """xgrammar with one vocabulary (the same token bytes llguidance gets; special tokens empty,
    which xgrammar takes for special)."""

    name = "xgrammar"

    def __init__(self, tokenizer, token_bytes, special_ids, stop_ids):
        import xgrammar

        specials = set(special_ids)
        vocab = [b"" if token in specials else text for token, text in enumerate(token_bytes)]
        info = xgrammar.TokenizerInfo(
            vocab, vocab_type=xgrammar.VocabType.RAW, vocab_size=len(vocab), stop_token_ids=stop_ids
        )
        # Our own cache is what is measured as "cached"; the library's would hide the cold cost.
        self._compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)

    def compile(self, schema: dict) -> _XgrMatcher:
        import xgrammar

        try:
            compiled = self._compiler.compile_json_schema(
                json.dumps(schema), any_whitespace=False, separators=(",", ":"), strict_mode=False
            )
        except RuntimeError as error:
            raise ValueError(str(error)) from None
        return _XgrMatcher(xgrammar.GrammarMatcher(compiled, terminate_without_stop_token=True))


LIBRARIES = {"llguidance": structured._Llguidance, "xgrammar": Xgrammar}


def tokenizers(demo_model: Path) -> dict:
    from transformers import AutoTokenizer

    from ros2_nanovlm.engine.tiny import byte_level_tokenizer

    manifest = demo_model / "nanovlm_vlm.json"
    if not manifest.exists():
        from ros2_nanovlm.engine.demo_model.build import build_demo_model

        build_demo_model(demo_model)
    language_model = demo_model / json.loads(manifest.read_text())["language_model"]
    return {
        "byte-level": byte_level_tokenizer(),
        "byte-level-32000": byte_level_tokenizer(vocab_size=32000),
        "smollm2": AutoTokenizer.from_pretrained(language_model),
    }


class Timers:
    """Per-token times of one library and schema. The library's mask fills are timed inside
    its matcher (not the closing plans' fills); fill_mask is what the generation loop pays:
    the library's mask, or a forced token, or a closing plan then one of those."""

    def __init__(self, matcher_class):
        self.library_fill: list[float] = []
        self.fill_mask: list[float] = []
        self.accept: list[float] = []
        self.plans: list[float] = []
        self._planning = False
        self._patches = [(matcher_class, "fill"), (JsonConstraint, "_plan")]
        self._originals = [getattr(owner, name) for owner, name in self._patches]
        fill, plan = self._originals

        def timed_fill(matcher, words):
            started = time.perf_counter()
            fill(matcher, words)
            if not self._planning:
                self.library_fill.append((time.perf_counter() - started) * 1e6)

        def timed_plan(constraint, tokens_left):
            self._planning = True
            started = time.perf_counter()
            plan(constraint, tokens_left)
            self.plans.append((time.perf_counter() - started) * 1e6)
            self._planning = False

        matcher_class.fill, JsonConstraint._plan = timed_fill, timed_plan

    def restore(self) -> None:
        for (owner, name), original in zip(self._patches, self._originals):
            setattr(owner, name, original)


def walk(grammars: JsonGrammars, schema, seed: int, timers: Timers) -> dict:
    """One answer of random allowed tokens; its outcome."""
    rng = np.random.default_rng(seed)
    constraint = grammars.constraint(schema, MAX_NEW_TOKENS)
    mask = np.empty(constraint.mask_words, dtype=np.int32)
    tokens = []
    for tokens_left in range(MAX_NEW_TOKENS, 0, -1):
        started = time.perf_counter()
        constraint.fill_mask(mask, tokens_left)
        timers.fill_mask.append((time.perf_counter() - started) * 1e6)
        allowed = allowed_tokens(mask, grammars.vocab_size)
        token = int(allowed[rng.integers(allowed.size)])
        if token in grammars.stop_ids:
            break
        started = time.perf_counter()
        constraint.accept(token)
        timers.accept.append((time.perf_counter() - started) * 1e6)
        tokens.append(token)
        if constraint.is_finished():
            break
    finished = constraint.is_finished() or token in grammars.stop_ids
    data = b"".join(grammars.closing.token_bytes[t] for t in tokens)
    problem = ""
    if finished:
        try:
            jsonschema.validate(json.loads(data.decode("utf-8")), schema or {"type": "object"})
        except (UnicodeDecodeError, json.JSONDecodeError, jsonschema.ValidationError) as error:
            problem = f"{type(error).__name__}: {str(error)[:120]} in {data[:160]!r}"
    return {"tokens": len(tokens), "valid": finished and not problem, "unfinished": not finished, "problem": problem}


def mean_p95(values: list[float]) -> tuple[float, float]:
    return round(statistics.fmean(values), 1), round(float(np.percentile(values, 95)), 1)


def measure(library_name: str, tokenizer, walks: int) -> dict:
    started = time.perf_counter()
    grammars = JsonGrammars(tokenizer, len(tokenizer), [tokenizer.eos_token_id], library=LIBRARIES[library_name])
    setup_ms = (time.perf_counter() - started) * 1e3
    schemas, every_fill = {}, []
    for name, schema in {**SCHEMAS, "any object": None}.items():
        started = time.perf_counter()
        start = grammars.library.compile(schema or structured.ANY_OBJECT)
        library_ms = (time.perf_counter() - started) * 1e3
        started = time.perf_counter()
        grammars.compile(schema)
        cold_ms = (time.perf_counter() - started) * 1e3
        started = time.perf_counter()
        grammars.compile(schema)
        cached_us = (time.perf_counter() - started) * 1e6
        timers = Timers(type(start))
        try:
            outcomes = [walk(grammars, schema, seed, timers) for seed in range(walks)]
        finally:
            timers.restore()
        every_fill += timers.library_fill
        figures = schemas[name] = {
            "library_compile_ms": round(library_ms, 3),
            "compile_cold_ms": round(cold_ms, 3),
            "compile_cached_us": round(cached_us, 2),
            "library_fill_us": mean_p95(timers.library_fill),
            "fill_mask_us": mean_p95(timers.fill_mask),
            "accept_us": mean_p95(timers.accept),
            "plans_per_walk": round(len(timers.plans) / walks, 2),
            "plan_us": mean_p95(timers.plans) if timers.plans else None,
            "tokens_per_walk": round(statistics.fmean(o["tokens"] for o in outcomes), 1),
            "walks": walks,
            "valid": sum(o["valid"] for o in outcomes),
            "budget_errors": sum(o["unfinished"] for o in outcomes),
            "invalid": sum(bool(o["problem"]) for o in outcomes),
        }
        problems = [o["problem"] for o in outcomes if o["problem"]]
        if problems:
            figures["first_invalid"] = problems[0]
        print(f"  {library_name:10s} {name:10s} {figures}", flush=True)
    mean, p95 = mean_p95(every_fill)
    return {
        "setup_ms": round(setup_ms, 1),
        "library_fill_mean_us": mean,
        "library_fill_p95_us": p95,
        "schemas": schemas,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--walks", type=int, default=20, help="walks per schema and tokenizer")
    parser.add_argument("--demo-model", type=Path, default=Path("/tmp/demo-model"))
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "grammar-libraries.json")
    args = parser.parse_args()

    results = []
    for tokenizer_name, tokenizer in tokenizers(args.demo_model).items():
        for library_name in LIBRARIES:
            print(f"{tokenizer_name} ({len(tokenizer)} tokens), {library_name}", flush=True)
            figures = measure(library_name, tokenizer, args.walks)
            results.append({"library": library_name, "tokenizer": tokenizer_name, "vocab": len(tokenizer), **figures})
            print(
                f"  setup {figures['setup_ms']} ms, library mask fill: mean {figures['library_fill_mean_us']} µs,"
                f" p95 {figures['library_fill_p95_us']} µs"
            )
    report = {
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}",
        "versions": {name: version(name) for name in ("llguidance", "xgrammar")},
        "max_new_tokens": MAX_NEW_TOKENS,
        "walk": "a uniformly random allowed token per step, seeded; figures in µs are [mean, p95]",
        "results": results,
    }
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
