"""Which language models the GPU fast path runs (no CUDA or Triton import here)."""

from __future__ import annotations

SUPPORTED_MODEL_TYPES = ("llama",)


def unsupported_reason(text_config) -> str:
    """ "" when FastLlama can run this text config (an object or a dict), else why not."""
    get = (
        text_config.get
        if isinstance(text_config, dict)
        else lambda name, default=None: getattr(text_config, name, default)
    )
    model_type = get("model_type", "llama")
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model_type '{model_type}' (the fast path runs {', '.join(SUPPORTED_MODEL_TYPES)})"
    if get("attention_bias", False) or get("mlp_bias", False):
        return "linear layers with bias"
    if get("hidden_act", "silu") != "silu":
        return f"activation '{get('hidden_act')}'"
    return ""
