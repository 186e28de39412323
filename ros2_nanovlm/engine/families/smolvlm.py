"""SmolVLM and SmolVLM2 (HuggingFaceTB/SmolVLM2-256M/500M/2.2B-Video-Instruct, SmolVLM-*-Instruct):
a SigLIP tower, a pixel-shuffle connector and a SmolLM2 (Llama) language model, in transformers'
own format (SmolVLMForConditionalGeneration, SmolVLMProcessor; model_type `smolvlm` for both).

What differs from LLaVA, and where it is right:
- Image splitting: the image processor resizes the frame (longest edge `size`), cuts it into
  tiles of `max_image_size` and adds the whole frame shrunk to one tile as a global view; the
  prompt gets, per tile, <fake_token_around_image><row_R_col_C> and `image_seq_len` <image>
  tokens, then <fake_token_around_image><global-img> and the global view's tokens. The processor
  writes all of it (tiles, row/column markers, `pixel_attention_mask` for the padded tiles).
- Positions are plain 1-D ones and attention is causal: nothing beyond the processor's tensors.
- Chat template: "<|im_start|>User:<image>question<end_of_utterance>\\nAssistant:", roles
  capitalised, no space after the colon when the turn starts with the image; answers end at
  <end_of_utterance>.

transformers' SmolVLMProcessor refuses to exist without the `num2words` package, which it uses
only to write "sixteen frames" into video prompts; where it is missing, numbers are written as
digits (nanovlm sends no videos). Its PIL image processor is loaded by class: transformers 5.17's
AutoImageProcessor does not find it without torchvision.

Left out (hf/processor_runner.py says why): prefix reuse and the embedding cache. Several images
in one conversation are supported."""

from __future__ import annotations

from pathlib import Path

import torch

from . import native

MODEL_TYPE = "smolvlm"
MODEL_CLASS = "SmolVLMForConditionalGeneration"
PROCESSOR_CLASS = "SmolVLMProcessor"
MULTIPLE_IMAGES = True
# Its language model runs on the GPU fast path (cuda/processor_fast.py) where cuda/support.py allows.
FAST_LANGUAGE_MODEL = True

# HuggingFaceTB/SmolVLM2-2.2B-Instruct, chat_template.json (image and text parts; its video part
# writes <video>, which nanovlm never sends).
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% elif line['type'] == 'video' %}{{ '<video>' }}{% endif %}"
    "{% endfor %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def recognise(path: str | Path) -> bool:
    return native.model_type(path) == MODEL_TYPE


def load(path: str | Path, *, dtype: torch.dtype = torch.float32):
    """(SmolVLMForConditionalGeneration on the CPU in `dtype`, its processor)."""
    _without_num2words()
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    return native.load(
        path,
        model_class=MODEL_CLASS,
        processor_class=PROCESSOR_CLASS,
        chat_template=CHAT_TEMPLATE,
        dtype=dtype,
        pil_image_processor=SmolVLMImageProcessorPil,
    )


def _without_num2words() -> None:
    """Let SmolVLMProcessor be built where `num2words` is not installed (see the docstring)."""
    from transformers.models.smolvlm import processing_smolvlm

    if processing_smolvlm.num2words is None:
        processing_smolvlm.num2words = str
