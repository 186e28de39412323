"""PaliGemma and PaliGemma 2 (google/paligemma2-3b-mix-224, -448, paligemma-3b-mix-224, ...;
model_type `paligemma` for both): a SigLIP tower, one linear projection and a Gemma (PaliGemma 2:
Gemma 2) language model (PaliGemmaForConditionalGeneration, PaliGemmaProcessor).

What differs from LLaVA, and where it is right:
- A prefix-LM: the image tokens and the prompt form a prefix that attends bidirectionally (every
  prefix token sees every other); only the answer is causal. The processor marks the prefix in
  `token_type_ids` (0) and the model builds that mask in the prefill from them; decode steps
  attend causally to the whole cache, as transformers' own generate() does.
- No chat template: the model was trained on task prompts. The processor writes
  `image_seq_length` <image> tokens, <bos>, the prompt and "\\n"; the prompt is
  "answer en <question>", unless the question already is one of PaliGemma's task prompts
  ("caption en", "describe en", "ocr", "answer xx ...", "question xx ...", "detect ...",
  "segment ..."), which goes as typed, so a robot can ask for boxes ("detect cup ; person").
  The answer ends at <eos>.
- dtype: Gemma's activations overflow float16, so on a GPU `dtype: auto` gives bfloat16 here.

Left out: prefix reuse (the bidirectional prefix is one reason) and the embedding cache
(hf/processor_runner.py); a conversation holds one image, and the system prompt and the earlier
turns are not shown to the model: each question is answered on its own about the conversation's
image (PaliGemma has no notion of a system prompt or a dialogue)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..api import InvalidInput, Turn
from . import native

MODEL_TYPE = "paligemma"
MODEL_CLASS = "PaliGemmaForConditionalGeneration"
PROCESSOR_CLASS = "PaliGemmaProcessor"
MULTIPLE_IMAGES = False
CUDA_DTYPE = "bfloat16"
CHAT_TEMPLATE = None  # none: render() writes the prompt
IMAGE_TOKEN = "<image>"

# PaliGemma's task prompts (the model cards' "mix" tasks); anything else is a question.
TASK_PROMPT = re.compile(r"^(?:(?:caption|describe|answer|question) [a-z]{2}(?:\s|$)|ocr\s*$|(?:detect|segment) \S)")


def recognise(path: str | Path) -> bool:
    return native.model_type(path) == MODEL_TYPE


def load(path: str | Path, *, dtype: torch.dtype = torch.float32):
    """(PaliGemmaForConditionalGeneration on the CPU in `dtype`, its processor)."""
    return native.load(path, model_class=MODEL_CLASS, processor_class=PROCESSOR_CLASS, chat_template=None, dtype=dtype)


def task_prompt(question: str) -> str:
    """What PaliGemma is given for `question`: a task prompt as it is, else "answer en ..."."""
    question = question.strip()
    return question if TASK_PROMPT.match(question) else f"answer en {question}"


def render(system_prompt: str, turns: tuple[Turn, ...]) -> tuple[str, list[str]]:
    """(the processor's text: the image placeholder, then the task prompt of the last question;
    the typed texts in it). The processor adds <bos> after the placeholders and "\\n" at the end."""
    images = sum(turn.image is not None for turn in turns)
    if not images:
        raise InvalidInput("PaliGemma answers questions about an image: send one with the question")
    question = turns[-1].text
    return IMAGE_TOKEN * images + task_prompt(question), [question.strip()]
