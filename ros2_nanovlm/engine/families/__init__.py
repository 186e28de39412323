"""Model families whose published checkpoints are not transformers directories: each is
recognised from its config.json alone (no weights read) and converted in memory, on load, to
the transformers classes the backend already runs (LlavaForConditionalGeneration and
LlavaNextForConditionalGeneration, with a processor that carries the family's chat template).

A family module has:
    recognise(path) -> bool       from config.json keys and architectures only
    load(path, *, dtype, vision_tower=None) -> (model on the CPU, processor)
and is listed in FAMILIES, first match wins. transformers-format directories (llava-hf) are
no family's: they load as before.

The vision tower that LLaVA-style checkpoints name but do not hold is found offline (towers.py):
the `vision_tower` argument or $NANOVLM_VISION_TOWER, a local directory, or the Hugging Face cache.

PROCESSOR_FAMILIES are the other kind: transformers-format directories whose model needs more
than image features spliced at one token (3-D positions, image splitting, bidirectional image
attention, a prefix-LM), so they run through their own processor and model class
(hf/processor_runner.py). Such a module has:
    MODEL_TYPE, MODEL_CLASS, PROCESSOR_CLASS   config.json's model_type; transformers class names
    MULTIPLE_IMAGES                            whether a conversation may hold several images
    FAST_LANGUAGE_MODEL                        optional: True when the GPU fast path may run its language
                                               model (cuda/processor_fast.py; Gemma and PaliGemma: no)
    CHAT_TEMPLATE                              the published template (used where a directory has none)
    CUDA_DTYPE                                 optional: what `dtype: auto` gives on a GPU (else float16)
    recognise(path) -> bool                    from config.json's model_type
    load(path, *, dtype) -> (model on the CPU, processor)
    render(system_prompt, turns) -> (text, typed texts)   optional: a prompt format that is not
                                               a chat template (PaliGemma)
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import torch

from ..api import ModelLoadError
from . import gemma3, internvl, llava_original, obsidian, paligemma, qwen2_5_vl, qwen3_vl, smolvlm, vila

# Most specific first: VILA's and Obsidian's configs also carry LLaVA's mm_* keys.
FAMILIES: tuple[ModuleType, ...] = (vila, obsidian, llava_original)

# transformers-format directories run by their own processor, recognised by model_type.
PROCESSOR_FAMILIES: tuple[ModuleType, ...] = (qwen2_5_vl, qwen3_vl, smolvlm, internvl, gemma3, paligemma)
PROCESSOR_MODEL_TYPES: tuple[str, ...] = tuple(family.MODEL_TYPE for family in PROCESSOR_FAMILIES)


def find(path: str | Path) -> ModuleType | None:
    """The family whose original layout `path` holds, or None (a transformers directory, or
    something else that the caller reports)."""
    directory = Path(path).expanduser()
    if not (directory / "config.json").is_file():
        return None
    return next((family for family in FAMILIES if family.recognise(directory)), None)


def find_processor_family(path: str | Path) -> ModuleType | None:
    """The processor-driven family of the transformers directory `path`, or None."""
    return next((family for family in PROCESSOR_FAMILIES if family.recognise(path)), None)


def load(path: str | Path, *, dtype: torch.dtype = torch.float32, vision_tower: str | Path | None = None):
    """(transformers model on the CPU in `dtype`, processor) of an original checkpoint."""
    family = find(path)
    if family is None:
        raise ModelLoadError(f"'{path}' is not the original checkpoint of a known model family")
    return family.load(path, dtype=dtype, vision_tower=vision_tower)
