"""Engine benchmark on the GPU: ours (4-bit, fp16) against plain transformers fp16, same run.

    python bench/engine_bench.py [--archs llava-1.5-7b,llava-2.7b] [--quality bench/results/quantization-quality.json]
                                 [--modes int4,none] [--out-dir DIR]

Modes of ours: int4 (4-bit weights; prefill through the 4-bit GEMM, w4_gemm.py), int4_dequantize
(the same with the old prefill path, NANOVLM_W4_GEMM=0: each matrix dequantized, then cuBLAS),
none (fp16 weights).

For each architecture (real shapes, random weights) and mode it measures, batch 1:
  vision_ms       640x480 uint8 RGB frame -> image embeddings (preprocessing included)
  prefill_ms      576 image + ~50 text tokens, from an empty KV cache
  decode_tok_s    128 new tokens (EOS ignored), prefill excluded
  answer_1tok_ms  a yes/no question about a NEW frame, frame -> answer string, 1 token
  answer_3tok_ms  the same with 3 tokens
  peak_gpu_gb     torch.cuda.max_memory_reserved while answering, after emptying the cache: all
                  the memory torch holds, CUDA-graph pools included (max_memory_allocated does not
                  see a graph's temporaries) (KV cache of --context tokens)
  bandwidth_fraction  weight bytes read per decoded token * decode_tok_s / peak memory bandwidth
Medians over repeats after warm-up; figures go to bench/results/engine-<device>.json and .md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import archs

from ros2_nanovlm.engine import EngineConfig, Turn, VLMEngine
from ros2_nanovlm.engine.hf.backend import TransformersBackend

PEAK_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}  # bytes/s, SXM datasheet figures
# LLaVA-1.5's template with no system prompt and a short yes/no question: 576 image tokens and
# about 50 text tokens (the tokenizer is byte-level), as in the baseline of ../shared/ENVIRONMENT.md.
SYSTEM = ""
QUESTION = "Is the path clear? Yes or no."
RESULTS = Path(__file__).resolve().parent / "results"


def median_ms(function, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        started = time.perf_counter()
        function()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def frames(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for _ in range(count)]


def device_peak_bandwidth() -> tuple[str, float]:
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BANDWIDTH.items():
        if key in name:
            return name, value
    return name, float("nan")


# ---- baseline: plain transformers fp16 --------------------------------------------------------


def bench_baseline(model, processor, repeats: int) -> dict:
    tokenizer = processor.tokenizer
    messages = [{"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]  # fmt: skip
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    pool = iter(frames(1000, seed=1))
    config = model.config

    def inputs_for(frame):
        return processor(text=text, images=frame, return_tensors="pt").to("cuda", torch.float16)

    def vision():
        pixel_values = processor.image_processor(images=next(pool), return_tensors="pt")["pixel_values"].to(
            "cuda", torch.float16
        )
        model.model.get_image_features(pixel_values=pixel_values, vision_feature_layer=config.vision_feature_layer,
                                       vision_feature_select_strategy=config.vision_feature_select_strategy)  # fmt: skip

    inputs = inputs_for(next(pool))
    prompt_tokens = inputs["input_ids"].shape[1]
    with torch.inference_mode():
        embeds = model.get_input_embeddings()(
            inputs["input_ids"].masked_fill(inputs["input_ids"] == config.image_token_id, 0)
        )

        def prefill():
            model(inputs_embeds=embeds, logits_to_keep=1)

        def generate(new_tokens, frame=None):
            batch = inputs if frame is None else inputs_for(frame)
            out = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            return tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)

        result = {
            "vision_ms": median_ms(vision, repeats),
            "prefill_ms": median_ms(prefill, repeats),
            "prompt_tokens": prompt_tokens,
        }
        one = median_ms(lambda: generate(1), repeats)
        many = median_ms(lambda: generate(129), max(3, repeats // 3), warmup=1)
        result["decode_tok_s"] = 128 / ((many - one) / 1000)
        result["answer_1tok_ms"] = median_ms(lambda: generate(1, next(pool)), repeats)
        result["answer_3tok_ms"] = median_ms(lambda: generate(3, next(pool)), repeats)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        generate(3, next(pool))
    result["peak_gpu_gb"] = torch.cuda.max_memory_reserved() / 1e9
    result["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9
    result["weight_bytes_per_token"] = (
        sum(p.numel() * p.element_size() for p in model.model.language_model.parameters())
        + model.lm_head.weight.numel() * 2
    )
    return result


# ---- ours ----------------------------------------------------------------------------------


def memory_breakdown(backend, lm) -> dict:
    """GB of what the engine holds on the GPU, by part; `other` is the rest of torch's reserve
    (CUDA-graph pools, cuBLAS workspaces, the caching allocator's slack)."""

    def gb(tensors):
        return sum(t.numel() * t.element_size() for t in tensors) / 1e9

    parts = {
        "language_model_weights": gb(lm.state_dict().values()),
        "kv_cache": gb([lm.k_cache, lm.v_cache]),
        "dequant_scratch": gb([lm._scratch]) if lm._scratch is not None else 0.0,
        "vision_and_projector": gb(list(backend.model.parameters()) + list(backend.model.buffers())),
    }
    parts["other"] = torch.cuda.memory_reserved() / 1e9 - sum(parts.values())
    return parts


def bench_ours(model, processor, quantization: str, context: int, repeats: int) -> dict:
    torch.cuda.reset_peak_memory_stats()
    config = EngineConfig(model_path="(random weights)", device="cuda", quantization=quantization,
                          max_context_tokens=context, embedding_cache_size=4)  # fmt: skip
    started = time.perf_counter()
    backend = TransformersBackend.from_model(model, processor, config, name=f"random-{quantization}")
    load_s = time.perf_counter() - started
    del model
    gc.collect()
    torch.cuda.empty_cache()
    backend.eos_ids = set()  # random weights: force the number of tokens
    engine = VLMEngine(backend, config)
    pool = iter(frames(1000, seed=2))
    lm = backend.lm

    def ask(new_tokens, frame=None):
        return engine.ask(
            QUESTION, next(pool) if frame is None else frame, system_prompt=SYSTEM, max_new_tokens=new_tokens
        )

    first = ask(1)
    prompt_tokens = first.prompt_tokens
    fixed = next(pool)
    features = backend.encode_image(fixed)
    prompt = backend.prompter.tokenize(SYSTEM, (Turn("user", QUESTION, fixed),),
                                       [("bench", len(features))])  # fmt: skip
    embeds = backend._prompt_embeddings(prompt, 0, {"bench": features})
    with torch.inference_mode():
        result = {
            "vision_ms": median_ms(lambda: backend.encode_image(next(pool)), repeats),
            "prefill_ms": median_ms(lambda: lm.prefill(embeds, 0), repeats),
            "prompt_tokens": prompt_tokens,
        }
    decode = [ask(129) for _ in range(max(3, repeats // 3))]
    result["decode_tok_s"] = statistics.median(128 / (a.timings.decode_ms / 1000) for a in decode)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated()
    result["memory_gb"] = memory_breakdown(backend, lm)
    answers = [ask(1) for _ in range(repeats + 2)][2:]
    result["answer_1tok_ms"] = statistics.median(a.timings.total_ms for a in answers)
    result["answer_1tok_breakdown_ms"] = {
        "vision": statistics.median(a.timings.vision_ms for a in answers),
        "prefill": statistics.median(a.timings.prefill_ms for a in answers),
        "prefilled_tokens": answers[-1].prompt_tokens - answers[-1].reused_tokens,
    }
    answers = [ask(3) for _ in range(repeats + 2)][2:]
    result["answer_3tok_ms"] = statistics.median(a.timings.total_ms for a in answers)
    result["peak_gpu_gb"] = torch.cuda.max_memory_reserved() / 1e9
    result["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9
    result["resident_gpu_gb"] = resident / 1e9  # live tensors: weights, KV cache, buffers
    result["prefill_graphs"] = {"replays": lm._prefill_graphs.replays, "disabled": lm._prefill_graphs.disabled_reason}
    result["weight_bytes_per_token"] = lm.weight_bytes_per_token()
    result["load_and_capture_s"] = load_s
    result["w4_gemm_disabled"] = lm.w4_gemm_disabled if lm.quantized else "fp16 weights"
    result["gemv_configs"] = {str(k): v for k, v in lm._gemv_configs.items()}
    result["partial_configs"] = dict(lm._partial_configs)
    engine.close()
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--archs", default="llava-1.5-7b,llava-2.7b")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--context", type=int, default=1024, help="KV cache size of our engine")
    parser.add_argument("--quality", default=str(RESULTS / "quantization-quality.json"))
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--modes", default="int4,none", help="of ours: int4, int4_dequantize, none (fp16)")
    parser.add_argument("--out-dir", default=str(RESULTS), help="engine-<device>.json and .md go here")
    args = parser.parse_args()
    device_name, bandwidth = device_peak_bandwidth()
    results = {
        "device": device_name,
        "peak_bandwidth_bytes_s": bandwidth,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "triton": __import__("triton").__version__,
        "python": platform.python_version(),
        "context_tokens": args.context,
        "archs": {},
    }
    for name in args.archs.split(","):
        print(f"== {name}", flush=True)
        modes = {}
        if not args.skip_baseline:
            model, processor = archs.build(name)
            modes["baseline_transformers_fp16"] = bench_baseline(model, processor, args.repeats)
            print("baseline", modes["baseline_transformers_fp16"], flush=True)
            del model
            gc.collect()
            torch.cuda.empty_cache()
        for mode in args.modes.split(","):
            model, processor = archs.build(name)
            label = {"int4": "ours_int4", "int4_dequantize": "ours_int4_dequantize", "none": "ours_fp16"}[mode]
            old_path = mode == "int4_dequantize"
            if old_path:
                os.environ["NANOVLM_W4_GEMM"] = "0"  # read when FastLlama is made
            try:
                quantization = "none" if mode == "none" else "int4"
                modes[label] = bench_ours(model, processor, quantization, args.context, args.repeats)
            except Exception as error:  # noqa: BLE001 - keep the other modes' figures
                traceback.print_exc()
                modes[label] = {"error": repr(error)[:500]}
            finally:
                if old_path:
                    del os.environ["NANOVLM_W4_GEMM"]
            del model
            gc.collect()
            torch.cuda.empty_cache()
            print(label, modes[label], flush=True)
        for mode in modes.values():
            if "error" in mode:
                continue
            mode["bandwidth_fraction"] = mode["weight_bytes_per_token"] * mode["decode_tok_s"] / bandwidth
        baseline = modes.get("baseline_transformers_fp16")
        if baseline and "error" not in modes.get("ours_int4", {"error": "not run"}):
            modes["speedup_ours_int4_over_baseline"] = {
                key: (
                    baseline[key] / modes["ours_int4"][key]
                    if key.endswith("_ms")
                    else modes["ours_int4"][key] / baseline[key]
                )
                for key in ("vision_ms", "prefill_ms", "decode_tok_s", "answer_1tok_ms", "answer_3tok_ms")
            }
        results["archs"][name] = modes
        # after each architecture: a cut-off run keeps what it measured
        write_results(results, args.quality, Path(args.out_dir))
    print(markdown_table(results))


def write_results(results: dict, quality_file: str, out_dir: Path = RESULTS) -> None:
    quality = Path(quality_file)
    if quality.is_file():
        results["quantization_quality"] = json.loads(quality.read_text())
    device_name = results["device"]
    tag = device_name.split()[1] if len(device_name.split()) > 1 else device_name
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"engine-{tag}.json"
    out.write_text(json.dumps(results, indent=2))
    (out_dir / f"engine-{tag}.md").write_text(markdown_table(results))
    print(f"wrote {out}", flush=True)


def markdown_table(results: dict) -> str:
    keys = (
        "vision_ms",
        "prefill_ms",
        "decode_tok_s",
        "answer_1tok_ms",
        "answer_3tok_ms",
        "peak_gpu_gb",
        "bandwidth_fraction",
    )
    lines = [f"# Engine benchmark on {results['device']}", "",
             f"torch {results['torch']}, transformers {results['transformers']}, triton {results['triton']}; "
             f"batch 1, random weights of the real architectures, KV cache {results['context_tokens']} tokens (ours).", "",
             "| arch | mode | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]  # fmt: skip
    for arch, modes in results["archs"].items():
        for mode, values in modes.items():
            if mode.startswith("speedup"):
                row = [f"{values[k]:.2f}x" if k in values else "" for k in keys]
            else:
                row = [f"{values[k]:.3g}" if k in values else "" for k in keys]
            lines.append(f"| {arch} | {mode} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
