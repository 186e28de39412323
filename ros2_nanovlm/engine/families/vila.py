"""VILA (NVlabs/VILA, Efficient-Large-Model/*), in its two published layouts, converted in
memory to transformers' LlavaForConditionalGeneration.

The first VILA (VILA-2.7b/7b/13b) is one checkpoint in LLaVA's layout (llava_original.py loads
it); only its name tells it apart, and with it the prompt: VILA's vicuna_v1 ("a curious user").

VILA1.5 (VILA1.5-3b, -13b) splits the model into sub-directories that its config.json names
(`llm_cfg`, `vision_tower_cfg`, `mm_projector_cfg`, each with `_name_or_path` "./llm" ...):
  llm/            a transformers LlamaForCausalLM directory with the tokenizer
  vision_tower/   a transformers SiglipVisionModel directory (so400m, 384 px: 27 x 27 patches)
  mm_projector/   `mlp_downsample`: 2 x 2 neighbouring tokens concatenated (the grid padded to
                  an even side with zeros), then layers.1 LayerNorm, layers.2 Linear, GELU,
                  layers.4 Linear (llava/model/multimodal_projector/base_projector.py, as
                  released in May 2024; NVILA's later version transposes the merged grid, which
                  VILA1.5 was not trained with).
The merge has no transformers class (InternVL's pixel shuffle is the transposed one and needs an
even grid): LlavaForConditionalGeneration gets this projector in place of its own.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration

from ..api import ModelLoadError
from .checkpoint import load_weights, read_config
from .llava_original import (
    Recipe,
    assemble,
    build_model,
    build_processor,
    checked,
    is_llava_layout,
    load_tokenizer,
    stop_token_ids,
    text_config_keys,
    vicuna_v1_template,
)
from .towers import open_tower

# VILA's conv_vicuna_v1 (its default conversation)
VILA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
CHAT_TEMPLATE = vicuna_v1_template(VILA_SYSTEM)
PARTS = {"llm": "llm_cfg", "vision_tower": "vision_tower_cfg", "mm_projector": "mm_projector_cfg"}
PROJECTOR_KEYS = {"layers.1": "layer_norm", "layers.2": "linear_1", "layers.4": "linear_2"}


def recognise(path: str | Path) -> bool:
    config = read_config(path)
    if config is None:
        return False
    if all(isinstance(config.get(key), dict) for key in PARTS.values()):
        return True  # VILA1.5's split layout
    names = (Path(path).expanduser().resolve().name, str(config.get("_name_or_path", "")))
    return is_llava_layout(config) and any("vila" in name.lower() for name in names)


def _is_split(original: dict) -> bool:
    return all(isinstance(original.get(key), dict) for key in PARTS.values())


def _part(path: Path, original: dict, part: str) -> Path:
    """The sub-directory of `part` (llm, vision_tower, mm_projector), or ModelLoadError."""
    named = Path(str(original.get(PARTS[part], {}).get("_name_or_path") or part)).name
    for candidate in (path / named, path / part):
        if (candidate / "config.json").is_file():
            return candidate
    raise ModelLoadError(f"'{path}': the VILA {part} directory '{named}/' (with its config.json) is missing")


def text_config(path: str | Path) -> dict:
    path = Path(path).expanduser()
    original = read_config(path) or {}
    if not _is_split(original):
        from .llava_original import text_config as llava_text_config

        return llava_text_config(path)
    return _llm_config(_part(path, original, "llm")).to_dict()


def _llm_config(llm_dir: Path):
    from transformers import AutoConfig

    keys = text_config_keys(read_config(llm_dir) or {})
    model_type = (read_config(llm_dir) or {}).get("model_type", "llama")
    try:
        return AutoConfig.for_model(model_type, **keys)
    except ValueError as error:
        raise ModelLoadError(f"'{llm_dir}': language model type '{model_type}' is unknown: {error}") from error


def load(path: str | Path, *, dtype: torch.dtype = torch.float32, vision_tower: str | Path | None = None):
    path = Path(path).expanduser()
    original = read_config(path) or {}
    if not _is_split(original):  # the first VILA: LLaVA's layout, VILA's prompt
        recipe = Recipe(_llava_text_config, CHAT_TEMPLATE, name="VILA")
        return assemble(path, recipe, dtype=dtype, vision_tower=vision_tower)
    return _load_split(path, original, dtype)


def _llava_text_config(original: dict):
    from transformers import AutoConfig

    return AutoConfig.for_model("llama", **text_config_keys(original))


def _load_split(path: Path, original: dict, dtype: torch.dtype):
    from transformers import LlavaConfig

    llm_dir, tower_dir, projector_dir = (_part(path, original, part) for part in PARTS)
    projector_type = (read_config(projector_dir) or {}).get("mm_projector_type") or original["mm_projector_cfg"].get(
        "mm_projector_type"
    )
    if projector_type != "mlp_downsample":
        raise ModelLoadError(
            f"'{path}': VILA projector type '{projector_type}' is not supported (supported: mlp_downsample)"
        )
    tokenizer, image_token_id = load_tokenizer(llm_dir)
    if "<|eot_id|>" in tokenizer.get_vocab() or "<|im_end|>" in tokenizer.get_vocab():
        raise ModelLoadError(
            f"'{path}': a VILA1.5 on a Llama-3 or Yi language model (8B, 40B) uses a prompt format that is not "
            "supported yet; VILA1.5-3b and -13b (vicuna_v1) are"
        )
    tower = open_tower(str(tower_dir), tower_dir)
    select = original.get("mm_vision_select_feature", "patch")
    config = LlavaConfig(
        vision_config=tower.config,
        text_config=_llm_config(llm_dir),
        image_token_id=image_token_id,
        vision_feature_layer=original.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy="default" if select == "patch" else "full",
        projector_hidden_act="gelu",
    )
    state = {}
    for name, tensor in load_weights(llm_dir, keep=lambda name: not name.endswith(".rotary_emb.inv_freq")).items():
        state[name if name == "lm_head.weight" else "model.language_model." + name.removeprefix("model.")] = tensor
    state.update(("model.vision_tower." + name, tensor) for name, tensor in tower.weights().items())
    projector = load_weights(projector_dir)
    for old, new in PROJECTOR_KEYS.items():
        for kind in ("weight", "bias"):
            if f"{old}.{kind}" not in projector:
                raise ModelLoadError(
                    f"'{projector_dir}' lacks the projector weight {old}.{kind} (mm_projector_type mlp_downsample)"
                )
            state[f"model.multi_modal_projector.{new}.{kind}"] = projector.pop(f"{old}.{kind}")
    if projector:
        raise ModelLoadError(f"'{projector_dir}': unexpected projector weights {', '.join(sorted(projector))}")
    state = checked(path, config, state, dtype, cls=VilaForConditionalGeneration)
    model = build_model(config, state, dtype, cls=VilaForConditionalGeneration)
    model.generation_config.eos_token_id = sorted(stop_token_ids(tokenizer, ()))
    # SigLIP squashes the frame to its square size, which is VILA's image_aspect_ratio "resize".
    processor = build_processor(original, config, tower, tokenizer, CHAT_TEMPLATE)
    return model.eval(), processor


def merge_2x2(features: torch.Tensor) -> torch.Tensor:
    """(B, N, C) tokens of a square grid -> (B, ceil(side/2)^2, 4C): VILA1.5's DownSampleBlock."""
    batch, count, channels = features.shape
    side = math.isqrt(count)
    grid = features.reshape(batch, side, side, channels)
    if side % 2:  # pad one row, then one column, of zeros
        grid = torch.cat([grid, grid.new_zeros(batch, 1, side, channels)], dim=1)
        grid = torch.cat([grid, grid.new_zeros(batch, side + 1, 1, channels)], dim=2)
        side += 1
    grid = grid.reshape(batch, side, side // 2, channels * 2).permute(0, 2, 1, 3)
    return grid.reshape(batch, (side // 2) ** 2, channels * 4)


class DownsampleProjector(nn.Module):
    """mlp_downsample: 2 x 2 token merge, LayerNorm, Linear, GELU, Linear."""

    def __init__(self, config):
        super().__init__()
        vision, text = config.vision_config.hidden_size, config.text_config.hidden_size
        self.layer_norm = nn.LayerNorm(vision * 4)
        self.linear_1 = nn.Linear(vision * 4, text)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(text, text)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(self.layer_norm(merge_2x2(image_features)))))


class VilaForConditionalGeneration(LlavaForConditionalGeneration):
    """transformers' LLaVA with VILA1.5's downsampling projector; everything else (the SigLIP
    tower, feature selection, the language model, generation) is transformers'."""

    def __init__(self, config):
        super().__init__(config)
        self.model.multi_modal_projector = DownsampleProjector(config)
