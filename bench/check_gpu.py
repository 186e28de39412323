"""GPU checks before the benchmark: kernels against float32 references at real shapes, the
4-bit GEMV's bandwidth against cuBLAS fp16 and torchao int4, and FastLlama against transformers;
the 4-bit prefill GEMM per matrix against cuBLAS fp16 and the old dequantize + cuBLAS path, and
the prefill of the 7B and 2.7B shapes with fp16 weights, the old 4-bit path and the 4-bit GEMM.

    python bench/check_gpu.py [--out results/check-gpu.json] [--prefill-out results/prefill-w4.json]
                              [--w4-sweep] [--sweep]
Exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ros2_nanovlm.engine.cuda import kernels, w4_gemm
from ros2_nanovlm.engine.cuda.fast_llama import FastLlama, LayerWeights, graph_time_us
from ros2_nanovlm.engine.quant.int4 import Int4Weight, dequantize_int4, quantize_int4
from ros2_nanovlm.engine.quant.int8 import dequantize_int8_rows, quantize_int8_rows

DEVICE = torch.device("cuda")
# (rows, columns) of the 7B's linear layers, as FastLlama fuses them
LLAVA_7B_MATRICES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}
failures: list[str] = []
report: dict = {"checks": {}, "gemv_bandwidth": {}}
# Token counts of the per-matrix prefill timings: 640 is the 623-token prompt as the prefill
# graphs pad it (multiples of 64).
PREFILL_TOKENS = (16, 64, 256, 640, 2048)
STREAM_K_CHECKS = ((128, 256, 8, 3, 1), (128, 128, 8, 3, 1), (64, 128, 4, 3, 2))


def relative_error(value, reference) -> float:
    value, reference = value.double(), reference.double()
    return float((value - reference).norm() / reference.norm())


def check(name: str, value, reference, tolerance: float) -> None:
    if torch.isnan(value).any():
        error = float("nan")
    else:
        error = relative_error(value, reference)
    ok = error <= tolerance
    report["checks"][name] = {"relative_error": error, "tolerance": tolerance, "ok": ok}
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {error:.2e} (<= {tolerance:g})", flush=True)
    if not ok:
        failures.append(name)


def check_steps_started_ahead(lm, embeds, first: int, label: str) -> None:
    """decode_step(more=True) starts the next step before returning: the same tokens as one
    step at a time, and a caller that then feeds another token still gets the right answer."""

    def tokens(more: bool) -> list[int]:
        lm.prefill_logits(embeds[:299], 0)
        out = [first]
        for step in range(16):
            out.append(lm.decode_step(out[-1], 299 + step, more=more and step < 15))
        return out

    def after_other_token(more: bool) -> int:
        lm.prefill_logits(embeds[:299], 0)
        lm.decode_step(first, 299, more=more)
        return lm.decode_step(7, 300)

    same = tokens(False) == tokens(True) and after_other_token(False) == after_other_token(True)
    name = f"FastLlama {label} steps started ahead give the same tokens"
    report["checks"][name] = {"ok": same}
    print(f"{'ok  ' if same else 'FAIL'} {name}", flush=True)
    if not same:
        failures.append(name)


def check_token_mask(lm, embeds, first: int, label: str) -> None:
    """The captured step reads the token mask: all ones, every token is the plain argmax of the
    step's own logits (what the step chose before the mask existed, bit for bit); a restrictive
    mask, every token is the argmax over the allowed ones (prefill included)."""
    import numpy as np

    from ros2_nanovlm.engine.token_mask import words_allowing

    def follow(mask_words, overlapped: bool = False) -> tuple[bool, list[int]]:
        lm.set_token_mask(None)
        lm.prefill_logits(embeds[:299], 0)
        token, agree, tokens = first, True, []
        for step in range(24):
            if overlapped:  # the mask set while the step's layers run (two graphs)
                token = lm.decode_step(token, 299 + step, fill_mask=lambda: lm.set_token_mask(mask_words))
            else:
                lm.set_token_mask(mask_words)
                token = lm.decode_step(token, 299 + step)
            logits = lm.token_mask.apply(lm._logits.float())
            agree = agree and token == int(torch.argmax(logits))
            tokens.append(token)
        lm.set_token_mask(None)
        return agree, tokens

    free_agree, free_tokens = follow(None)
    allowed = np.random.default_rng(0).choice(lm.vocab_size, 40, replace=False)
    masked_agree, masked_tokens = follow(words_allowing(allowed.tolist(), lm.vocab_size))
    overlapped_agree, overlapped_tokens = follow(words_allowing(allowed.tolist(), lm.vocab_size), overlapped=True)
    lm.set_token_mask(words_allowing(allowed.tolist(), lm.vocab_size))
    prefill_token = lm.prefill(embeds[:299], 0)
    lm.set_token_mask(None)
    results = {
        f"FastLlama {label} all-ones mask: every token is the plain argmax": free_agree,
        f"FastLlama {label} restrictive mask: every token allowed and the best of them": masked_agree
        and set(masked_tokens) <= set(allowed.tolist())
        and prefill_token in set(allowed.tolist()),
        f"FastLlama {label} restrictive mask changes the tokens": masked_tokens != free_tokens,
        f"FastLlama {label} mask filled while the layers run: the same tokens": overlapped_agree
        and overlapped_tokens == masked_tokens,
    }
    for name, ok in results.items():
        report["checks"][name] = {"ok": ok}
        print(f"{'ok  ' if ok else 'FAIL'} {name}", flush=True)
        if not ok:
            failures.append(name)


def check_kernels() -> None:
    torch.manual_seed(0)
    for name, (n, k, gated) in {
        "qkv": (12288, 4096, False),
        "gate_up": (22016, 4096, True),
        "down": (4096, 11008, False),
    }.items():
        weight = torch.randn(n, k, device=DEVICE) * 0.02
        packed = quantize_int4(weight)
        x = torch.randn(k, device=DEVICE, dtype=torch.float16)
        reference = dequantize_int4(packed) @ x.float()
        if gated:
            reference = F.silu(reference[: n // 2]) * reference[n // 2 :]
        for config in ((1, 128, 1, 1, 0), (4, 256, 1, 1, 0), (8, 128, 2, 1, 0), (16, 128, 1, 1, 24)):
            out = kernels.w4_gemv(
                x, packed, out=torch.full_like(reference, float("nan")).half(), gated=gated, config=config
            )
            check(f"w4_gemv {name} {n}x{k} {config}", out, reference, 2e-3)
        for config in ((4, 128, 1, 2, 0), (8, 128, 1, 4, 24)) if not gated else ():
            partials = torch.full((config[3], n), float("nan"), device=DEVICE)
            kernels.w4_gemv_partials(x, packed, partials, config)
            check(f"w4_gemv_partials {name} {n}x{k} {config}", partials.sum(0), reference, 2e-3)
        scratch = torch.empty(n, k, device=DEVICE, dtype=torch.float16)
        check(f"w4_dequantize {name}", kernels.w4_dequantize(packed, scratch), dequantize_int4(packed), 1e-3)
        check(f"int4 round trip {name} (quantization error, informational)", dequantize_int4(packed), weight, 0.12)
    head = quantize_int8_rows(torch.randn(32064, 4096, device=DEVICE) * 0.02)
    x = torch.randn(4096, device=DEVICE, dtype=torch.float16)
    check("i8_gemv lm_head 32064x4096", kernels.i8_gemv(x, head), dequantize_int8_rows(head) @ x.float(), 2e-3)
    x = torch.randn(7, 4096, device=DEVICE, dtype=torch.float16)
    w = torch.randn(4096, device=DEVICE, dtype=torch.float16)
    reference = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)) * w.float()
    check("rmsnorm", kernels.rmsnorm(x, w, 1e-5), reference, 2e-3)
    for hq, hkv in ((32, 32), (32, 8)):
        d, t, length = 128, 1024, 700
        k_cache = torch.randn(hkv, t, d, device=DEVICE, dtype=torch.float16)
        v_cache = torch.randn(hkv, t, d, device=DEVICE, dtype=torch.float16)
        q = torch.randn(hq, d, device=DEVICE, dtype=torch.float16)
        out = torch.empty_like(q)
        kernels.decode_attention(q, k_cache, v_cache, torch.tensor([length], device=DEVICE, dtype=torch.int32), out)
        keys = k_cache[:, :length].repeat_interleave(hq // hkv, 0).float()
        values = v_cache[:, :length].repeat_interleave(hq // hkv, 0).float()
        reference = torch.softmax(q.float()[:, None] @ keys.transpose(1, 2) / d**0.5, -1) @ values
        check(f"decode_attention {hq}/{hkv} heads len {length}", out, reference[:, 0], 2e-3)


def measure_gemv_bandwidth() -> None:
    try:
        from torchao.quantization import Int4WeightOnlyConfig, quantize_
    except Exception as error:  # noqa: BLE001
        quantize_ = None
        report["torchao"] = f"not available: {error!r}"
    # Eight different matrices of each shape in turn, so the weights stream from memory as in a
    # decode step (one matrix alone would sit in the 50 MB L2 cache).
    copies = 8
    for name, (n, k) in LLAVA_7B_MATRICES.items():
        gated, split = name == "gate_up", name in ("o", "down")
        weights = [torch.randn(n, k, device=DEVICE, dtype=torch.float16) * 0.02 for _ in range(copies)]
        packed = [quantize_int4(weight) for weight in weights]
        x = torch.randn(k, device=DEVICE, dtype=torch.float16)
        partials = torch.zeros(4, n, device=DEVICE)

        def ours(config):
            for matrix in packed:
                if split:
                    kernels.w4_gemv_partials(x, matrix, partials[: config[3]], config)
                else:
                    kernels.w4_gemv(x, matrix, gated=gated, config=config)

        row = {}
        timings = {config: graph_time_us(lambda config=config: ours(config), calls=1, replays=5) / copies
                   for config in kernels.GEMV_CONFIGS if split or config[3] == 1}  # fmt: skip
        ranked = sorted(timings, key=timings.get)
        row["ours_w4_us"] = graph_time_us(lambda: ours(ranked[0]), calls=5) / copies
        row["ours_w4_config"] = ranked[0]
        row["ours_w4_top5"] = [(config, round(timings[config], 2)) for config in ranked[:5]]
        row["ours_w4_quick_best"] = min((timings[c], c) for c in kernels.QUICK_GEMV_CONFIGS if c in timings)
        row["ours_w4_GBps"] = packed[0].nbytes() / row["ours_w4_us"] / 1e3
        row["cublas_fp16_us"] = graph_time_us(lambda: [F.linear(x, weight) for weight in weights], calls=5) / copies
        row["cublas_fp16_GBps"] = n * k * 2 / row["cublas_fp16_us"] / 1e3
        if quantize_ is not None:
            try:
                linears = []
                for _ in range(copies):
                    linear = torch.nn.Linear(k, n, bias=False, device=DEVICE, dtype=torch.bfloat16)
                    quantize_(linear, Int4WeightOnlyConfig(group_size=128))
                    linears.append(linear)
                xb = x.to(torch.bfloat16)[None]
                row["torchao_int4_us"] = graph_time_us(lambda: [linear(xb) for linear in linears], calls=5) / copies
                row["torchao_int4_GBps"] = n * k * 0.5 * (1 + 4 / 64) / row["torchao_int4_us"] / 1e3
            except Exception as error:  # noqa: BLE001
                row["torchao_int4"] = f"failed: {error!r}"[:300]
        report["gemv_bandwidth"][name] = row
        print(name, row, flush=True)


def check_w4_gemm() -> None:
    """The 4-bit prefill GEMM against dequantize-then-matmul in float32 at the 7B's shapes: token
    counts that are and are not multiples of the blocks, each with the table's configuration;
    the output starts as NaN, so an unwritten element fails."""
    torch.manual_seed(1)
    for name, (n, k) in LLAVA_7B_MATRICES.items():
        packed = quantize_int4(torch.randn(n, k, device=DEVICE) * 0.02)
        dense = dequantize_int4(packed)
        for tokens in (1, 16, 100, 623, 2048):
            x = torch.randn(tokens, k, device=DEVICE, dtype=torch.float16)
            out = torch.full((tokens, n), float("nan"), device=DEVICE, dtype=torch.float16)
            w4_gemm.w4_gemm(x, packed, out)
            config = w4_gemm.w4_gemm_config(tokens)
            check(f"w4_gemm {name} {n}x{k} M={tokens} {config}", out, x.float() @ dense.T, 2e-3)
        x = torch.randn(200, k, device=DEVICE, dtype=torch.float16)
        check(f"w4_gemm {name} M=200 float32 dequantization (the interpreter's path)",
              w4_gemm.w4_gemm(x, packed, half2=False), x.float() @ dense.T, 2e-3)  # fmt: skip
        for config in STREAM_K_CHECKS:
            for tokens in (200, 640):
                x = torch.randn(tokens, k, device=DEVICE, dtype=torch.float16)
                out = torch.full((tokens, n), float("nan"), device=DEVICE, dtype=torch.float16)
                w4_gemm.w4_gemm(x, packed, out, config=config)
                check(f"w4_gemm {name} M={tokens} stream-K {config}", out, x.float() @ dense.T, 2e-3)
                again = w4_gemm.w4_gemm(x, packed, config=config)
                flags = w4_gemm._workspaces[DEVICE if DEVICE.index is not None else torch.device("cuda", 0)][1]
                same = bool(torch.equal(again, out)) and not bool(flags.any())
                label = f"w4_gemm {name} M={tokens} stream-K {config}: same bits again, flags reset"
                report["checks"][label] = {"ok": same}
                print(f"{'ok  ' if same else 'FAIL'} {label}", flush=True)
                if not same:
                    failures.append(label)
        del packed, dense


def stream_k_smoke() -> None:
    """A first stream-K launch on this GPU, run in its own process under a time limit before the
    checks (a finisher that waited forever would hang them): exit 0 when it finishes and agrees."""
    torch.manual_seed(4)
    for n, k, tokens in ((4096, 4096, 640), (12288, 4096, 623), (4096, 11008, 200)):
        packed = quantize_int4(torch.randn(n, k, device=DEVICE) * 0.02)
        x = torch.randn(tokens, k, device=DEVICE, dtype=torch.float16)
        for config in STREAM_K_CHECKS:
            check(f"stream-K smoke {n}x{k} M={tokens} {config}", w4_gemm.w4_gemm(x, packed, config=config),
                  x.float() @ dequantize_int4(packed).T, 2e-3)  # fmt: skip
    torch.cuda.synchronize()
    sys.exit(1 if failures else 0)


def random_int4(n: int, k: int, group: int = 128) -> Int4Weight:
    """Random 4-bit words and plausible scales (weights within +-0.03): speed does not depend on
    the values, and the quantizer would take minutes for a whole 7B model."""
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=DEVICE)
    scales = (torch.rand(n, k // group, device=DEVICE) * 0.002 + 0.003).half()
    return Int4Weight(packed, scales, (-7.5 * scales.float()).half(), group)


def precompile_w4_gemm(configs, ks, half2: bool = True) -> None:
    """Build the GEMM for each (config, K) in threads, so the timings below do not wait for
    Triton one kernel at a time (a failure here is only reported: the launch builds it again)."""

    def build(job):
        (block_n, block_m, warps, stages, programs), k = job
        x = torch.empty(16, k, device=DEVICE, dtype=torch.float16)
        weight = random_int4(64, k)
        out = torch.empty(16, 64, device=DEVICE, dtype=torch.float16)
        arguments = [x, weight.packed.view(torch.int32), weight.scales, weight.offsets, out]
        constants = dict(K=k, GROUP=128, BLOCK_N=block_n, BLOCK_M=block_m, HALF2=half2, num_warps=warps,
                         num_stages=stages, grid=(1,), **kernels._launch_options(DEVICE))  # fmt: skip
        if programs:
            shares, flags = torch.empty(1, device=DEVICE), torch.zeros(1, dtype=torch.int32, device=DEVICE)
            w4_gemm._w4_gemm_stream_k_kernel.warmup(*arguments, shares, flags, 16, 64, INTERPRET=False, **constants)
        else:
            w4_gemm._w4_gemm_kernel.warmup(*arguments, 16, 64, **constants)

    started = time.perf_counter()
    jobs = [(config, k) for config in configs for k in ks]
    with ThreadPoolExecutor(max(1, min(16, os.cpu_count() or 1))) as pool:
        errors = [repr(error)[:200] for error in pool.map(_capture_error(build), jobs) if error]
    report.setdefault("w4_gemm_precompile", []).append(
        {"kernels": len(jobs), "seconds": time.perf_counter() - started, "errors": errors[:5]}
    )
    print(f"precompiled {len(jobs)} w4_gemm kernels in {time.perf_counter() - started:.1f} s", errors[:2], flush=True)


def _capture_error(function):
    def run(job):
        try:
            function(job)
        except Exception as error:  # noqa: BLE001
            return error
        return None

    return run


def time_w4_gemm(sweep: bool) -> None:
    """Microseconds per product at the 7B's four shapes and PREFILL_TOKENS tokens: the 4-bit GEMM
    at the table's configuration, cuBLAS fp16, and the old 4-bit path (dequantize the matrix
    into a buffer, then cuBLAS). Four copies of each matrix in turn, so the weights stream from
    memory as in a prefill (one would sit in the L2 cache). --w4-sweep also times every
    candidate configuration whose token block suits the count (its best goes to the table)."""
    copies = 4
    half = torch.float16
    table_configs = {config for _, config in w4_gemm.W4_GEMM_TABLE}
    precompile_w4_gemm(sorted(set(w4_gemm.W4_GEMM_CANDIDATES) | table_configs if sweep else table_configs),
                       sorted({k for _, k in LLAVA_7B_MATRICES.values()}))  # fmt: skip
    rows = {}
    for name, (n, k) in LLAVA_7B_MATRICES.items():
        torch.manual_seed(2)
        packed = [random_int4(n, k) for _ in range(copies)]
        dense = [torch.randn(n, k, device=DEVICE, dtype=half) * 0.02 for _ in range(copies)]
        scratch = torch.empty(n, k, device=DEVICE, dtype=half)
        for tokens in PREFILL_TOKENS:
            x = torch.randn(tokens, k, device=DEVICE, dtype=half)
            out = torch.empty(tokens, n, device=DEVICE, dtype=half)

            def ours(config=None, x=x, out=out, packed=packed):
                for weight in packed:
                    w4_gemm.w4_gemm(x, weight, out, config=config)

            def old(x=x, out=out, packed=packed, scratch=scratch):
                for weight in packed:
                    torch.mm(x, kernels.w4_dequantize(weight, scratch).t(), out=out)

            def cublas(x=x, out=out, dense=dense):
                for weight in dense:
                    torch.mm(x, weight.t(), out=out)

            row = {
                "w4_gemm_us": graph_time_us(ours, calls=1, replays=11) / copies,
                "w4_gemm_config": w4_gemm.w4_gemm_config(tokens),
                "cublas_fp16_us": graph_time_us(cublas, calls=1, replays=11) / copies,
                "dequantize_cublas_us": graph_time_us(old, calls=1, replays=11) / copies,
            }
            row["w4_gemm_over_cublas"] = row["w4_gemm_us"] / row["cublas_fp16_us"]
            row["w4_gemm_TFLOPs"] = 2 * tokens * n * k / row["w4_gemm_us"] / 1e6
            if sweep:
                bucket = max(16, 1 << (tokens - 1).bit_length())
                timings = {}
                for config in w4_gemm.W4_GEMM_CANDIDATES:
                    if not min(bucket, 256) // 4 <= config[1] <= bucket or (config[4] and tokens < 64):
                        continue
                    try:
                        timings[config] = graph_time_us(lambda config=config: ours(config), calls=1, replays=7) / copies
                    except Exception as error:  # noqa: BLE001 - e.g. out of shared memory on a smaller GPU
                        timings[config] = float("inf")
                        print("w4_gemm", config, "failed:", repr(error)[:200], flush=True)
                ranked = sorted(timings, key=timings.get)
                row["sweep_us"] = {str(config): round(value, 2) for config, value in timings.items()}
                row["sweep_top5"] = [(config, round(timings[config], 2)) for config in ranked[:5]]
                row["sweep_best_over_table"] = timings[ranked[0]] / row["w4_gemm_us"]
                if tokens == PREFILL_TOKENS[-2]:  # the same for the interpreter's float32 dequantization
                    row["float32_dequantization_us"] = (
                        graph_time_us(lambda x=x, out=out, packed=packed: [w4_gemm.w4_gemm(x, w, out, half2=False)
                                                                           for w in packed], calls=1, replays=7)
                        / copies
                    )  # fmt: skip
            rows[f"{name} {n}x{k} M={tokens}"] = row
            print("w4_gemm", name, tokens, {key: value for key, value in row.items() if not key.startswith("sweep")},
                  row.get("sweep_top5", "")[:3], flush=True)  # fmt: skip
        del packed, dense, scratch
        torch.cuda.empty_cache()
    report["w4_gemm_per_matrix_us"] = rows
    if sweep:
        table_from_sweep(rows)


def table_from_sweep(rows: dict) -> None:
    """For each swept token count, the configuration with the least time summed over the four
    matrices (a layer's products); the table in w4_gemm.py is replaced by these in this process,
    so the prefill timings below run them (copy the printed table into w4_gemm.py)."""
    table = []
    bounds = {16: 16, 64: 64, 256: 256, 640: 1024, 2048: 1 << 62}
    for tokens in PREFILL_TOKENS:
        sums: dict[str, float] = {}
        for key, row in rows.items():
            if key.endswith(f" M={tokens}"):
                for config, us in row["sweep_us"].items():
                    sums[config] = sums.get(config, 0.0) + us
        best = min(sums, key=sums.get)
        table.append((bounds[tokens], tuple(int(v) for v in best.strip("()").split(","))))
        report.setdefault("w4_gemm_sweep_layer_us", {})[str(tokens)] = sorted(
            (round(us, 1), config) for config, us in sums.items()
        )[:5]
    w4_gemm.W4_GEMM_TABLE[:] = table
    report["w4_gemm_table_from_sweep"] = table
    print("W4_GEMM_TABLE from the sweep:", table, flush=True)
    for tokens in PREFILL_TOKENS:  # the per-matrix figures at the new table's configurations
        config = w4_gemm.w4_gemm_config(tokens)
        for key, row in rows.items():
            if key.endswith(f" M={tokens}"):
                row["w4_gemm_table_config"] = config
                row["w4_gemm_table_us"] = row["sweep_us"][str(config)]
                row["w4_gemm_table_over_cublas"] = row["w4_gemm_table_us"] / row["cublas_fp16_us"]


def synthetic_fast_llama(arch: str, quantize: bool, max_tokens: int = 1024) -> FastLlama:
    """FastLlama with random weights of a real architecture (bench/archs.py), made directly on
    the GPU: 4-bit weights as random words (random_int4), the vocabulary int8 as from_hf makes it."""
    from archs import TEXT_CONFIGS
    from transformers import LlamaConfig

    config = LlamaConfig(**TEXT_CONFIGS[arch], max_position_embeddings=4096, rms_norm_eps=1e-5)
    hidden, intermediate = config.hidden_size, config.intermediate_size
    qkv_rows = (config.num_attention_heads + 2 * config.num_key_value_heads) * (hidden // config.num_attention_heads)
    half = torch.float16

    def linear(n, k):
        return random_int4(n, k) if quantize else torch.randn(n, k, device=DEVICE, dtype=half) * 0.02

    def vocabulary():
        table = torch.randn(config.vocab_size, hidden, device=DEVICE, dtype=half) * 0.02
        return quantize_int8_rows(table) if quantize else table

    def layer():
        norm = torch.ones(hidden, device=DEVICE, dtype=half)
        return LayerWeights(norm, linear(qkv_rows, hidden), linear(hidden, hidden), norm.clone(),
                            linear(2 * intermediate, hidden), linear(hidden, intermediate))  # fmt: skip

    layers = [layer() for _ in range(config.num_hidden_layers)]
    return FastLlama(config, embed_tokens=vocabulary(), final_norm=torch.ones(hidden, device=DEVICE, dtype=half),
                     lm_head=vocabulary(), layers=layers, max_tokens=max_tokens, device=DEVICE)  # fmt: skip


def measure_prefill(tokens: int = 623, repeats: int = 10) -> dict:
    """prefill_ms as engine_bench measures it (FastLlama.prefill of a 623-token prompt from an
    empty cache, host-timed, replayed as a CUDA graph from the second call on; median of
    `repeats` after warm-up), for the 7B and 2.7B shapes: fp16 weights, 4-bit with the old path
    (dequantize + cuBLAS) and 4-bit with the GEMM whatever the token count (the default takes
    the old path above w4_gemm.W4_GEMM_MAX_TOKENS), the 4-bit paths on one model."""
    results = report.setdefault("prefill_w4", {})
    for arch in ("llava-1.5-7b", "llava-2.7b"):
        row = {}
        for quantize in (False, True):
            torch.manual_seed(3)
            lm = synthetic_fast_llama(arch, quantize)
            lm.capture(tune=False)
            embeds = torch.randn(tokens, lm.hidden, device=DEVICE, dtype=torch.float16) * 0.02

            def prefill_ms(lm=lm, embeds=embeds) -> float:
                for _ in range(3):  # the second sighting of the key captures its graph
                    lm.prefill(embeds, 0)
                times = []
                for _ in range(repeats):
                    torch.cuda.synchronize()
                    began = time.perf_counter()
                    lm.prefill(embeds, 0)
                    times.append((time.perf_counter() - began) * 1000)
                return statistics.median(times)

            if not quantize:
                row["fp16_ms"] = prefill_ms()
            else:
                row["int4_default_ms"] = prefill_ms()  # the old path at 623 tokens, by the threshold
                limit = w4_gemm.W4_GEMM_MAX_TOKENS
                w4_gemm.W4_GEMM_MAX_TOKENS = 1 << 62
                lm.set_w4_gemm(True)  # drops the graphs captured with the other choice
                row["int4_w4_gemm_ms"] = prefill_ms()
                lm.set_w4_gemm(False)
                row["int4_dequantize_cublas_ms"] = prefill_ms()
                lm.set_w4_gemm(True)
                row["int4_w4_gemm_again_ms"] = prefill_ms()  # the run-to-run spread, on the same model
                w4_gemm.W4_GEMM_MAX_TOKENS = limit
                row["w4_gemm_disabled"] = lm.w4_gemm_disabled
                name = f"prefill {arch} int4 ran the 4-bit GEMM (no fallback)"
                report["checks"][name] = {"ok": not lm.w4_gemm_disabled, "reason": lm.w4_gemm_disabled}
                print(f"{'ok  ' if not lm.w4_gemm_disabled else 'FAIL'} {name}", flush=True)
                if lm.w4_gemm_disabled:
                    failures.append(name)
                row["graph_replays"] = lm._prefill_graphs.replays
                row["w4_gemm_table"] = list(w4_gemm.W4_GEMM_TABLE)
            del lm, embeds, prefill_ms
            gc.collect()  # the prefill graphs hold the model's body: a cycle
            torch.cuda.empty_cache()
        row["prompt_tokens"] = tokens
        results[arch] = row
        print("prefill", arch, row, flush=True)
    return results


def measure_gemlite() -> None:
    """GemLite (a maintained library of Triton low-bit kernels) on the same 4-bit shapes, batch 1:
    the candidate to replace our GEMV if it streams weights faster."""
    try:
        import gemlite
        from gemlite import DType, GemLiteLinear
    except Exception as error:  # noqa: BLE001
        report["gemlite"] = f"not available: {error!r}"
        return
    config = Path(gemlite.__file__).parent / "configs" / "h100.json"
    if config.is_file():
        gemlite.load_config(str(config))
    rows = {}
    for name, (n, k) in LLAVA_7B_MATRICES.items():
        try:
            q = torch.randint(0, 16, (n, k), device=DEVICE, dtype=torch.uint8)
            scales = torch.rand(n, k // 128, device=DEVICE, dtype=torch.float16) * 0.01
            zeros = torch.full((n, k // 128), 8.0, device=DEVICE, dtype=torch.float16)
            linear = GemLiteLinear(4, group_size=128, in_features=k, out_features=n,
                                   input_dtype=DType.FP16, output_dtype=DType.FP16)  # fmt: skip
            linear.pack(q, scales, zeros, None)
            x = torch.randn(1, k, device=DEVICE, dtype=torch.float16)
            reference = ((q.float() - 8.0) * scales.float().repeat_interleave(128, 1)) @ x[0].float()
            error = relative_error(linear(x)[0], reference)
            us = graph_time_us(lambda: linear(x))
            rows[name] = {"us": us, "GBps": n * k * 0.5 * (1 + 4 / 64) / us / 1e3, "relative_error": error}
        except Exception as error:  # noqa: BLE001
            rows[name] = f"failed: {error!r}"[:300]
        print("gemlite", name, rows[name], flush=True)
    report["gemlite"] = rows


def check_fast_llama() -> None:
    """FastLlama (fp16 and 4-bit) against transformers' Llama on a small random model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                         num_key_value_heads=4, vocab_size=4096, max_position_embeddings=2048)  # fmt: skip
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = LlamaForCausalLM._from_config(config, dtype=torch.float16).eval()
    ids = torch.randint(0, 4096, (1, 300), device=DEVICE)
    with torch.inference_mode():
        reference = model(ids).logits[0].float()
        for quantize in (False, True):
            lm = FastLlama.from_hf(model.model, model.lm_head, max_tokens=512, quantize=quantize, device=DEVICE)
            lm.capture()
            label = "int4" if quantize else "fp16"
            embeds = lm.embed(ids[0])
            # whole prompt at once, then the same prompt in two pieces (prefix reuse)
            full = lm.prefill_logits(embeds, 0)
            lm.prefill_logits(embeds[:200], 0)
            split = lm.prefill_logits(embeds[200:], 200)
            check(f"FastLlama {label} prefill (split at 200) vs whole", split, full, 2e-3)
            if not quantize:
                check("FastLlama fp16 prefill vs transformers", full, reference[-1], 5e-3)
            # decode step (CUDA graph) at position 299 vs prefill of all 300 tokens
            lm.prefill_logits(embeds[:299], 0)
            lm.decode_step(int(ids[0, 299]), 299)
            check(f"FastLlama {label} graph decode vs prefill", lm._logits.float(), full, 5e-3)
            # two more steps keep following the prefill path
            token = lm.decode_step(int(torch.argmax(full)), 300)
            both = torch.cat([ids[0], torch.argmax(full).view(1)])
            again = lm.prefill_logits(lm.embed(both), 0)
            check(f"FastLlama {label} second graph step vs prefill", lm._logits.float(), again, 5e-3)
            check_steps_started_ahead(lm, embeds, int(ids[0, 299]), label)
            check_token_mask(lm, embeds, int(ids[0, 299]), label)
            report["checks"][f"FastLlama {label} next token agrees"] = {"ok": token == int(torch.argmax(again))}
            # The prompt of 299 tokens was the second at (start 0, 320 padded): it ran as a
            # captured graph, as did the 301 tokens after it; 300 again replays that graph.
            graph_full = lm.prefill_logits(embeds, 0)
            check(f"FastLlama {label} prefill graph (padded) vs eager", graph_full, full, 2e-3)
            # Follow-up turns: one graph for every start (prefill_graphs.ANY_START), captured on
            # the second 20-token turn and replayed on the third, each against the eager body.
            follow_up_replays = 0
            for turn_start in (250, 260, 275):
                turn = embeds[turn_start : turn_start + 20]
                lm.prefill_logits(embeds[:turn_start], 0)
                eager = lm._prefill_body(turn.half(), turn_start, torch.tensor([19], device=DEVICE))
                lm.prefill_logits(embeds[:turn_start], 0)
                before = lm._prefill_graphs.replays
                got = lm.prefill_logits(turn, turn_start)
                follow_up_replays += lm._prefill_graphs.replays - before
                check(
                    f"FastLlama {label} follow-up at {turn_start} (one graph for every start) vs eager",
                    got,
                    eager,
                    2e-3,
                )
            report["checks"][f"FastLlama {label} follow-up graph replayed"] = {"ok": follow_up_replays >= 2,
                                                                            "replays": follow_up_replays}  # fmt: skip
            replays = lm._prefill_graphs.replays
            report["checks"][f"FastLlama {label} prefill graphs replayed"] = {"ok": replays >= 3, "replays": replays,
                                                                           "disabled": lm._prefill_graphs.disabled_reason}  # fmt: skip


def profile_decode() -> None:
    """Where a 7B 4-bit decode step's time goes: the whole graph, the Python step, and graphs of
    each kernel kind repeated as often as one step runs it."""
    from transformers import LlamaConfig

    from ros2_nanovlm.engine.cuda.fast_llama import LayerWeights

    config = LlamaConfig(**{"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                            "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064})  # fmt: skip
    torch.manual_seed(0)
    half = torch.float16

    def int4(n, k):
        return quantize_int4(torch.randn(n, k, device=DEVICE, dtype=half) * 0.02)

    layers = [
        LayerWeights(
            torch.ones(4096, device=DEVICE, dtype=half),
            int4(12288, 4096),
            int4(4096, 4096),
            torch.ones(4096, device=DEVICE, dtype=half),
            int4(22016, 4096),
            int4(4096, 11008),
        )
        for _ in range(32)
    ]
    lm = FastLlama(config, embed_tokens=quantize_int8_rows(torch.randn(32064, 4096, device=DEVICE, dtype=half) * 0.02),
                   final_norm=torch.ones(4096, device=DEVICE, dtype=half),
                   lm_head=quantize_int8_rows(torch.randn(32064, 4096, device=DEVICE, dtype=half) * 0.02),
                   layers=layers, max_tokens=1024, device=DEVICE)  # fmt: skip
    lm.capture()
    profile = {
        "gemv_configs": {str(k): v for k, v in lm._gemv_configs.items()},
        "partial_configs": dict(lm._partial_configs),
    }
    profile["graph_replay_ms"] = replay_ms(lm)
    if kernels.pdl_enabled(DEVICE):  # the same step captured without programmatic dependent launch
        saved_k, saved_v = lm.k_cache.clone(), lm.v_cache.clone()

        def one_step():
            lm.k_cache.copy_(saved_k)
            lm.v_cache.copy_(saved_v)
            lm._token.fill_(7)
            lm._position.fill_(650)
            lm._length.fill_(651)
            lm._graph.replay()
            return lm._logits.float().clone()

        logits_with_pdl = one_step()
        os.environ["NANOVLM_PDL"] = "0"
        kernels._pdl_on_cuda_device.cache_clear()
        lm.capture()
        profile["graph_replay_without_pdl_ms"] = replay_ms(lm)
        without_pdl = one_step()
        # no atomics anywhere: the same kernels must give the same bits, launched either way
        same = bool(torch.equal(logits_with_pdl, without_pdl)) and bool(torch.equal(without_pdl, one_step()))
        report["checks"]["decode step: same bits with and without PDL, and on a repeat"] = {"ok": same}
        print(f"{'ok  ' if same else 'FAIL'} decode step bits with/without PDL and repeated", flush=True)
        if not same:
            failures.append("decode step determinism")
        del saved_k, saved_v
        os.environ["NANOVLM_PDL"] = "1"
        kernels._pdl_on_cuda_device.cache_clear()
        lm.capture()
    import time as _time

    torch.cuda.synchronize()
    began = _time.perf_counter()
    token = 5
    for step in range(100):
        token = lm.decode_step(token, 600 + step)
    profile["decode_step_ms"] = (_time.perf_counter() - began) * 1000 / 100
    torch.cuda.synchronize()
    began = _time.perf_counter()
    for step in range(100):
        token = lm.decode_step(token, 600 + step, more=step < 99)
    profile["decode_step_started_ahead_ms"] = (_time.perf_counter() - began) * 1000 / 100
    q = torch.randn(32, 128, device=DEVICE, dtype=half)
    out = torch.empty_like(q)
    profile["attention_x32_us"] = 32 * graph_time_us(
        lambda: kernels.decode_attention(q, lm.k_cache[0], lm.v_cache[0], lm._length, out)
    )
    x = torch.randn(4096, device=DEVICE, dtype=half)
    profile["rmsnorm_x65_us"] = 65 * graph_time_us(lambda: kernels.rmsnorm(x, layers[0].input_norm, 1e-5, out=lm._h))
    qkv = torch.randn(1, 12288, device=DEVICE, dtype=half)
    rotated_q = torch.empty(1, 32, 128, device=DEVICE, dtype=half)
    profile["rope_x32_us"] = 32 * graph_time_us(lambda: kernels.rope_and_cache(
        qkv, lm._position, lm.inv_freq, 1.0, lm.k_cache[0], lm.v_cache[0], rotated_q, 32, 32))  # fmt: skip
    profile["lm_head_int8_us"] = graph_time_us(lambda: lm._logits_of(x, out=lm._logits))
    fp16_head = torch.randn(32064, 4096, device=DEVICE, dtype=half)
    profile["lm_head_fp16_us"] = graph_time_us(lambda: torch.matmul(fp16_head, x, out=lm._logits))
    gemv_us = {}
    for name, gated in (("qkv", False), ("o", False), ("gate_up", True), ("down", False)):
        weights = [getattr(layer, name) for layer in layers]
        inputs = x if weights[0].in_features == 4096 else lm._act
        if name in ("o", "down"):

            def every_layer(weights=weights, inputs=inputs, name=name):
                for weight in weights:
                    lm._gemv_partials(inputs, weight, name)
        else:

            def every_layer(weights=weights, inputs=inputs, gated=gated):
                for weight in weights:
                    lm._gemv(inputs, weight, lm._qkv if not gated else lm._act, gated=gated)

        gemv_us[name] = graph_time_us(every_layer, calls=1)
    profile["gemv_x32_us"] = gemv_us
    profile["gemv_x32_total_us"] = sum(gemv_us.values())
    profile["gemv_x32_GBps"] = sum(layer.qkv.nbytes() + layer.o.nbytes() + layer.gate_up.nbytes() + layer.down.nbytes()
                                   for layer in layers) / profile["gemv_x32_total_us"] / 1e3  # fmt: skip
    profile["weight_bytes_per_token"] = lm.weight_bytes_per_token()
    embeds = torch.randn(623, 4096, device=DEVICE, dtype=half) * 0.02
    last = torch.tensor([622], device=DEVICE)
    profile["prefill_623_eager_ms"] = graph_free_ms(lambda: lm._prefill_body(embeds, 0, last))
    lm.prefill(embeds, 0)
    lm.prefill(embeds, 0)  # the second sighting of (0, 640) captures its graph
    profile["prefill_623_graph_ms"] = graph_free_ms(lambda: lm.prefill(embeds, 0))
    # A 20-token follow-up turn after the 623-token prompt: eager, then as the one graph that
    # serves follow-ups at every start (captured on its second sighting).
    turn, turn_last = embeds[:20], torch.tensor([19], device=DEVICE)
    profile["follow_up_20_eager_ms"] = graph_free_ms(lambda: lm._prefill_body(turn, 623, turn_last))
    lm.prefill(turn, 623)
    lm.prefill(turn, 623)
    profile["follow_up_20_graph_ms"] = graph_free_ms(lambda: lm.prefill(turn, 623))
    report["decode_profile_7b_int4"] = profile
    print("decode profile", profile, flush=True)


def replay_ms(lm, replays: int = 50) -> float:
    """Milliseconds of one replay of the captured decode step, from position 650."""
    lm._position.fill_(650)
    lm._length.fill_(651)
    return graph_free_ms(lm._graph.replay, repeats=replays)


def graph_free_ms(function, repeats: int = 5) -> float:
    function()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        function()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true", help="time every GEMV launch configuration")
    parser.add_argument("--w4-sweep", action="store_true", help="time every 4-bit GEMM launch configuration")
    parser.add_argument("--only-w4", action="store_true", help="only the 4-bit GEMM's checks and timings")
    parser.add_argument("--stream-k-smoke", action="store_true", help="one stream-K check, then exit")
    results = Path(__file__).resolve().parent / "results"
    parser.add_argument("--out", default=str(results / "check-gpu.json"))
    parser.add_argument("--prefill-out", default=str(results / "prefill-w4.json"))
    args = parser.parse_args()
    if args.stream_k_smoke:
        stream_k_smoke()
    report["device"] = torch.cuda.get_device_name()
    report["stream_k"] = "off (NANOVLM_W4_STREAM_K=0)" if os.environ.get("NANOVLM_W4_STREAM_K") == "0" else "on"
    report["versions"] = {"torch": torch.__version__, "triton": __import__("triton").__version__}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after each stage: a run cut off keeps what it measured
        Path(args.out).write_text(json.dumps(report, indent=2))
        if "prefill_w4" in report:
            prefill = {"device": report["device"], **report["versions"], "prefill_ms": report["prefill_w4"],
                       "per_matrix_us": report.get("w4_gemm_per_matrix_us"), "w4_gemm_table": w4_gemm.W4_GEMM_TABLE,
                       "checks": {name: value for name, value in report["checks"].items() if name.startswith("w4_gemm ")
                                  or "4-bit GEMM" in name}}  # fmt: skip
            Path(args.prefill_out).write_text(json.dumps(prefill, indent=2))

    check_w4_gemm()
    time_w4_gemm(args.w4_sweep)
    save()
    measure_prefill()
    save()
    if not args.only_w4:
        check_kernels()
        check_fast_llama()
        profile_decode()
        measure_gemlite()
    if args.sweep:
        measure_gemv_bandwidth()
    save()
    print("FAILED: " + ", ".join(failures) if failures else "all checks passed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
