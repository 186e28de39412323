"""GPU checks before the benchmark: kernels against float32 references at real shapes, the
4-bit GEMV's bandwidth against cuBLAS fp16 and torchao int4, and FastLlama against transformers.

    python bench/check_gpu.py [--out results/check-gpu.json]
Exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ros2_nanovlm.engine.cuda import kernels
from ros2_nanovlm.engine.cuda.fast_llama import FastLlama, graph_time_us
from ros2_nanovlm.engine.quant.int4 import dequantize_int4, quantize_int4
from ros2_nanovlm.engine.quant.int8 import dequantize_int8_rows, quantize_int8_rows

DEVICE = torch.device("cuda")
# (rows, columns) of the 7B's linear layers, as FastLlama fuses them
LLAVA_7B_MATRICES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}
failures: list[str] = []
report: dict = {"checks": {}, "gemv_bandwidth": {}}


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
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "check-gpu.json"))
    args = parser.parse_args()
    report["device"] = torch.cuda.get_device_name()
    check_kernels()
    check_fast_llama()
    profile_decode()
    measure_gemlite()
    if "--sweep" in sys.argv:
        measure_gemv_bandwidth()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print("FAILED: " + ", ".join(failures) if failures else "all checks passed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
