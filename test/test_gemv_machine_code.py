"""The 4-bit GEMV's half2 path (inline PTX, which Triton's interpreter cannot run) compiled for
Hopper on this CPU machine with Triton's bundled ptxas: it must assemble, load its inputs as
whole 16-byte vectors, and do its products two at a time (HFMA2). Its numbers are checked on the
GPU by bench/check_gpu.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parent.parent
SCRIPT = """
import json, sys
sys.path.insert(0, "bench")
import gemv_sass
loop = gemv_sass.main_loop(gemv_sass.compile_gemv(4096, True, False, (2, 128, 1, 1, 0)))
print(json.dumps(dict(gemv_sass.opcodes(loop))))
"""


def test_half2_gemv_assembles_for_sm90_with_vector_loads_and_paired_products():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    opcodes = json.loads(result.stdout.strip().splitlines()[-1])
    assert opcodes.get("HFMA2", 0) >= 2 * 2 * 128 * 4 // 32  # rows x (gate, up) x words x 4 per word / 32 threads
    assert not any(op.startswith(("LDS", "STS", "BAR")) for op in opcodes), opcodes  # no exchange through shared memory
    assert opcodes.get("LDG.E.128", 0) > 0 and opcodes.get("LDG.E", 0) == 0, opcodes  # x pairs in 16-byte loads
