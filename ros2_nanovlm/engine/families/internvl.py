"""InternVL in transformers' format (OpenGVLab/InternVL3-1B-hf, InternVL3-2B-hf, ...): an
InternViT tower, a pixel-shuffle MLP projector and a Qwen2/Qwen3 language model
(InternVLForConditionalGeneration, InternVLProcessor). The original remote-code checkpoints
(OpenGVLab/InternVL3-1B, model_type `internvl_chat`) are not this format and are not recognised.

What differs from LLaVA, and where it is right:
- Tiles: the image processor (GotOcr2ImageProcessor, crop_to_patches) picks the grid of
  448 px tiles, between min_patches and max_patches, whose aspect ratio is closest to the frame's,
  cuts the resized frame into them and adds a thumbnail of the whole frame when there is more
  than one tile; the prompt's <IMG_CONTEXT> becomes <img>, `image_seq_length` context tokens per
  tile, </img>. The processor writes it all; the tower sees every tile.
- Positions are plain 1-D ones and attention is causal.
- Chat template: ChatML without a default system turn, the image as "<IMG_CONTEXT>\\n" before
  the question; answers end at <|im_end|>.

Left out (hf/processor_runner.py says why): prefix reuse and the embedding cache. Several images
in one conversation are supported."""

from __future__ import annotations

from pathlib import Path

import torch

from . import native

MODEL_TYPE = "internvl"
MODEL_CLASS = "InternVLForConditionalGeneration"
PROCESSOR_CLASS = "InternVLProcessor"
MULTIPLE_IMAGES = True
# Its language model runs on the GPU fast path (cuda/processor_fast.py) where cuda/support.py allows.
FAST_LANGUAGE_MODEL = True

# The template transformers' conversion script writes into the -hf checkpoints
# (models/internvl/convert_internvl_weights_to_hf.py, `chat_template`).
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)


def recognise(path: str | Path) -> bool:
    return native.model_type(path) == MODEL_TYPE


def load(path: str | Path, *, dtype: torch.dtype = torch.float32):
    """(InternVLForConditionalGeneration on the CPU in `dtype`, its processor)."""
    return native.load(
        path, model_class=MODEL_CLASS, processor_class=PROCESSOR_CLASS, chat_template=CHAT_TEMPLATE, dtype=dtype
    )
