"""Where a one-token answer's time goes in the engine (7B, 4-bit, random weights): the phases
of TransformersBackend.generate timed one by one, each bracketed by torch.cuda.synchronize.

    python bench/profile_answer.py [arch, default llava-1.5-7b]
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import archs
from engine_bench import QUESTION, SYSTEM, frames

from ros2_nanovlm.engine import EngineConfig, Turn, VLMEngine
from ros2_nanovlm.engine.frames import frame_digest
from ros2_nanovlm.engine.hf.backend import TransformersBackend


def main():
    arch = sys.argv[1] if len(sys.argv) > 1 else "llava-1.5-7b"
    model, processor = archs.build(arch)
    config = EngineConfig(model_path="(random)", device="cuda", quantization="int4", max_context_tokens=1024)
    backend = TransformersBackend.from_model(model, processor, config)
    del model
    backend.eos_ids = set()
    engine = VLMEngine(backend, config)
    pool = iter(frames(40, seed=3))
    phases = {k: [] for k in ("digest", "vision", "tokenize", "embeddings", "prefill", "engine_total")}

    def clock(name, function):
        torch.cuda.synchronize()
        started = time.perf_counter()
        value = function()
        torch.cuda.synchronize()
        phases[name].append((time.perf_counter() - started) * 1000)
        return value

    for index in range(14):
        frame = next(pool)
        clock("digest", lambda: frame_digest(frame))
        features = clock("vision", lambda: backend.encode_image(frame))
        prompt = clock(
            "tokenize",
            lambda: backend.prompter.tokenize(SYSTEM, (Turn("user", QUESTION, frame),), [(f"d{index}", len(features))]),
        )
        embeds = clock("embeddings", lambda: backend._prompt_embeddings(prompt, 6, {f"d{index}": features}))
        with torch.inference_mode():
            clock("prefill", lambda: backend.lm.prefill(embeds, 6))
        clock("engine_total", lambda: engine.ask(QUESTION, next(pool), system_prompt=SYSTEM, max_new_tokens=1))
    summary = {"arch": arch, **{name: round(statistics.median(values[4:]), 2) for name, values in phases.items()}}
    last = engine.ask(QUESTION, next(pool), system_prompt=SYSTEM, max_new_tokens=1)
    summary["engine_timings_of_one_answer"] = vars(last.timings)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
