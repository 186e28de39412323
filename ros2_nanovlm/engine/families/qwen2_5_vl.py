"""Qwen2.5-VL (Qwen/Qwen2.5-VL-3B-Instruct, -7B-Instruct, ...): a ViT with window attention and
a 2 x 2 patch merger in front of a Qwen2.5 language model, in transformers' own format
(Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor).

What differs from LLaVA, and where it is right:
- Dynamic resolution: the image processor resizes each frame to multiples of 28 px within
  min_pixels..max_pixels (its own config) and flattens it into 14 px patches; `image_grid_thw`
  (1, h, w) in patches says how they tile, and the prompt gets h * w / 4 <|image_pad|> tokens.
- 3-D rotary positions (M-RoPE): text tokens advance all three position components together,
  image tokens take (t, row, column) of their merged patch, and the text after an image continues
  from the largest of them, so positions run behind token indices by `rope_deltas`. The model
  computes them from input_ids, `mm_token_type_ids` and image_grid_thw in the prefill and keeps
  rope_deltas for the decode steps; the runner passes the processor's tensors through unchanged
  and clears rope_deltas before every prefill (a text-only prompt would otherwise decode with
  the deltas of the last image).
- Chat template: ChatML with a default system turn ("You are a helpful assistant.") and
  <|vision_start|><|image_pad|><|vision_end|> where the image goes; answers end at <|im_end|>.

Left out (hf/processor_runner.py says why for every processor-driven family): prefix reuse and
the embedding cache. Several images in one conversation are supported (the processor takes them
in order)."""

from __future__ import annotations

from pathlib import Path

import torch

from . import native

MODEL_TYPE = "qwen2_5_vl"
MODEL_CLASS = "Qwen2_5_VLForConditionalGeneration"
PROCESSOR_CLASS = "Qwen2_5_VLProcessor"
MULTIPLE_IMAGES = True
# Its language model runs on the GPU fast path (cuda/processor_fast.py) where cuda/support.py allows.
FAST_LANGUAGE_MODEL = True

# Qwen/Qwen2.5-VL-7B-Instruct, chat_template.json (the same as Qwen2-VL's).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}"
)


def recognise(path: str | Path) -> bool:
    return native.model_type(path) == MODEL_TYPE


def load(path: str | Path, *, dtype: torch.dtype = torch.float32):
    """(Qwen2_5_VLForConditionalGeneration on the CPU in `dtype`, its processor)."""
    return native.load(
        path, model_class=MODEL_CLASS, processor_class=PROCESSOR_CLASS, chat_template=CHAT_TEMPLATE, dtype=dtype
    )
