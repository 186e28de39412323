"""Prefill variants on a 7B-shaped 4-bit FastLlama (random weights): where the time goes when
a prefix is reused (attention masks) versus prefilled from position 0.

    python bench/profile_prefill.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ros2_nanovlm.engine.cuda import kernels
from ros2_nanovlm.engine.cuda.fast_llama import FastLlama, LayerWeights
from ros2_nanovlm.engine.quant.int4 import quantize_int4

DEVICE = torch.device("cuda")


def timed_ms(function, repeats=10):
    function()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main():
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32064)  # fmt: skip
    half = torch.float16
    torch.manual_seed(0)

    def int4(n, k):
        return quantize_int4(torch.randn(n, k, device=DEVICE, dtype=half) * 0.02, clip_ratios=(1.0,))

    layers = [LayerWeights(torch.ones(4096, device=DEVICE, dtype=half), int4(12288, 4096), int4(4096, 4096),
                           torch.ones(4096, device=DEVICE, dtype=half), int4(22016, 4096), int4(4096, 11008))
              for _ in range(32)]  # fmt: skip
    lm = FastLlama(config, embed_tokens=torch.randn(32064, 4096, device=DEVICE, dtype=half) * 0.02,
                   final_norm=torch.ones(4096, device=DEVICE, dtype=half),
                   lm_head=torch.randn(32064, 4096, device=DEVICE, dtype=half) * 0.02,
                   layers=layers, max_tokens=1024, device=DEVICE)  # fmt: skip
    embeds = torch.randn(623, 4096, device=DEVICE, dtype=half) * 0.02
    result = {}
    result["prefill_623_at_0_ms"] = timed_ms(lambda: lm.prefill(embeds, 0))
    result["prefill_617_at_6_ms"] = timed_ms(lambda: lm.prefill(embeds[6:], 6))
    result["prefill_583_at_40_ms"] = timed_ms(lambda: lm.prefill(embeds[40:], 40))
    result["prefill_20_at_603_ms"] = timed_ms(lambda: lm.prefill(embeds[603:], 603))
    # components: one layer's dequantizations and GEMMs, times 32
    layer = layers[0]
    h = torch.randn(617, 4096, device=DEVICE, dtype=half)
    scratch = torch.empty(22016 * 4096 // 2 + 4096 * 4096, device=DEVICE, dtype=half)
    half_rows = layer.gate_up.out_features // 2
    mats = [
        layer.qkv,
        layer.o,
        layer.gate_up.rows(0, half_rows),
        layer.gate_up.rows(half_rows, 2 * half_rows),
        layer.down,
    ]

    def dequant_all():
        for w in mats:
            kernels.w4_dequantize(w, scratch[: w.out_features * w.in_features].view(w.out_features, w.in_features))

    result["dequant_x32_ms"] = 32 * timed_ms(dequant_all)
    dense = [torch.randn(w.out_features, w.in_features, device=DEVICE, dtype=half) for w in mats]
    inputs = [h, h, h, h, torch.randn(617, 11008, device=DEVICE, dtype=half)]
    result["gemm_x32_ms"] = 32 * timed_ms(lambda: [F.linear(x, w) for x, w in zip(inputs, dense)])
    q = torch.randn(1, 32, 617, 128, device=DEVICE, dtype=half)
    k = torch.randn(1, 32, 623, 128, device=DEVICE, dtype=half)
    mask = torch.ones(617, 623, dtype=torch.bool, device=DEVICE).tril(diagonal=6)
    from torch.nn.attention.bias import causal_lower_right

    result["sdpa_bool_mask_x32_ms"] = 32 * timed_ms(lambda: F.scaled_dot_product_attention(q, k, k, attn_mask=mask))
    result["sdpa_lower_right_x32_ms"] = 32 * timed_ms(
        lambda: F.scaled_dot_product_attention(q, k, k, attn_mask=causal_lower_right(617, 623))
    )
    qc = torch.randn(1, 32, 623, 128, device=DEVICE, dtype=half)
    result["sdpa_causal_623_x32_ms"] = 32 * timed_ms(lambda: F.scaled_dot_product_attention(qc, k, k, is_causal=True))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
