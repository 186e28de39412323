"""Random-weight Llama GGUFs of our benchmark's shapes, for llama.cpp's llama-bench.

    PYTHONPATH=<llama.cpp>/gguf-py python3 bench/llama_cpp/make_gguf.py \
        --archs llava-1.5-7b,llava-2.7b --types q4_0,q4_k_m --out-dir DIR [--info FILE]
    ... make_gguf.py --archs tiny --types f16,q4_0,q4_k_m --out-dir DIR   # 32 layers, hidden 256

Speed does not depend on weight values, only on shapes and tensor types (as in ../archs.py), so
the quantized types are written directly as random blocks: no 13.5 GB F16 file and no
llama-quantize pass, which would take minutes of the device call. Each block's scale fields are
set to small finite fp16 values so that activations stay finite. The tensor types follow
llama-quantize's choices for a Llama (src/llama-quant.cpp, llama_tensor_get_type): Q4_0 puts
output.weight in Q6_K; Q4_K_M also puts attn_v and ffn_down in Q6_K on the layers where
use_more_bits() says so. check_types.py compares this plan with llama-quantize --dry-run.

The vocabulary is a LLaMA SentencePiece one ('llama' model: <unk>, <s>, </s>, the 256 byte
tokens, then dummies up to vocab_size); llama-bench never tokenizes text (it feeds random ids),
but the loader wants a consistent vocabulary with a newline byte token.

--info writes, per file: tensor type counts, file bytes, and the weight bytes a decode step reads
(every tensor but token_embd.weight, of which a token reads one row, as ours counts), read back
from the written file with gguf's reader.
"""

from __future__ import annotations

import argparse
import ast
import json
import time
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

ARCHS_PY = Path(__file__).resolve().parent.parent / "archs.py"
TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=32, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=1000)  # fmt: skip
FILE_TYPES = {
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M,
}
POOL_BLOCKS = 1 << 16  # random blocks per type, tiled over each tensor


def text_configs() -> dict[str, dict]:
    """archs.TEXT_CONFIGS, read from archs.py's source: importing it loads torch and transformers."""
    tree = ast.parse(ARCHS_PY.read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "TEXT_CONFIGS" for t in node.targets):
            return eval(compile(ast.Expression(node.value), str(ARCHS_PY), "eval"), {"__builtins__": {}, "dict": dict})
    raise LookupError(f"no TEXT_CONFIGS in {ARCHS_PY}")


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    """llama-quant.cpp's use_more_bits: the first and last eighth of the layers, and every third between."""
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


def tensor_plan(config: dict, ftype: str) -> list[tuple[str, tuple[int, ...], T]]:
    """(name, numpy shape (rows, columns), type) of every tensor, in convert_hf_to_gguf's order."""
    hidden, ffn, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    head_dim = hidden // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    vocab = config["vocab_size"]
    base = {"f16": T.F16, "q4_0": T.Q4_0, "q4_k_m": T.Q4_K}[ftype]
    high = T.F16 if ftype == "f16" else T.Q6_K  # output.weight: Q6_K for both 4-bit types

    def mixed(i: int) -> T:
        return T.Q6_K if ftype == "q4_k_m" and use_more_bits(i, layers) else base

    plan = [("token_embd.weight", (vocab, hidden), base)]
    for i in range(layers):
        plan += [
            (f"blk.{i}.attn_norm.weight", (hidden,), T.F32),
            (f"blk.{i}.attn_q.weight", (hidden, hidden), base),
            (f"blk.{i}.attn_k.weight", (kv, hidden), base),
            (f"blk.{i}.attn_v.weight", (kv, hidden), mixed(i)),
            (f"blk.{i}.attn_output.weight", (hidden, hidden), base),
            (f"blk.{i}.ffn_norm.weight", (hidden,), T.F32),
            (f"blk.{i}.ffn_gate.weight", (ffn, hidden), base),
            (f"blk.{i}.ffn_up.weight", (ffn, hidden), base),
            (f"blk.{i}.ffn_down.weight", (hidden, ffn), mixed(i)),
        ]
    plan += [("output_norm.weight", (hidden,), T.F32), ("output.weight", (vocab, hidden), high)]
    return plan


def block_pool(qtype: T, rng: np.random.Generator) -> np.ndarray:
    """POOL_BLOCKS random blocks of qtype as bytes, with finite fp16 scales of about 0.01."""
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    pool = rng.integers(0, 256, (POOL_BLOCKS, block_bytes), dtype=np.uint8)

    def scales(count: int) -> np.ndarray:
        return (rng.uniform(0.5, 1.5, (POOL_BLOCKS, count)) * 0.01).astype("<f2").view(np.uint8)

    if qtype == T.Q4_0:  # d, qs[16]
        pool[:, 0:2] = scales(1)
    elif qtype == T.Q4_K:  # d, dmin, scales[12], qs[128]
        pool[:, 0:4] = scales(2)
    elif qtype == T.Q6_K:  # ql[128], qh[64], scales[16] (int8), d
        pool[:, 208:210] = scales(1)
    else:
        raise ValueError(f"no random blocks for {qtype.name}")
    assert block_elems == (32 if qtype == T.Q4_0 else 256)
    return pool.reshape(-1)


def tensor_data(shape: tuple[int, ...], qtype: T, pools: dict, rng: np.random.Generator) -> np.ndarray:
    """The tensor's bytes (uint8, byte shape) for quantized types, else a float array."""
    if qtype == T.F32:
        return np.ones(shape, dtype=np.float32)  # RMSNorm weights
    if qtype == T.F16:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    rows, columns = shape
    assert columns % block_elems == 0, f"{shape} is not a whole number of {qtype.name} blocks"
    nbytes = rows * columns // block_elems * block_bytes
    pool = pools[qtype]
    start = int(rng.integers(0, POOL_BLOCKS)) * block_bytes  # a different phase for each tensor
    data = np.resize(np.roll(pool, -start), nbytes)
    return data.reshape(rows, columns // block_elems * block_bytes)


def add_metadata(writer: gguf.GGUFWriter, name: str, config: dict, ftype: str) -> None:
    hidden = config["hidden_size"]
    writer.add_name(f"random {name} ({ftype})")
    writer.add_context_length(4096)
    writer.add_embedding_length(hidden)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_dimension_count(hidden // config["num_attention_heads"])
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(FILE_TYPES[ftype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    dummies = config["vocab_size"] - len(tokens)
    assert dummies >= 0, "vocab_size below the 259 special and byte tokens"
    tokens += [f"\u2581t{i}" for i in range(dummies)]
    types += [gguf.TokenType.NORMAL] * dummies
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * 259 + [-float(i) for i in range(dummies)])
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)


def write_gguf(path: Path, name: str, config: dict, ftype: str, seed: int = 0, sparse: bool = False) -> None:
    """Stream the file tensor by tensor: at most one tensor (about 100 MB) in memory.

    sparse: write the header only and extend the file with zeros that take no disk space
    (all-zero weights: enough for llama-quantize --dry-run, see check_types.py)."""
    rng = np.random.default_rng(seed)
    plan = tensor_plan(config, ftype)
    pools = {q: block_pool(q, rng) for q in {q for _, _, q in plan} if q not in (T.F32, T.F16)}
    writer = gguf.GGUFWriter(path, "llama")
    add_metadata(writer, name, config, ftype)
    for tensor_name, shape, qtype in plan:
        if qtype in (T.F32, T.F16):
            dtype = np.float32 if qtype == T.F32 else np.float16
            writer.add_tensor_info(tensor_name, shape, np.dtype(dtype), int(np.prod(shape)) * dtype().itemsize)
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
            writer.add_tensor_info(tensor_name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    if sparse:
        out = writer.fout[0]
        data = sum(gguf.GGUFWriter.ggml_pad(ti.nbytes, writer.data_alignment) for ti in writer.tensors[0].values())
        out.truncate(gguf.GGUFWriter.ggml_pad(out.tell(), writer.data_alignment) + data)
        writer.close()
        return
    for _, shape, qtype in plan:
        writer.write_tensor_data(tensor_data(shape, qtype, pools, rng))
    writer.close()


def file_info(path: Path) -> dict:
    """Tensor types and the bytes a decode step reads, from the written file (proves it parses)."""
    reader = gguf.GGUFReader(path)
    counts: dict[str, int] = {}
    per_token = 0
    total = 0
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        counts[kind] = counts.get(kind, 0) + 1
        total += int(tensor.n_bytes)
        if tensor.name != "token_embd.weight":
            per_token += int(tensor.n_bytes)
    return {
        "file_bytes": path.stat().st_size,
        "tensor_bytes": total,
        "weight_bytes_per_token": per_token,
        "tensor_types": counts,
        "types_by_tensor": {t.name: t.tensor_type.name for t in reader.tensors},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--archs",
        default="llava-1.5-7b,llava-2.7b",
        help="names in archs.TEXT_CONFIGS, or tiny (32 layers of hidden size 256, for checks)",
    )
    parser.add_argument("--types", default="q4_0,q4_k_m", help=f"of {', '.join(FILE_TYPES)}")
    parser.add_argument("--out-dir", required=True, type=Path)
    parser.add_argument("--info", type=Path, help="write the files' tensor types and bytes here (JSON)")
    args = parser.parse_args()
    known = text_configs() | {"tiny": TINY}
    configs = {name: known[name] for name in args.archs.split(",")}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    info = {}
    for name, config in configs.items():
        for ftype in args.types.split(","):
            path = args.out_dir / f"{name}-{ftype}.gguf"
            started = time.perf_counter()
            write_gguf(path, name, config, ftype)
            seconds = time.perf_counter() - started
            info[path.name] = {"arch": name, "type": ftype, "config": config, "write_s": seconds} | file_info(path)
            gb = info[path.name]["file_bytes"] / 1e9
            print(f"wrote {path} ({gb:.2f} GB in {seconds:.1f} s)", flush=True)
    if args.info:
        args.info.write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
