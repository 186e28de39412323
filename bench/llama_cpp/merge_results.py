"""Merge llama.cpp's llama-bench figures into the engine benchmark's results, as modes of each arch.

    python3 bench/llama_cpp/merge_results.py DIR_OR_FILE [--engine bench/results/engine-H200.json]
        [--out FILE] [--summary FILE] [--save bench/results/llama-cpp-H200.json] [--no-markdown]

DIR_OR_FILE: the files run_on_gpu.sh left in $OUT (llama_bench.jsonl, gguf_info.json,
VERSION.json), or a file that --save wrote earlier, so the merge can be redone after
engine_bench.py has rewritten engine-H200.json. --out defaults to --engine (in place); the
.md beside it is rewritten with engine_bench.markdown_table unless --no-markdown.

For each architecture, modes llama_cpp_q4_0 and llama_cpp_q4_k_m with our keys:
  prefill_ms          623 tokens from an empty cache: 623000 / llama-bench's pp t/s (its mean
                      over the repetitions), the best of flash attention off/on and of
                      ubatch 512/1024 (ours prefills the 623 tokens in one pass)
  decode_tok_s        llama-bench's tg128 t/s after 623 tokens of context (-d 623), as ours
                      decodes after the 623-token prompt; the best of flash attention off/on
  decode_tok_s_depth0 the same from an empty context (llama-bench's plain tg128)
  bandwidth_fraction  weight_bytes_per_token * decode_tok_s / peak bandwidth, as ours; the bytes
                      are the GGUF's tensor sizes without token_embd.weight (one row per token)
  by_flash_attn       both variants' figures; *_flash_attn and prefill_ubatch: which one won
and speedup_ours_int4_over_llama_cpp_best: ours_int4 against the best llama.cpp figure of that
arch (decode_tok_s: ours / theirs; prefill_ms: theirs / ours), when ours_int4 is in the file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results"
PROMPT, GEN, DEPTH = 623, 128, 623
KEPT = ("flash_attn", "n_ubatch", "n_prompt", "n_gen", "n_depth", "avg_ts", "stddev_ts", "samples_ts")


def load_raw(source: Path) -> dict:
    """{version, gguf_info, records, ...} from run_on_gpu.sh's $OUT folder or a --save file."""
    if source.is_file():
        return json.loads(source.read_text())
    records = []
    lines = (source / "llama_bench.jsonl").read_text().splitlines()
    for line in lines:
        line = line.strip()
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut off by the call's time limit
                print(f"skipped a partial line: {line[:80]}...", file=sys.stderr)
    version = source / "VERSION.json"
    return {
        "version": json.loads(version.read_text()) if version.is_file() else {},
        "gguf_info": json.loads((source / "gguf_info.json").read_text()),
        "records": records,
    }


def best(rows: list[dict], key: str, larger: bool) -> dict | None:
    rows = [row for row in rows if row.get(key) is not None]
    return (max if larger else min)(rows, key=lambda row: row[key]) if rows else None


def mode_figures(records: list[dict], info: dict, peak_bandwidth: float) -> dict:
    """One GGUF's llama-bench records -> our keys, the winning variants, and both FA variants."""

    def tests(fa: int, **want) -> list[dict]:
        return [r for r in records if int(r["flash_attn"]) == fa and all(r[k] == v for k, v in want.items())]

    by_fa = {}
    for fa in (0, 1):
        prefill = [{"prefill_ms": PROMPT * 1000 / r["avg_ts"], "ubatch": r["n_ubatch"]}
                   for r in tests(fa, n_prompt=PROMPT, n_gen=0, n_depth=0)]  # fmt: skip
        decode = tests(fa, n_prompt=0, n_gen=GEN, n_depth=DEPTH)
        decode0 = tests(fa, n_prompt=0, n_gen=GEN, n_depth=0)
        fastest = best(prefill, "prefill_ms", larger=False)
        by_fa[f"fa{fa}"] = {
            "prefill_ms": fastest["prefill_ms"] if fastest else None,
            "prefill_ubatch": fastest["ubatch"] if fastest else None,
            "prefill_ms_by_ubatch": {str(p["ubatch"]): p["prefill_ms"] for p in prefill},
            "decode_tok_s": decode[0]["avg_ts"] if decode else None,
            "decode_tok_s_depth0": decode0[0]["avg_ts"] if decode0 else None,
        }
    variants = [dict(v, flash_attn=int(k[2:])) for k, v in by_fa.items()]
    prefill = best(variants, "prefill_ms", larger=False)
    decode = best(variants, "decode_tok_s", larger=True)
    decode0 = best(variants, "decode_tok_s_depth0", larger=True)
    first = records[0] if records else {}
    mode = {
        "prefill_ms": prefill and prefill["prefill_ms"],
        "prefill_flash_attn": prefill and prefill["flash_attn"],
        "prefill_ubatch": prefill and prefill["prefill_ubatch"],
        "prompt_tokens": PROMPT,
        "decode_tok_s": decode and decode["decode_tok_s"],
        "decode_flash_attn": decode and decode["flash_attn"],
        "decode_depth": DEPTH,
        "decode_tok_s_depth0": decode0 and decode0["decode_tok_s_depth0"],
        "weight_bytes_per_token": info["weight_bytes_per_token"],
        "gguf_bytes": info["file_bytes"],
        "tensor_types": info["tensor_types"],
        "model_size": first.get("model_size"),
        "model_n_params": first.get("model_n_params"),
        "by_flash_attn": by_fa,
        "llama_bench": [{k: r.get(k) for k in KEPT} for r in records],
    }
    mode = {k: v for k, v in mode.items() if v is not None}  # a test cut off: no key, as ours
    if mode.get("decode_tok_s"):
        mode["bandwidth_fraction"] = mode["weight_bytes_per_token"] * mode["decode_tok_s"] / peak_bandwidth
    return mode


def merge(raw: dict, engine: dict) -> dict:
    """engine (engine-<device>.json's dict) with the llama.cpp modes and ratios added; also the summary."""
    peak = engine.get("peak_bandwidth_bytes_s") or 4.8e12
    by_file: dict[str, list[dict]] = {}
    for record in raw["records"]:
        by_file.setdefault(Path(record["model_filename"]).name, []).append(record)
    summary = {}
    for filename, info in raw["gguf_info"].items():
        label = f"llama_cpp_{info['type']}"
        mode = mode_figures(by_file.get(filename, []), info, peak)
        modes = engine.setdefault("archs", {}).setdefault(info["arch"], {})
        modes[label] = mode
        summary.setdefault(info["arch"], {})[label] = {
            k: mode[k] for k in ("prefill_ms", "decode_tok_s", "decode_tok_s_depth0", "bandwidth_fraction",
                                 "prefill_flash_attn", "decode_flash_attn", "prefill_ubatch") if k in mode
        }  # fmt: skip
    for arch, figures in summary.items():
        modes = engine["archs"][arch]
        ours = modes.get("ours_int4")
        theirs = [dict(modes[label], label=label) for label in figures]
        fastest_decode = best(theirs, "decode_tok_s", larger=True)
        fastest_prefill = best(theirs, "prefill_ms", larger=False)
        if not ours or "error" in ours or not fastest_decode or not fastest_prefill:
            continue
        ratio = {
            "decode_tok_s": ours["decode_tok_s"] / fastest_decode["decode_tok_s"],
            "prefill_ms": fastest_prefill["prefill_ms"] / ours["prefill_ms"],
            "llama_cpp_decode_from": f"{fastest_decode['label']} flash_attn={fastest_decode['decode_flash_attn']}",
            "llama_cpp_prefill_from": f"{fastest_prefill['label']} flash_attn={fastest_prefill['prefill_flash_attn']}"
            f" ubatch={fastest_prefill['prefill_ubatch']}",
            "note": "ours_int4 (this file's run) over the best llama.cpp figure of this arch; >1: ours is faster",
        }
        modes["speedup_ours_int4_over_llama_cpp_best"] = ratio
        figures["speedup_ours_int4_over_llama_cpp_best"] = ratio
    first = raw["records"][0] if raw["records"] else {}
    reps = len(first.get("samples_ts", [])) or "?"
    engine["llama_cpp"] = {
        **raw.get("version", {}),
        "build_commit": first.get("build_commit"),
        "build_number": first.get("build_number"),
        "gpu_info": first.get("gpu_info"),
        "backends": first.get("backends"),
        "test_time": first.get("test_time"),
        "weights": "random, written directly in the quantized types by bench/llama_cpp/make_gguf.py "
        "with llama-quantize's tensor types (checked by check_types.py)",
        "commands": [
            f"llama-bench -m M -ngl 99 -fa 0,1 -p {PROMPT} -n 0 -ub 512,1024 -r {reps} -o jsonl",
            f"llama-bench -m M -ngl 99 -fa 0,1 -p 0 -n {GEN} -d 0,{DEPTH} -r {reps} -o jsonl",
        ],
        "figures": "modes llama_cpp_*; speedup_ours_int4_over_llama_cpp_best (bench/llama_cpp/merge_results.py)",
    }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", type=Path, help="run_on_gpu.sh's $OUT folder, or a --save file")
    parser.add_argument("--engine", type=Path, default=RESULTS / "engine-H200.json")
    parser.add_argument("--out", type=Path, help="default: --engine, in place")
    parser.add_argument("--summary", type=Path, help="also write the llama.cpp figures alone here")
    parser.add_argument("--save", type=Path, help="keep the raw figures here (a SOURCE for a later merge)")
    parser.add_argument("--no-markdown", action="store_true", help="leave the .md beside --out alone")
    args = parser.parse_args()
    raw = load_raw(args.source)
    engine = json.loads(args.engine.read_text())
    summary = merge(raw, engine)
    out = args.out or args.engine
    out.write_text(json.dumps(engine, indent=2) + "\n")
    print(f"wrote {out}")
    if args.summary:
        args.summary.write_text(json.dumps({"llama_cpp": engine["llama_cpp"], "archs": summary}, indent=2) + "\n")
    if args.save:
        args.save.write_text(json.dumps(raw, indent=1) + "\n")
    if not args.no_markdown:
        sys.path.insert(0, str(HERE.parent))
        from engine_bench import markdown_table  # imports torch: only here, not on the device run

        version = engine["llama_cpp"]
        note = (f"\nllama_cpp_* rows: llama.cpp {version.get('llama_cpp_commit', '?')[:9]} (b{version.get('build_number')}, "
                f"llama-cpp-python {version.get('llama_cpp_python_version', '?')} sdist), llama-bench -ngl 99, random "
                f"weights: prefill of {PROMPT} tokens, decode of {GEN} tokens after {DEPTH}; the best of flash "
                "attention off/on (bench/llama_cpp/).\n")  # fmt: skip
        out.with_suffix(".md").write_text(markdown_table(engine) + note)
        print(f"wrote {out.with_suffix('.md')}")
    for arch, figures in summary.items():
        print(arch, json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
