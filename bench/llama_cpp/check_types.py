"""Check make_gguf.py's tensor types against what llama-quantize would choose, for the real shapes.

    PYTHONPATH=<llama.cpp>/gguf-py python3 bench/llama_cpp/check_types.py --quantize BUILD/bin/llama-quantize

make_gguf.py writes Q4_0 and Q4_K_M files directly (random blocks) instead of quantizing an F16
file, so its type plan must equal llama-quantize's, or llama.cpp would be timed on other bytes
than a real Q4_K_M file holds. For each architecture this writes a sparse F16 GGUF of the real
shapes (the header, then zeros that take no disk space: a 13.5 GB file in a second), runs
`llama-quantize --dry-run` on it for each type, and compares the per-tensor types it prints.
Runs on a CPU-only build; exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_gguf

# "[  12/ 291]   blk.1.attn_v.weight  - [ 4096,  4096,  1,  1], type =    f16, size = 32.00 MiB -> 9.00 MiB (q4_0)"
LINE = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[.*?\], type =\s+(\S+), size = [^(]*(?:\((\S+)\))?\s*$")
QUANTIZE_NAMES = {"q4_0": "Q4_0", "q4_k_m": "Q4_K_M"}


def quantize_types(quantize: Path, f16: Path, ftype: str) -> dict[str, str]:
    """{tensor name: type name} from llama-quantize --dry-run's log."""
    run = subprocess.run([str(quantize), "--dry-run", str(f16), QUANTIZE_NAMES[ftype]],
                         capture_output=True, text=True, check=True)  # fmt: skip
    types = {}
    for line in (run.stdout + run.stderr).splitlines():
        if match := LINE.match(line.strip()):
            name, old, new = match.groups()
            types[name] = (new or old).upper()
    if not types:
        raise RuntimeError(f"no tensor lines in llama-quantize's output:\n{run.stdout}{run.stderr}")
    return types


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quantize", required=True, type=Path, help="llama-quantize binary")
    parser.add_argument("--archs", default="llava-1.5-7b,llava-2.7b,tiny")
    args = parser.parse_args()
    configs = make_gguf.text_configs() | {"tiny": make_gguf.TINY}
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.archs.split(","):
            f16 = Path(tmp) / f"{name}-f16.gguf"
            make_gguf.write_gguf(f16, name, configs[name], "f16", sparse=True)
            for ftype in QUANTIZE_NAMES:
                ours = {t: q.name for t, _, q in make_gguf.tensor_plan(configs[name], ftype)}
                theirs = quantize_types(args.quantize, f16, ftype)
                differences = {t: (ours.get(t), theirs.get(t)) for t in ours.keys() | theirs.keys()
                               if ours.get(t) != theirs.get(t)}  # fmt: skip
                counts = {q: list(theirs.values()).count(q) for q in sorted(set(theirs.values()))}
                status = "same" if not differences else f"DIFFERENT (ours, llama-quantize): {differences}"
                print(f"{name} {ftype}: {len(theirs)} tensors {counts}: {status}", flush=True)
                failures += bool(differences)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
