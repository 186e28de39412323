"""LLaVA-1.5 and LLaVA-1.6 as their authors publish them (liuhaotian/llava-v1.5-7b,
llava-v1.6-vicuna-7b, llava-v1.6-mistral-7b, ...), converted in memory to transformers'
LlavaForConditionalGeneration / LlavaNextForConditionalGeneration, so the rest of the engine
runs them as it runs the llava-hf conversions.

The original layout (haotian-liu/LLaVA, llava/model/llava_arch.py and builder.py):
  config.json    a LlamaConfig (MistralConfig) plus `mm_vision_tower`, `mm_projector_type`,
                 `mm_hidden_size`, `mm_vision_select_layer` (-2), `mm_vision_select_feature`
                 ("patch": drop CLS), `image_aspect_ratio` ("pad"; 1.6: "anyres" with
                 `image_grid_pinpoints` and `mm_patch_merge_type` "spatial_unpad")
  weights        model.embed_tokens / model.layers.N.* / model.norm / lm_head (the language model,
                 as LlamaForCausalLM names them), model.mm_projector.{0,2}.* (mlp2x_gelu: Linear,
                 GELU, Linear) or model.mm_projector.* (linear), 1.6: model.image_newline and the
                 fine-tuned tower as model.vision_tower.vision_tower.vision_model.*
  tokenizer      the Vicuna/Mistral SentencePiece tokenizer, without an <image> token: LLaVA's
                 code splices the image where the prompt text says "<image>"
The CLIP tower itself (1.5) is not in the checkpoint: towers.py finds it offline.

Obsidian shares the layout with another language model (obsidian.py); `assemble` is the part
they share.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..api import ModelLoadError
from .checkpoint import load_weights, read_config
from .towers import VisionTower, find_vision_tower

IMAGE_TOKEN = "<image>"

# architectures[0] (or model_type) in config.json -> the language model's transformers config
TEXT_MODELS = {
    "LlavaLlamaForCausalLM": "llama",
    "LlavaMistralForCausalLM": "mistral",
    "llava": "llama",
    "llava_llama": "llama",
    "llava_mistral": "mistral",
}
PROJECTOR_TYPES = ("mlp2x_gelu", "linear")

# Keys of an original config.json that describe the multimodal parts, not the language model.
MULTIMODAL_KEYS = (
    "architectures",
    "model_type",
    "auto_map",
    "_name_or_path",
    "image_aspect_ratio",
    "image_grid_pinpoints",
    "image_crop_resolution",
    "image_split_resolution",
    "freeze_mm_mlp_adapter",
    "tune_mm_mlp_adapter",
    "unfreeze_mm_vision_tower",
    "use_mm_proj",
    "tokenizer_model_max_length",
    "tokenizer_padding_side",
    "transformers_version",
)

# LLaVA's conv_llava_v1 (the "vicuna_v1" format of its model cards):
#   SYSTEM USER: <image>\nQUESTION ASSISTANT: ANSWER</s>USER: ... ASSISTANT:
VICUNA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
# Content is a string or a list of typed parts (processor style); an image part is "<image>\n".
_CONTENT_MACRO = (
    "{%- macro content(value) -%}"
    "{%- if value is string -%}{{ value }}{%- else -%}"
    "{%- for part in value -%}"
    "{%- if part['type'] == 'image' -%}{{ '<image>\n' }}{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)


def _system_then_turns(default_system: str) -> str:
    """Jinja: `system` (the first message's text, or the family's default) and `turns`."""
    return (
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = content(messages[0]['content']) -%}{%- set turns = messages[1:] -%}"
        "{%- else -%}"
        f"{{%- set system = {json.dumps(default_system)} -%}}{{%- set turns = messages -%}}"
        "{%- endif -%}"
    )


def vicuna_v1_template(default_system: str) -> str:
    return (
        _CONTENT_MACRO
        + _system_then_turns(default_system)
        + (
            "{%- if system -%}{{ system + ' ' }}{%- endif -%}"
            "{%- for message in turns -%}"
            "{%- if message['role'] == 'user' -%}{{ 'USER: ' + content(message['content']) + ' ' }}"
            "{%- else -%}{{ 'ASSISTANT: ' + content(message['content']) + '</s>' }}{%- endif -%}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
        )
    )


VICUNA_V1_TEMPLATE = vicuna_v1_template(VICUNA_V1_SYSTEM)

# LLaVA's conv_mistral_instruct (llava-v1.6-mistral-7b): [INST] <image>\nQUESTION [/INST] ANSWER </s>
MISTRAL_INSTRUCT_TEMPLATE = (
    _CONTENT_MACRO
    + _system_then_turns("")
    + (
        "{%- for message in turns -%}"
        "{%- if message['role'] == 'user' -%}"
        "{%- set text = content(message['content']) -%}"
        "{%- if loop.first and system -%}{%- set text = '<<SYS>>\n' + system + '\n<</SYS>>\n\n' + text -%}{%- endif -%}"
        "{{ '[INST] ' + text + ' [/INST]' }}"
        "{%- else -%}{{ ' ' + content(message['content']) + ' </s>' }}{%- endif -%}"
        "{%- endfor -%}"
    )
)


@dataclass
class Recipe:
    """What a family of LLaVA's layout brings of its own."""

    text_config: Callable[[dict], object]  # original config.json -> transformers text config
    chat_template: str
    stop_strings: tuple[str, ...] = ()  # ends of an answer besides EOS (kept when one token each)
    name: str = "LLaVA"


def recognise(path: str | Path) -> bool:
    config = read_config(path)
    return config is not None and is_llava_layout(config) and _text_model(config) in ("llama", "mistral")


def is_llava_layout(config: dict) -> bool:
    """A single checkpoint with LLaVA's multimodal keys, not a transformers (llava-hf) one."""
    return "mm_vision_tower" in config and "text_config" not in config and "llm_cfg" not in config


def _text_model(config: dict) -> str | None:
    for name in [*(config.get("architectures") or []), config.get("model_type")]:
        if name in TEXT_MODELS:
            return TEXT_MODELS[name]
    return None


def load(path: str | Path, *, dtype: torch.dtype = torch.float32, vision_tower: str | Path | None = None):
    """(transformers LLaVA model on the CPU, processor with a chat template)."""
    return assemble(path, _recipe(read_config(path) or {}), dtype=dtype, vision_tower=vision_tower)


def text_config(path: str | Path) -> dict:
    """The language model's transformers config as a dict (config.json only, nothing else read)."""
    original = read_config(path) or {}
    return _recipe(original).text_config(original).to_dict()


def _recipe(original: dict) -> Recipe:
    if _text_model(original) == "mistral":
        return Recipe(_plain_text_config("mistral"), MISTRAL_INSTRUCT_TEMPLATE, name="LLaVA (Mistral)")
    return Recipe(_plain_text_config("llama"), VICUNA_V1_TEMPLATE, name="LLaVA")


def _plain_text_config(model_type: str):
    def build(original: dict):
        from transformers import AutoConfig

        return AutoConfig.for_model(model_type, **text_config_keys(original))

    return build


def text_config_keys(original: dict) -> dict:
    """The language model's part of an original config.json."""
    return {key: value for key, value in original.items() if key not in MULTIMODAL_KEYS and not key.startswith("mm_")}


def assemble(path: str | Path, recipe: Recipe, *, dtype: torch.dtype, vision_tower: str | Path | None):
    """Config, weights and processor of a LLaVA-layout checkpoint, as transformers classes."""
    path = Path(path).expanduser()
    original = read_config(path)
    if original is None:
        raise ModelLoadError(f"'{path}' has no readable config.json")
    tokenizer, image_token_id = load_tokenizer(path)
    tower = find_vision_tower(original.get("mm_vision_tower", ""), path, vision_tower)
    config = hf_config(path, original, recipe.text_config(original), tower, image_token_id)
    state = convert_weights(path, original, config, tower, dtype)
    model = build_model(config, state, dtype)
    model.generation_config.eos_token_id = sorted(stop_token_ids(tokenizer, recipe.stop_strings))
    processor = build_processor(original, config, tower, tokenizer, recipe.chat_template)
    return model.eval(), processor


def load_tokenizer(path: Path):
    """The checkpoint's tokenizer with LLaVA's image placeholder added as one special token."""
    from transformers import AddedToken, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, ImportError, KeyError, TypeError, AttributeError) as error:
        hint = ""
        if (path / "tokenizer.model").is_file() and not (path / "tokenizer.json").is_file():
            hint = " (a SentencePiece tokenizer.model needs the sentencepiece and protobuf packages)"
        raise ModelLoadError(f"cannot load the tokenizer in '{path}'{hint}: {error}") from error
    if not getattr(tokenizer, "is_fast", False):
        raise ModelLoadError(f"'{path}': the tokenizer loads only as a slow tokenizer; a fast one is needed")
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    return tokenizer, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def hf_config(path: Path, original: dict, text_config, tower: VisionTower, image_token_id: int):
    """LlavaConfig (or LlavaNextConfig for 1.6's any-resolution tiles) of an original config."""
    from transformers import LlavaConfig, LlavaNextConfig

    projector = original.get("mm_projector_type", "linear")
    if projector not in PROJECTOR_TYPES:
        raise ModelLoadError(
            f"'{path}': mm_projector_type '{projector}' is not supported (supported: {', '.join(PROJECTOR_TYPES)})"
        )
    if original.get("mm_use_im_start_end"):
        raise ModelLoadError(f"'{path}': mm_use_im_start_end (image start/end tokens) is not supported")
    select = original.get("mm_vision_select_feature", "patch")
    if select not in ("patch", "cls_patch"):
        raise ModelLoadError(f"'{path}': mm_vision_select_feature '{select}' is not one of patch, cls_patch")
    mm_hidden = original.get("mm_hidden_size", tower.config.hidden_size)
    if mm_hidden != tower.config.hidden_size:
        raise ModelLoadError(
            f"'{path}': mm_hidden_size is {mm_hidden}, but the vision tower '{tower.name}' in '{tower.path}' "
            f"has hidden size {tower.config.hidden_size}"
        )
    common = dict(
        vision_config=tower.config,
        text_config=text_config,
        image_token_id=image_token_id,
        vision_feature_layer=original.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy="default" if select == "patch" else "full",
        # A linear projector becomes linear_1 with an identity linear_2 after an identity
        # activation: the same numbers, in the one projector class transformers has.
        projector_hidden_act="gelu" if projector == "mlp2x_gelu" else "linear",
        multimodal_projector_bias=True,
        tie_word_embeddings=getattr(text_config, "tie_word_embeddings", False),
    )
    if original.get("image_aspect_ratio") != "anyres":
        return LlavaConfig(**common)
    merge = original.get("mm_patch_merge_type", "flat")
    pinpoints = original.get("image_grid_pinpoints")
    if merge != "spatial_unpad":
        raise ModelLoadError(f"'{path}': anyres with mm_patch_merge_type '{merge}' is not supported (spatial_unpad is)")
    if not (isinstance(pinpoints, list) and all(isinstance(p, list) and len(p) == 2 for p in pinpoints)):
        raise ModelLoadError(f"'{path}': image_grid_pinpoints must be a list of [height, width], got {pinpoints!r}")
    return LlavaNextConfig(**common, image_grid_pinpoints=pinpoints)


def convert_weights(path: Path, original: dict, config, tower: VisionTower, dtype: torch.dtype) -> dict:
    """The checkpoint's tensors under transformers' names, checked against `config`'s model."""
    state = load_weights(path, keep=lambda name: not name.endswith(".rotary_emb.inv_freq"))
    projector = original.get("mm_projector_type", "linear")
    if projector == "mlp2x_gelu":
        projector_keys = {
            f"model.mm_projector.{i}.{p}": f"linear_{j}.{p}" for i, j in ((0, 1), (2, 2)) for p in ("weight", "bias")
        }
    else:
        projector_keys = {f"model.mm_projector.{p}": f"linear_1.{p}" for p in ("weight", "bias")}
    missing = [name for name in projector_keys if name not in state]
    if missing:
        raise ModelLoadError(
            f"'{path}' lacks the projector weights {', '.join(missing)} (mm_projector_type '{projector}')"
        )
    anyres = config.model_type == "llava_next"
    if anyres and "model.image_newline" not in state:
        raise ModelLoadError(f"'{path}' lacks model.image_newline, which image_aspect_ratio 'anyres' needs")

    converted: dict[str, torch.Tensor] = {}
    tower_prefix = "model.vision_tower.vision_tower."
    for name, tensor in state.items():
        if name in projector_keys:
            converted["model.multi_modal_projector." + projector_keys[name]] = tensor
        elif name.startswith(tower_prefix):  # 1.6 fine-tuned the tower and ships it
            converted["model.vision_tower." + name[len(tower_prefix) :].removeprefix("vision_model.")] = tensor
        elif name == "model.image_newline":
            if anyres:  # 1.5-style checkpoints may carry it unused (flat merge)
                converted["model.image_newline"] = tensor
        elif name == "lm_head.weight":
            converted[name] = tensor
        elif name.startswith("model."):
            converted["model.language_model." + name[len("model.") :]] = tensor
        else:
            raise ModelLoadError(f"'{path}': unexpected weight '{name}' in a LLaVA checkpoint")
    if projector == "linear":
        hidden = config.text_config.hidden_size
        converted["model.multi_modal_projector.linear_2.weight"] = torch.eye(hidden)
        converted["model.multi_modal_projector.linear_2.bias"] = torch.zeros(hidden)
    if not any(name.startswith("model.vision_tower.") for name in converted):
        converted.update(("model.vision_tower." + name, tensor) for name, tensor in tower.weights().items())
    return checked(path, config, converted, dtype)


def checked(path: Path, config, state: dict, dtype: torch.dtype, cls=None) -> dict:
    """`state` cast to `dtype`, after checking names and shapes against the model `config`
    describes (built on the meta device: no memory, no initialisation)."""
    with torch.device("meta"):
        skeleton = (cls or model_class(config))(config)
    expected = skeleton.state_dict()
    if getattr(config, "tie_word_embeddings", False):
        expected.pop("lm_head.weight", None)
        state.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModelLoadError(
            f"'{path}': the weights do not fit the model its config.json describes: "
            f"missing {_few(missing)}; unexpected {_few(unexpected)}"
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ModelLoadError(
                f"'{path}': weight '{name}' has shape {tuple(tensor.shape)}, the config needs {tuple(expected[name].shape)}"
            )
    return {name: tensor.to(dtype) if tensor.is_floating_point() else tensor for name, tensor in state.items()}


def _few(names: list[str], shown: int = 4) -> str:
    if not names:
        return "none"
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def model_class(config):
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    return LlavaNextForConditionalGeneration if config.model_type == "llava_next" else LlavaForConditionalGeneration


def build_model(config, state: dict, dtype: torch.dtype, cls=None):
    """The transformers model holding `state` (names and shapes already checked)."""
    try:
        return (cls or model_class(config)).from_pretrained(None, config=config, state_dict=state, dtype=dtype)
    except (OSError, ValueError, RuntimeError) as error:
        raise ModelLoadError(f"cannot build the {config.model_type} model: {error}") from error


def stop_token_ids(tokenizer, stop_strings: tuple[str, ...]) -> set[int]:
    """EOS plus each stop string that the tokenizer holds as one token."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids.update(vocab[text] for text in stop_strings if text in vocab)
    return ids


def build_processor(original: dict, config, tower: VisionTower, tokenizer, chat_template: str):
    """The transformers processor: the tower's image settings with the checkpoint's image
    aspect mode, the tokenizer and the family's chat template."""
    from transformers import (
        CLIPImageProcessorPil,
        LlavaImageProcessorPil,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
        LlavaProcessor,
        SiglipImageProcessorPil,
    )

    siglip = tower.config.model_type == "siglip_vision_model"
    aspect = original.get("image_aspect_ratio")
    if config.model_type == "llava_next":
        image_processor = tower.image_processor(
            LlavaNextImageProcessorPil, image_grid_pinpoints=config.image_grid_pinpoints
        )
    elif siglip:
        image_processor = tower.image_processor(SiglipImageProcessorPil)
    elif aspect == "pad":  # LLaVA's expand2square: pad to a square of the mean colour, then CLIP's resize
        image_processor = tower.image_processor(LlavaImageProcessorPil, do_pad=True)
    elif aspect == "resize":  # squash to the tower's size, no crop (VILA)
        side = tower.config.image_size
        image_processor = tower.image_processor(
            CLIPImageProcessorPil, size={"height": side, "width": side}, do_center_crop=False
        )
    else:
        image_processor = tower.image_processor(CLIPImageProcessorPil)
    processor_class = LlavaNextProcessor if config.model_type == "llava_next" else LlavaProcessor
    # The checkpoint's own template wins when it places images; the original checkpoints ship none.
    own = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    if own and "image" not in own:
        own = None
    chat_template = own or chat_template
    tokenizer.chat_template = chat_template
    return processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=tower.config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        chat_template=chat_template,
        num_additional_image_tokens=0 if siglip else 1,  # CLIP's CLS token
        image_token=IMAGE_TOKEN,
    )
