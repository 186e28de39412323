"""Is the CPU path no slower than at an earlier commit? The demo VLM answers the test photos
(a new frame every time, so the encoder and the frame digest run), alternating between the
two checkouts in fresh processes, on this machine, in one run.

    git worktree add /tmp/nanovlm-old <commit>
    python bench/cpu_path_ab.py /tmp/nanovlm-old [--rounds 2] [--model DIR]

--model: a model directory both checkouts load (default: each one's own default model, which
is only a fair comparison when both have the same one; before the demo VLM the default was a
tiny random LLaVA, which `python -m ros2_nanovlm.engine.tiny DIR` still builds).

Writes bench/results/cpu-path-ab.json: median ms per answer phase, per checkout and round.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

MEASURE = """
import json, statistics, sys
from pathlib import Path
repo, model = sys.argv[1], sys.argv[2]
sys.path.insert(0, repo)
import ros2_nanovlm
assert ros2_nanovlm.__file__.startswith(repo), ros2_nanovlm.__file__
from ros2_nanovlm.camera_player import load_photo
from ros2_nanovlm.default_model import ensure_default_model
from ros2_nanovlm.engine import EngineConfig, VLMEngine
engine = VLMEngine.load(EngineConfig(model_path=model or str(ensure_default_model()), max_new_tokens=24))
photos = [load_photo(p, 640) for p in sorted(Path(repo, "data", "images").glob("*.jpg"))]
engine.ask("What is in the image?", photos[0])
timings = []
for round in range(4):
    for photo in photos:
        frame = photo.copy()
        frame[0, 0, 0] ^= 1 + round  # a frame the embedding cache has not seen
        timings.append(engine.ask("What is in the image?", frame).timings)
print(json.dumps({phase: statistics.median(getattr(t, phase) for t in timings)
                  for phase in ("vision_ms", "prefill_ms", "decode_ms", "total_ms")}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("old", help="a checkout of the earlier commit (git worktree add)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default="", help="a model directory both load (default: each one's default model)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "cpu-path-ab.json"))
    args = parser.parse_args()
    old = str(Path(args.old).resolve())

    def commit(repo):
        return subprocess.run(
            ["git", "-C", repo, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()

    report = {"machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores", "python": platform.python_version(),
              "old": commit(old), "new": commit(str(REPO)), "model": args.model or "default", "rounds": []}  # fmt: skip
    for round in range(args.rounds):
        row = {}
        for label, repo in (("old", old), ("new", str(REPO))):
            output = subprocess.run(
                [sys.executable, "-c", MEASURE, repo, args.model], capture_output=True, text=True, check=True
            ).stdout
            row[label] = json.loads(output.strip().splitlines()[-1])
        report["rounds"].append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
