"""Engine configuration: one dataclass, validated once, shared by every backend."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEVICES_HELP = "auto, cpu, cuda or cuda:N"
DTYPES = ("auto", "float32", "float16", "bfloat16")
BACKENDS = ("transformers",)
QUANTIZATIONS = ("auto", "none", "int4")
# Text longer than max_prompt_tokens * this is refused before it is tokenized: tokenizing a
# megabyte costs the caller's thread a second, and no tokenizer packs more characters a token.
MAX_CHARS_PER_TOKEN = 32


@dataclass
class EngineConfig:
    model_path: str
    backend: str = "transformers"
    device: str = "auto"  # auto = cuda when available, else cpu
    dtype: str = "auto"  # auto = float16 on cuda, float32 on cpu
    # auto = 4-bit LLM weights (W4A16, group 128) where the GPU fast path runs the model, else none
    quantization: str = "auto"
    max_context_tokens: int = 2048  # KV cache size: prompt (with image tokens) + answer
    max_new_tokens: int = 32
    embedding_cache_size: int = 16  # image embeddings kept, by content hash
    max_prompt_tokens: int = 1024  # a question or a system prompt, as typed
    max_image_pixels: int = 16 * 1024 * 1024
    # PyTorch's CPU threads; 0 = half the cores. All of them (torch's default) oversubscribe a
    # machine that also runs ROS executors, DDS and camera drivers: OpenMP's barriers then wait
    # for descheduled threads, and answers take 5-15x longer (2 cores: 0.44 s with 1, 2-6 s with 2).
    cpu_threads: int = 0

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        if self.backend not in BACKENDS:
            raise ValueError(f"backend '{self.backend}' is not one of {', '.join(BACKENDS)}")
        if not is_valid_device(self.device):
            raise ValueError(f"device '{self.device}' is not one of {DEVICES_HELP}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype '{self.dtype}' is not one of {', '.join(DTYPES)}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization '{self.quantization}' is not one of {', '.join(QUANTIZATIONS)}")
        for name, low in (
            ("max_context_tokens", 16),
            ("max_new_tokens", 1),
            ("embedding_cache_size", 0),
            ("max_prompt_tokens", 1),
            ("max_image_pixels", 1),
            ("cpu_threads", 0),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def cpu_threads(requested: int) -> int:
    """The CPU threads to give PyTorch: `requested`, or half the cores (at least one) for 0."""
    return requested or max(1, (os.cpu_count() or 2) // 2)


def is_valid_device(device: str) -> bool:
    if device in ("auto", "cpu", "cuda"):
        return True
    prefix, _, index = device.partition(":")
    return prefix == "cuda" and index.isdigit()


def nanovlm_home() -> Path:
    """Where nanovlm keeps what it builds or caches: $NANOVLM_HOME, else ~/.cache/nanovlm."""
    return Path(os.environ.get("NANOVLM_HOME", "~/.cache/nanovlm")).expanduser()
