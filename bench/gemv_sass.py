"""Machine code of the 4-bit GEMV, on a machine with no GPU: compile the Triton kernel for sm_90
(Triton bundles ptxas and cuobjdump) and print, per launch configuration, the instructions the
main loop executes per weight and per thread, the widths of its loads and whether it passes data
through shared memory. The GEMV is bound by instruction issue as much as by memory, so this
count predicts its speed (bench/NOTES.md, run 10).

    python bench/gemv_sass.py [--sass-dir DIR]   # DIR gets the full SASS listings
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.tools.disasm import get_sass

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ros2_nanovlm.engine.cuda import kernels

SIGNATURE = {"x_ptr": "*fp16", "packed_ptr": "*i32", "scales_ptr": "*fp16", "offsets_ptr": "*fp16",
             "out_ptr": "*fp16", "N_OUT": "i32", "one_bits": "i32"}  # fmt: skip
# (label, K, gated, writes partials, config) for LLaVA-7B's matrices
CASES = [
    ("qkv", 4096, False, False, (4, 128, 1, 1, 0)),
    ("qkv", 4096, False, False, (2, 128, 1, 1, 0)),
    ("gate_up", 4096, True, False, (2, 128, 1, 1, 0)),
    ("o", 4096, False, True, (8, 128, 1, 2, 0)),
    ("down", 11008, False, True, (8, 128, 1, 4, 24)),
]


def compile_gemv(k: int, gated: bool, partials: bool, config, half2: bool = True) -> str:
    block_n, block_w, warps, split_k, _ = config
    constants = dict(BLOCKS_PER_PROGRAM=1, K=k, GROUP=128, BLOCK_N=block_n, BLOCK_W=block_w, SPLIT_K=split_k,
                     GATED=gated, PARTIALS=partials, HALF2=half2, PDL=True)  # fmt: skip
    function = kernels._w4_gemv_kernel
    signature = dict(SIGNATURE, **dict.fromkeys(constants, "constexpr"))
    # the run time specializes 16-byte-aligned pointers; without this the loads are not vectorized
    attributes = {
        (function.arg_names.index(name),): [["tt.divisibility", 16]] for name in SIGNATURE if name != "one_bits"
    }
    source = ASTSource(fn=function, signature=signature, attrs=attributes,
                       constexprs={(function.arg_names.index(name),): value for name, value in constants.items()})  # fmt: skip
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    return get_sass(compiled.asm["cubin"])


def main_loop(sass: str) -> list[str]:
    """The instructions of the longest loop (a label to the last backward branch to it)."""
    lines = sass.splitlines()
    labels = {line[:-1]: index for index, line in enumerate(lines) if re.match(r"^\.?L\w+:$", line)}
    best = (0, 0)
    for index, line in enumerate(lines):
        match = re.search(r"BRA\s+`?\(?(\.?L\w+)", line)
        if match and labels.get(match.group(1), index) < index and index - labels[match.group(1)] > best[1] - best[0]:
            best = (labels[match.group(1)], index)
    return lines[best[0] : best[1] + 1]


def opcodes(lines: list[str]) -> collections.Counter:
    counts = collections.Counter()
    for line in lines:
        match = re.search(r"\t(?:@!?U?P\w+\s+)?([A-Z0-9_]+)(\.[\w.]*)?", line)
        if match:
            counts[match.group(1) + ((match.group(2) or "") if match.group(1) in ("LDG", "LDS", "STS") else "")] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sass-dir", help="write each configuration's SASS here")
    args = parser.parse_args()
    print("matrix   config              loop instr  per weight  loads (loop)                          smem/barriers")
    for label, k, gated, partials, config in CASES:
        sass = compile_gemv(k, gated, partials, config)
        if args.sass_dir:
            Path(args.sass_dir).mkdir(parents=True, exist_ok=True)
            (Path(args.sass_dir) / f"{label}-{'-'.join(map(str, config))}.sass").write_text(sass)
        loop = main_loop(sass)
        counts = opcodes(loop)
        block_n, block_w, warps = config[:3]
        weights_per_thread = block_n * (2 if gated else 1) * block_w * 8 / (32 * warps)
        loads = ", ".join(f"{op} x{n}" for op, n in sorted(counts.items()) if op.startswith("LDG"))
        shared = sum(n for op, n in counts.items() if op.startswith(("LDS", "STS", "BAR")))
        print(
            f"{label:8s} {config!s:19s} {len(loop):10d}  {len(loop) / weights_per_thread:10.2f}  {loads:37s} {shared}"
        )


if __name__ == "__main__":
    main()
