"""bench/llama_cpp: the random GGUFs' tensor types and bytes, and the merge of llama-bench figures.

The GPU run itself (bench/llama_cpp/run_on_gpu.sh) is not CI's; check_types.py compares the type
plan with llama-quantize when a llama.cpp build is at hand. These tests pin what the merged
figures mean without one."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("gguf")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench" / "llama_cpp"))

import make_gguf
import merge_results


def counts(plan):
    types = [qtype.name for _, _, qtype in plan]
    return {name: types.count(name) for name in set(types)}


def test_type_plans_follow_llama_quantize_for_the_7b_shape():
    config = make_gguf.text_configs()["llava-1.5-7b"]
    assert counts(make_gguf.tensor_plan(config, "q4_0")) == {"F32": 65, "Q4_0": 225, "Q6_K": 1}
    # Q4_K_M: output, and attn_v / ffn_down of 16 of the 32 layers, in Q6_K
    assert counts(make_gguf.tensor_plan(config, "q4_k_m")) == {"F32": 65, "Q4_K": 193, "Q6_K": 33}


def test_written_file_reads_back_with_the_planned_types(tmp_path):
    path = tmp_path / "tiny.gguf"
    make_gguf.write_gguf(path, "tiny", make_gguf.TINY, "q4_k_m")
    info = make_gguf.file_info(path)
    plan = make_gguf.tensor_plan(make_gguf.TINY, "q4_k_m")
    assert info["types_by_tensor"] == {name: qtype.name for name, _, qtype in plan}
    embedding = 1000 * 256 // 256 * 144  # vocab rows of Q4_K blocks, not read whole per token
    assert info["weight_bytes_per_token"] == info["tensor_bytes"] - embedding


def test_merge_takes_the_best_variant_and_ratios_against_ours():
    def record(fa, ubatch, n_prompt, n_gen, depth, ts):
        return {"model_filename": "/m/a-q4_0.gguf", "flash_attn": fa, "n_ubatch": ubatch, "n_prompt": n_prompt,
                "n_gen": n_gen, "n_depth": depth, "avg_ts": ts, "samples_ts": [ts] * 5}  # fmt: skip

    records = [record(0, 512, 623, 0, 0, 10000.0), record(1, 512, 623, 0, 0, 20000.0),
               record(1, 1024, 623, 0, 0, 25000.0), record(0, 512, 0, 128, 623, 300.0),
               record(1, 512, 0, 128, 623, 250.0), record(1, 512, 0, 128, 0, 320.0)]  # fmt: skip
    info = {"a-q4_0.gguf": {"arch": "a", "type": "q4_0", "weight_bytes_per_token": 4.8e9, "file_bytes": 5e9,
                            "tensor_types": {}}}  # fmt: skip
    engine = {
        "peak_bandwidth_bytes_s": 4.8e12,
        "archs": {"a": {"ours_int4": {"decode_tok_s": 600.0, "prefill_ms": 20.0}}},
    }
    merge_results.merge({"records": records, "gguf_info": info}, engine)
    mode = engine["archs"]["a"]["llama_cpp_q4_0"]
    assert mode["prefill_ms"] == pytest.approx(623000 / 25000.0)
    assert (mode["prefill_flash_attn"], mode["prefill_ubatch"]) == (1, 1024)
    assert (mode["decode_tok_s"], mode["decode_flash_attn"]) == (300.0, 0)  # after 623 tokens of context
    assert mode["decode_tok_s_depth0"] == 320.0
    assert mode["bandwidth_fraction"] == pytest.approx(0.3)
    assert mode["by_flash_attn"]["fa0"]["prefill_ms"] == pytest.approx(62.3)
    ratio = engine["archs"]["a"]["speedup_ours_int4_over_llama_cpp_best"]
    assert ratio["decode_tok_s"] == pytest.approx(2.0)
    assert ratio["prefill_ms"] == pytest.approx(623000 / 25000.0 / 20.0)
