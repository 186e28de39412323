"""Gemma 3 with vision (google/gemma-3-4b-it, -12b-it, -27b-it; model_type `gemma3`): a SigLIP
tower whose 64 x 64 patches are average-pooled to 256 soft tokens, in front of a Gemma 3 language
model (Gemma3ForConditionalGeneration, Gemma3Processor). The 1B model is text-only
(`gemma3_text`) and not recognised.

What differs from LLaVA, and where it is right:
- Bidirectional attention over image tokens: within one image's soft tokens every token sees
  every other (each image a block; text stays causal). The processor marks the image tokens in
  `token_type_ids` and the model builds that mask in the prefill from them; the runner passes
  them through, and decode steps (one text token each) attend causally to the whole cache, as
  transformers' own generate() does.
- The prompt: the template's <start_of_image> becomes "\\n\\n<start_of_image>", 256
  <image_soft_token>, "<end_of_image>\\n\\n" (the processor's `full_image_sequence`; pan-and-scan
  crops too where a checkpoint's processor turns them on).
- Interleaved local (sliding-window) and global attention layers: the KV cache is built from the
  model's config, so the local layers keep their window.
- Chat template: <bos><start_of_turn>user ... <end_of_turn>, the assistant's role named `model`,
  a system prompt written at the head of the first user turn; answers end at <end_of_turn> (or
  <eos>).
- dtype: Gemma's activations overflow float16, so on a GPU `dtype: auto` gives bfloat16 here.

Left out (hf/processor_runner.py says why): prefix reuse (the bidirectional image blocks are one
reason) and the embedding cache. Several images in one conversation are supported."""

from __future__ import annotations

from pathlib import Path

import torch

from . import native

MODEL_TYPE = "gemma3"
MODEL_CLASS = "Gemma3ForConditionalGeneration"
PROCESSOR_CLASS = "Gemma3Processor"
MULTIPLE_IMAGES = True
CUDA_DTYPE = "bfloat16"  # what `dtype: auto` means on a GPU (float16 elsewhere)

# google/gemma-3-4b-it, tokenizer_config.json / chat_template.json.
CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    '    {%- set first_user_prefix = "" -%}\n'
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    '        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}\n'
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    '        {%- set role = "model" -%}\n'
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    '        {{ raise_exception("Invalid content type") }}\n'
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)


def recognise(path: str | Path) -> bool:
    return native.model_type(path) == MODEL_TYPE


def load(path: str | Path, *, dtype: torch.dtype = torch.float32):
    """(Gemma3ForConditionalGeneration on the CPU in `dtype`, its processor)."""
    return native.load(
        path, model_class=MODEL_CLASS, processor_class=PROCESSOR_CLASS, chat_template=CHAT_TEMPLATE, dtype=dtype
    )
