"""What the generation loop's hooks cost: decode speed unconstrained, with a streaming callback,
with a token mask rewritten before every token, and with schema-constrained JSON.

    python bench/generation_bench.py                        # CPU: the demo VLM
    python bench/generation_bench.py --arch llava-1.5-7b    # GPU: 4-bit fast path, random weights

Every mode runs in the same process on the same engine, alternating, so the ratios compare like
with like. decode_tok_s = (answer tokens - 1) / decode time (the first token comes from the
prefill); medians over --repeats. Results: bench/results/generation-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "test"))

from ros2_nanovlm.engine import EngineConfig, VLMEngine  # noqa: E402
from ros2_nanovlm.engine.api import GenerationControl, Turn  # noqa: E402
from ros2_nanovlm.engine.json_output import json_instruction  # noqa: E402
from ros2_nanovlm.engine.token_mask import mask_words  # noqa: E402

RESULTS = ROOT / "bench" / "results"
QUESTION = "Describe the image in detail."


class AllowEverything:
    """A constraint whose mask allows every token, rewritten before each choice: the cost of the
    mask's mechanics alone (fill on the host, copy, no step started ahead)."""

    def __init__(self, vocab_size: int):
        self._words = np.full(mask_words(vocab_size), -1, dtype=np.int32)

    def fill_mask(self, out, tokens_left):
        out[:] = self._words

    def accept(self, token):
        pass

    def is_finished(self):
        return False


class TimedConstraint:
    """Wraps a constraint and times its host work per token (fill_mask + accept)."""

    def __init__(self, inner):
        self._inner = inner
        self.seconds = 0.0
        self.calls = 0

    def fill_mask(self, out, tokens_left):
        started = time.perf_counter()
        self._inner.fill_mask(out, tokens_left)
        self.seconds += time.perf_counter() - started
        self.calls += 1

    def accept(self, token):
        started = time.perf_counter()
        self._inner.accept(token)
        self.seconds += time.perf_counter() - started

    def is_finished(self):
        return self._inner.is_finished()


def load(args):
    if args.arch:
        import archs

        from ros2_nanovlm.engine.hf.backend import TransformersBackend

        model, processor = archs.build(args.arch)
        config = EngineConfig(
            model_path="(random weights)", device="cuda", quantization="int4", max_context_tokens=1024
        )
        backend = TransformersBackend.from_model(model, processor, config, name=f"{args.arch}-random-int4")
        return VLMEngine(backend, config), args.arch
    from ros2_nanovlm.default_model import ensure_default_model

    config = EngineConfig(model_path=str(ensure_default_model()), device="cpu")
    return VLMEngine.load(config), "nanovlm-demo"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="", help="a bench/archs.py architecture (GPU); default: the demo VLM (CPU)")
    parser.add_argument("--tokens", type=int, default=128, help="answer length of the unconstrained modes")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from test_structured import SCHEMAS

    engine, model_name = load(args)
    backend = engine._backend
    frame = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    grammars = backend._json_grammars()  # made before the stop tokens are cleared below
    backend.eos_ids = set()  # random or tiny weights: force the answer's length in free-text modes
    sync = torch.cuda.synchronize if engine.device.startswith("cuda") else (lambda: None)

    def run():
        sync()
        return engine.ask(QUESTION, frame, max_new_tokens=args.tokens)

    def tok_s(answer) -> float:
        return (answer.generated_tokens - 1) / (answer.timings.decode_ms / 1000)

    modes: dict[str, list] = {"unconstrained": [], "streaming_callback": [], "mask_all_ones_every_token": []}
    json_modes = {f"json_{name}": schema for name, schema in SCHEMAS.items()} | {"json_any_object": None}
    for name in json_modes:
        modes[name] = []
    host_us: dict[str, list] = {name: [] for name in json_modes}
    tokens: dict[str, list] = {name: [] for name in modes}
    run()  # warm-up (vision, graphs)
    for _ in range(args.repeats):
        answer = run()
        modes["unconstrained"].append(tok_s(answer))
        tokens["unconstrained"].append(answer.generated_tokens)
        pieces = []
        answer = engine.ask(QUESTION, frame, max_new_tokens=args.tokens, on_token=pieces.append)
        modes["streaming_callback"].append(tok_s(answer))
        tokens["streaming_callback"].append(answer.generated_tokens)
        answer = answer_with(engine, frame, AllowEverything(backend.lm.vocab_size), args.tokens)
        modes["mask_all_ones_every_token"].append(tok_s(answer))
        tokens["mask_all_ones_every_token"].append(answer.generated_tokens)
        for name, schema in json_modes.items():
            constraint = TimedConstraint(grammars.constraint(schema, 256))
            answer = answer_with(engine, frame, constraint, 256, json=True)
            if answer.generated_tokens > 8:
                modes[name].append(tok_s(answer))
                host_us[name].append(constraint.seconds / max(constraint.calls, 1) * 1e6)
            tokens[name].append(answer.generated_tokens)

    base = statistics.median(modes["unconstrained"])
    summary = {
        name: {
            "decode_tok_s": statistics.median(values) if values else None,
            "ratio_to_unconstrained": statistics.median(values) / base if values else None,
            "answer_tokens_median": statistics.median(tokens[name]),
            **({"grammar_host_us_per_token": statistics.median(host_us[name])} if host_us.get(name) else {}),
        }
        for name, values in modes.items()
    }
    device = torch.cuda.get_device_name() if engine.device.startswith("cuda") else platform.processor() or "cpu"
    tag = device.split()[1] if engine.device.startswith("cuda") and len(device.split()) > 1 else "cpu"
    result = {
        "device": device,
        "engine_device": engine.device,
        "model": model_name,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "repeats": args.repeats,
        "unconstrained_tokens": args.tokens,
        "modes": summary,
    }
    print(json.dumps(result, indent=2))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"generation-{tag}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


def answer_with(engine, frame, constraint, max_new_tokens: int, json: bool = False):
    """One answer whose every token choice goes through `constraint` (JSON: with the JSON
    instruction in the question, as JSON mode asks)."""
    question = QUESTION + json_instruction(None) if json else QUESTION
    control = GenerationControl(constraint=constraint)
    return engine._answer("", (Turn("user", question, frame),), max_new_tokens, None, control)


if __name__ == "__main__":
    main()
