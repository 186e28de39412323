"""Schema-guaranteed JSON, counted: N prompts x 3 schemas through the engine on the CPU, with a
tiny random LLaVA and with the demo VLM, max_new_tokens 256. Each answer is valid JSON that
validates against its schema (jsonschema), or an explicit budget error; anything else fails.

    python bench/json_validity.py [--prompts 100] [--models tiny_llava,demo] [--device cpu]

Results: bench/results/json-validity.json (counts, budget-error rate, answer lengths, time), one
entry per model, with the device it ran on; a run updates only its models' entries, so the tiny
model can run on a GPU machine (no demo weights there) and the demo model on the CPU.
test/test_json_answers.py runs the same check on fewer prompts in CI.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "test"))

from json_answers import BUDGET, check_json_answers, photos  # noqa: E402

from ros2_nanovlm.engine import EngineConfig, VLMEngine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--models", default="tiny_llava,demo")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    from ros2_nanovlm.default_model import ensure_default_model
    from ros2_nanovlm.engine.tiny import build_tiny_llava

    work = Path(tempfile.mkdtemp(prefix="json-validity-"))
    paths = {"tiny_llava": lambda: build_tiny_llava(work / "tiny-llava"), "demo": ensure_default_model}
    out = ROOT / "bench" / "results" / "json-validity.json"
    results = json.loads(out.read_text()) if out.is_file() else {"models": {}}
    results.update({"budget": BUDGET, "prompts": args.prompts})
    for name in args.models.split(","):
        engine = VLMEngine.load(EngineConfig(model_path=str(paths[name]()), device=args.device))
        started = time.perf_counter()
        counts = check_json_answers(engine, photos(), args.prompts)
        for figures in counts.values():
            lengths = figures.pop("lengths")
            figures["answer_tokens_median"] = statistics.median(lengths)
            figures["answer_tokens_max"] = max(lengths)
        results["models"][name] = {
            "device": engine.device,
            "python": platform.python_version(),
            "schemas": counts,
            "seconds": round(time.perf_counter() - started, 1),
        }
        print(name, json.dumps(results["models"][name], indent=1), flush=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
