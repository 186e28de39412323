"""Which language models the GPU fast path runs (no CUDA or Triton import here)."""

from __future__ import annotations

# config.json model_type of the language models FastLlama runs: Llama (LLaVA, VILA, SmolVLM's
# SmolLM2), Qwen2/2.5 (InternVL's; Qwen2.5-VL's text model), Qwen3 (InternVL3.5's; Qwen3-VL's
# text model) and StableLM (Obsidian's).
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen2_vl_text", "qwen2_5_vl_text", "qwen3", "qwen3_vl_text", "stablelm")


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
    # q, k and v biases are supported (Qwen2's); a bias on o or on the MLP is not.
    if get("attention_bias", False) or get("mlp_bias", False):
        return "linear layers with bias"
    if get("hidden_act", "silu") != "silu":
        return f"activation '{get('hidden_act')}'"
    if get("use_sliding_window", False):
        return "sliding-window attention"
    if get("use_parallel_residual", False):
        return "parallel residual (StableLM)"
    if get("qk_layernorm", False):
        return "per-head LayerNorm of q and k (StableLM)"
    return ""
