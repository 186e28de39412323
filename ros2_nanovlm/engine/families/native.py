"""What the transformers-format families (Qwen2.5-VL, Qwen3-VL, SmolVLM2, Gemma 3, PaliGemma 2,
InternVL) share: they are published as transformers directories and run through their own
processor and model class (hf/processor_runner.py), so loading one is finding its classes and
reading the directory, offline.

One gap of the CPU environment is bridged here: these processors also hold a video processor, and
every transformers video processor needs torchvision (which this project keeps out of its CPU
environment: it pulls a CUDA build of torch). Without torchvision the processor is built from the
same files with a stand-in that refuses videos; images go through the family's own image
processor (its PIL variant) exactly as with torchvision's."""

from __future__ import annotations

from pathlib import Path

import torch

from ..api import ModelLoadError
from .checkpoint import read_config


def model_type(path: str | Path) -> str | None:
    """`model_type` of the directory's config.json (None when it has none or cannot be read)."""
    config = read_config(path)
    value = config.get("model_type") if config else None
    return value if isinstance(value, str) else None


def load(
    path: str | Path,
    *,
    model_class: str,
    processor_class: str,
    chat_template: str | None,
    dtype: torch.dtype,
    pil_image_processor=None,
):
    """(model on the CPU in `dtype`, processor) of a transformers directory. `chat_template` is
    the family's, used only when the directory carries none (a fine-tune saved without it).
    `pil_image_processor`: the family's PIL image processor class, for a transformers whose
    AutoImageProcessor cannot find it without torchvision."""
    import transformers

    try:
        processor = load_processor(path, getattr(transformers, processor_class), pil_image_processor)
        model = getattr(transformers, model_class).from_pretrained(path, dtype=dtype, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, ImportError) as error:
        raise ModelLoadError(
            f"cannot load the model in '{path}': {type(error).__name__}: {str(error)[:300]}"
        ) from error
    if getattr(processor, "chat_template", None) is None and chat_template is not None:
        processor.chat_template = chat_template
    return model.eval(), processor


def load_processor(path: str | Path, processor_class, pil_image_processor=None):
    """The directory's processor, as `processor_class.from_pretrained` loads it; where it wants a
    video processor and torchvision is missing, the same processor with a stand-in for that."""
    from transformers.utils import is_torchvision_available

    if "video_processor" not in processor_class.get_attributes() or is_torchvision_available():
        return processor_class.from_pretrained(path, local_files_only=True)
    from transformers import AutoTokenizer
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    processor_dict, kwargs = processor_class.get_processor_dict(path, local_files_only=True)

    def image_processor():
        if pil_image_processor is not None:
            return pil_image_processor.from_pretrained(path, local_files_only=True)
        return AutoImageProcessor.from_pretrained(path, local_files_only=True)

    parts = {
        "image_processor": image_processor,
        "tokenizer": lambda: AutoTokenizer.from_pretrained(path, local_files_only=True),
        "video_processor": NoVideos,
    }
    args = []
    for attribute in processor_class.get_attributes():
        if attribute not in parts:
            raise ModelLoadError(f"'{path}': {processor_class.__name__} needs a {attribute}, which nanovlm cannot load")
        args.append(parts[attribute]())
    return images_only(processor_class).from_args_and_dict(args, processor_dict, **kwargs)


class NoVideos:
    """Stands in for a processor's video processor where torchvision is missing: images only."""

    num_frames = None  # read by SmolVLMProcessor.apply_chat_template
    fps = None

    def __call__(self, *args, **kwargs):
        raise ModelLoadError("videos need torchvision, which is not installed (nanovlm sends images only)")


_IMAGES_ONLY: dict[type, type] = {}


def images_only(processor_class: type) -> type:
    """`processor_class` accepting NoVideos as its video processor (transformers checks the class
    of each part against BaseVideoProcessor, which is a placeholder without torchvision)."""
    if processor_class not in _IMAGES_ONLY:

        def check_argument_for_proper_class(self, argument_name, argument):
            if isinstance(argument, NoVideos):
                return NoVideos
            return processor_class.check_argument_for_proper_class(self, argument_name, argument)

        def to_dict(self) -> dict:
            output = processor_class.to_dict(self)
            output.pop("video_processor", None)
            return output

        _IMAGES_ONLY[processor_class] = type(
            processor_class.__name__,
            (processor_class,),
            {
                "check_argument_for_proper_class": check_argument_for_proper_class,
                "to_dict": to_dict,
                "__module__": __name__,
            },
        )
    return _IMAGES_ONLY[processor_class]
