"""Qwen3-VL (Qwen/Qwen3-VL-2B-Instruct, -4B-, -8B-, ...; the -Thinking variants carry their own
template, which is used as they ship it): a ViT with 16 px patches, learned position embeddings
interpolated to the frame's grid and a 2 x 2 merger, whose features also enter early language-model
layers (DeepStack), in front of a Qwen3 language model (Qwen3VLForConditionalGeneration,
Qwen3VLProcessor).

What differs from LLaVA, and where it is right:
- Dynamic resolution, as Qwen2.5-VL's: each frame resized to multiples of 32 px within the
  processor's pixel budget, `image_grid_thw` saying how its patches tile, h * w / 4 <|image_pad|>
  tokens in the prompt.
- 3-D rotary positions (M-RoPE) with the time/height/width frequencies interleaved
  (`mrope_interleaved`): computed by the model from input_ids, `mm_token_type_ids` and
  image_grid_thw in the prefill, `rope_deltas` kept for the decode steps (cleared by the runner
  before every prefill, so a text-only prompt never decodes with an old image's deltas).
- DeepStack: the vision tower's intermediate features are added to the hidden states of the
  first language-model layers at the image tokens; inside the model's forward, fed by the
  processor's tensors.
- Chat template: ChatML without a default system turn (Qwen2.5-VL has one), the image as
  <|vision_start|><|image_pad|><|vision_end|>; answers end at <|im_end|>.

Left out (hf/processor_runner.py says why): prefix reuse and the embedding cache. Several images
in one conversation are supported."""

from __future__ import annotations

from pathlib import Path

import torch

from . import native

MODEL_TYPE = "qwen3_vl"
MODEL_CLASS = "Qwen3VLForConditionalGeneration"
PROCESSOR_CLASS = "Qwen3VLProcessor"
MULTIPLE_IMAGES = True
# Its language model runs on the GPU fast path (cuda/processor_fast.py) where cuda/support.py allows.
FAST_LANGUAGE_MODEL = True

# Qwen/Qwen3-VL-*-Instruct, chat_template.json (tool calls included; nanovlm sends none).
CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""


def recognise(path: str | Path) -> bool:
    return native.model_type(path) == MODEL_TYPE


def load(path: str | Path, *, dtype: torch.dtype = torch.float32):
    """(Qwen3VLForConditionalGeneration on the CPU in `dtype`, its processor)."""
    return native.load(
        path, model_class=MODEL_CLASS, processor_class=PROCESSOR_CLASS, chat_template=CHAT_TEMPLATE, dtype=dtype
    )
