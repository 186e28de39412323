"""Is a batched vision forward the same as one frame at a time? Separates a batching bug from
float16 rounding: the LLaVA-1.5 vision tower (CLIP ViT-L/336 + projector, random weights) on
the GPU, four photos, cosine and max |diff| / scale of each frame's features for:

  graph vs eager      batch-1 CUDA graph against the same batch-1 forward uncaptured (fp16)
  batch vs eager      GpuLlavaImageEncoder.encode_batch against batch-1 uncaptured (fp16)
  batch vs eager fp32 the same comparison in float32

If fp32 agrees and fp16 does not, the difference is rounding amplified by the random network,
not the batching. Writes bench/results/vision-batch-precision-<GPU>.json. Takes ~1 minute.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from archs import TEXT_CONFIGS, build  # noqa: E402

from ros2_nanovlm.engine.cuda.vision import GpuLlavaImageEncoder  # noqa: E402
from ros2_nanovlm.resources import load_photo  # noqa: E402


def compare(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[dict]:
    rows = []
    for x, y in zip(a, b, strict=True):
        x, y = x.float().flatten(), y.float().flatten()
        rows.append(
            {
                "cosine": round(float(torch.nn.functional.cosine_similarity(x, y, dim=0)), 6),
                "max_diff_over_scale": round(float((x - y).abs().max() / y.abs().max()), 6),
            }
        )
    return rows


def main() -> None:
    TEXT_CONFIGS["vision-only"] = dict(TEXT_CONFIGS["llava-1.5-7b"], num_hidden_layers=1)
    model, processor = build("vision-only")
    photos = sorted((ROOT / "data" / "images").glob("*.jpg"))[:4]
    frames = [load_photo(path, 640)[:480] for path in photos]
    report = {"frames": [p.name for p in photos]}
    for dtype in (torch.float16, torch.float32):
        model.to(dtype)
        encoder = GpuLlavaImageEncoder(model, processor.image_processor, torch.device("cuda"), dtype)
        with torch.inference_mode():
            eager = [encoder(frame) for frame in frames]  # no graph captured yet
            batch = encoder.encode_batch(frames)
            name = "fp16" if dtype == torch.float16 else "fp32"
            report[f"batch vs eager {name}"] = compare(batch, eager)
            if dtype == torch.float16:
                encoder.capture()
                graph = [encoder(frame) for frame in frames]
                report["graph vs eager fp16"] = compare(graph, eager)
                report["eager repeat fp16"] = compare([encoder._encode(encoder.preprocess(f)) for f in frames], eager)
    name = torch.cuda.get_device_name().split()[-1]
    out = ROOT / "bench" / "results" / f"vision-batch-precision-{name}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
