"""NousResearch/Obsidian-3B-V0.5: LLaVA's layout (a CLIP tower it names, an mlp2x_gelu
projector) around StableLM-3B-4E1T, published with the remote-code `stablelm_epoch` model
(NousResearch/Obsidian, llava/model/language_model/llava_stablelm.py). Converted in memory to
transformers' LlavaForConditionalGeneration with a StableLmForCausalLM inside.

stablelm_epoch -> transformers StableLm is a config rename (the weights keep their names:
LayerNorm with bias, gate/up/down MLP, no qkv bias): rope_pct -> partial_rotary_factor,
norm_eps -> layer_norm_eps.

Its prompt format is ChatML's start tags closed by `###` (NanoLLM's "nous-obsidian" template,
from the model card):
    <|im_start|>system\\nSYSTEM\\n###\\n<|im_start|>user\\n<image>\\nQUESTION\\n###\\n<|im_start|>assistant\\n
and an answer ends at `###` or <|im_end|>.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import read_config
from .llava_original import _CONTENT_MACRO, Recipe, _system_then_turns, assemble, is_llava_layout, text_config_keys

ARCHITECTURES = ("LlavaStableLMEpochForCausalLM",)
MODEL_TYPES = ("llava_stablelm_epoch", "stablelm_epoch")
DEFAULT_SYSTEM = "You are a helpful AI assistant."

CHAT_TEMPLATE = (
    _CONTENT_MACRO
    + _system_then_turns(DEFAULT_SYSTEM)
    + (
        "{%- if system -%}{{ '<|im_start|>system\n' + system + '\n###\n' }}{%- endif -%}"
        "{%- for message in turns -%}"
        "{%- set role = 'user' if message['role'] == 'user' else 'assistant' -%}"
        "{{ '<|im_start|>' + role + '\n' + content(message['content']) + '\n###\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
    )
)
STOP_STRINGS = ("###", "<|im_end|>")


def recognise(path: str | Path) -> bool:
    config = read_config(path)
    if config is None or not is_llava_layout(config):
        return False
    return any(a in ARCHITECTURES for a in config.get("architectures") or []) or config.get("model_type") in MODEL_TYPES


def stablelm_text_config(original: dict):
    """transformers' StableLmConfig of a stablelm_epoch config."""
    from transformers import StableLmConfig

    keys = text_config_keys(original)
    renamed = {"rope_pct": "partial_rotary_factor", "norm_eps": "layer_norm_eps"}
    keys = {renamed.get(key, key): value for key, value in keys.items() if key != "num_heads"}
    keys.setdefault("partial_rotary_factor", 0.25)  # stablelm_epoch's defaults
    keys.setdefault("layer_norm_eps", 1e-5)
    keys.setdefault("use_qkv_bias", False)
    return StableLmConfig(**keys)


def text_config(path: str | Path) -> dict:
    return stablelm_text_config(read_config(path) or {}).to_dict()


def load(path: str | Path, *, dtype: torch.dtype = torch.float32, vision_tower: str | Path | None = None):
    recipe = Recipe(stablelm_text_config, CHAT_TEMPLATE, stop_strings=STOP_STRINGS, name="Obsidian")
    return assemble(path, recipe, dtype=dtype, vision_tower=vision_tower)
