"""Processor-driven models (engine/families PROCESSOR_FAMILIES: Qwen2.5-VL, Qwen3-VL, SmolVLM2,
Gemma 3, PaliGemma 2, InternVL): the family's own processor turns the conversation and its images
into the model's inputs, the model's own forward runs them, and the logits go through THE
generation loop (generation.py), so streaming, cancel and constrained JSON work as for LLaVA.

Why not LLaVA's path (image features spliced into the embeddings at one token): what makes these
models differ lives in the processor and the forward, and a splice would have to redo each:
Qwen's 3-D rotary positions are computed from input_ids, `mm_token_type_ids` and `image_grid_thw`;
SmolVLM's and InternVL's tiles come with their row/column marker tokens; Gemma 3 attends
bidirectionally within each image and PaliGemma over its whole prefix (image + prompt), both from
`token_type_ids` in the prefill. Passing the processor's tensors to the model's forward keeps all
of that the model's own business.

- Prefill: one forward of the whole prompt (every processor tensor, a fresh KV cache).
- Decode step: one token, with that cache; the model keeps its own positions (Qwen's rope_deltas
  from the prefill; the others count the cache) and attends causally.

On a GPU, the families with FAST_LANGUAGE_MODEL (Qwen2.5-VL, Qwen3-VL, SmolVLM2, InternVL) run
their language model on FastLlama instead (4-bit weights, CUDA-graph decode steps): the model's
forward still prepares its inputs, up to the language model (cuda/processor_fast.py).

Left out, on purpose, for these families (every Answer says reused_tokens 0 and
image_cache_hit False):
- Prefix reuse. The KV of a prefix is reusable only where the prefix's positions and attention
  do not depend on what follows. Here they can: Gemma 3's and PaliGemma's prefill masks are
  bidirectional over image/prefix blocks, Qwen's rope_deltas come from the whole prompt's images,
  and a chat template may rewrite earlier turns. Every answer prefills its whole prompt.
- The embedding cache. The vision tower runs inside the model's forward, fed with pixels; the
  backend never holds image features to cache (prepare_images encodes nothing).
- Videos (the processors' video half needs torchvision, and nanovlm sends frames).
Timings: vision_ms is the processor's time (resizing, tiling, tokenizing); the vision tower's
time is part of prefill_ms.
"""

from __future__ import annotations

import gc
import re
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from transformers import DynamicCache

from .. import generation
from ..api import Answer, Backend, GenerationControl, GenerationRequest, InvalidInput, ModelLoadError, Timings, Turn
from ..config import EngineConfig
from ..token_mask import DeviceTokenMask
from .backend import _eos_token_ids, _ms_since
from .loading import read_model_config, resolve_device, resolve_dtype
from .prompting import ChatPrompter, _spans_of

# Processor outputs with one entry per prompt token (re-spliced when typed control tokens become
# text); every other tensor (pixels, grids, masks of tiles) describes the images.
TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")
# Processor outputs the forward must not get: PaliGemma's `labels` would make it compute a loss.
DROPPED_KEYS = ("labels",)
# Processor attributes naming the strings it replaces in the text with image (video) tokens.
PLACEHOLDER_ATTRIBUTES = (
    "image_token",
    "video_token",
    "boi_token",
    "start_image_token",
    "end_image_token",
    "fake_image_token",
    "global_image_token",
)


@dataclass
class ProcessorPrompt:
    """The model inputs of one prompt, on the model's device. generation.generate reads
    `shape[0]` as the prompt's length, as it does for an embedding matrix."""

    tensors: dict[str, torch.Tensor]
    length: int
    images: int

    @property
    def shape(self) -> tuple[int]:
        return (self.length,)


class ProcessorPrompter(ChatPrompter):
    """A conversation to model inputs through the family's processor, with the model's own chat
    template (or the family's `render`, PaliGemma's task prompt).

    What a user typed stays text, as ChatPrompter guarantees for LLaVA: each control token typed
    inside a prompt (a chat-template marker, an image placeholder) is swapped for a stand-in
    control token before the processor sees the text (so the processor neither makes it a control
    token nor expands it into image tokens), and the stand-in's id is then replaced by the typed
    characters tokenized as plain text. A stand-in is a special token of its own, so the tokens
    around it come out as they do around the control token it replaces; a prompt without typed
    control tokens reaches the processor unchanged, exactly as transformers' apply_chat_template
    would render it.

    inputs() runs on the thread that generates; count_tokens() on any thread."""

    def __init__(self, processor, family: ModuleType, device: torch.device, dtype: torch.dtype):
        super().__init__(processor, processor.tokenizer, getattr(processor, "image_token_id", None))
        self._processor = processor
        self._family_render = getattr(family, "render", None)
        self._device = device
        self._dtype = dtype
        tokenizer = processor.tokenizer
        placeholders = {getattr(processor, name, None) for name in PLACEHOLDER_ATTRIBUTES}
        self._placeholders = {token for token in placeholders if isinstance(token, str) and token}
        control = {tokenizer.convert_ids_to_tokens(i) for i in self._control_token_ids()}
        protected = sorted(control | self._placeholders, key=len, reverse=True)  # longest first, as the tokenizer
        self._protected = re.compile("|".join(re.escape(token) for token in protected)) if protected else None
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        plain = {token.content for token in added.values() if token.special and not (token.lstrip or token.rstrip)}
        never = self._placeholders | {tokenizer.bos_token, tokenizer.eos_token}
        # Stand-in candidates: special tokens that keep their neighbours' whitespace and that no
        # processor inserts by itself; unk and pad first (no template or image expansion writes them).
        first = [token for token in (tokenizer.unk_token, tokenizer.pad_token) if token in plain - never]
        self._stand_ins = list(dict.fromkeys(first + sorted(plain - never)))

    def inputs(self, system_prompt: str, turns: tuple[Turn, ...]) -> ProcessorPrompt:
        """The model inputs of the conversation (images in conversation order)."""
        if self._family_render is not None:
            text, typed = self._family_render(system_prompt, turns)
        else:
            text, typed = self.render(system_prompt, turns), [system_prompt, *(turn.text for turn in turns)]
        images = [_pil(turn.image) for turn in turns if turn.image is not None]
        occurrences = self._typed_control_tokens(text, _spans_of(text, typed))
        if not occurrences:
            batch = self._process(text, images)
        else:
            batch = self._process_with_stand_in(text, images, occurrences)
        tensors = {}
        for key, value in batch.items():
            if key in DROPPED_KEYS or not isinstance(value, torch.Tensor):
                continue
            value = value.to(self._device)
            tensors[key] = value.to(self._dtype) if value.is_floating_point() else value
        return ProcessorPrompt(tensors, int(tensors["input_ids"].shape[1]), len(images))

    def _process(self, text: str, images: list):
        kwargs = {"text": text, "return_tensors": "pt"}
        if images:
            kwargs["images"] = images
        bos = self._tokenizer.bos_token
        if bos and text.startswith(bos):  # the template wrote BOS: the tokenizer must not add another
            kwargs["add_special_tokens"] = False
        try:
            return self._processor(**kwargs)
        except ValueError as error:  # what the processor refuses here is the request's
            raise InvalidInput(f"the model's processor cannot prepare this request: {error}") from error

    def _typed_control_tokens(self, text: str, typed: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """(start, end) of each control token or image placeholder typed inside the typed spans,
        found as the tokenizer finds added tokens: leftmost, longest first."""
        if self._protected is None:
            return []
        return [match.span() for start, end in typed for match in self._protected.finditer(text, start, end)]

    def _process_with_stand_in(self, text: str, images: list, occurrences: list[tuple[int, int]]):
        tokenizer = self._tokenizer
        for stand_in in self._stand_ins:
            pieces, last = [], 0
            for start, end in occurrences:
                pieces += [text[last:start], stand_in]
                last = end
            swapped = "".join(pieces) + text[last:]
            if swapped.count(stand_in) != len(occurrences):
                continue  # the template wrote this token: it cannot mark the typed ones
            batch = self._process(swapped, images)
            stand_in_id = tokenizer.convert_tokens_to_ids(stand_in)
            ids = batch["input_ids"][0].tolist()
            positions = [i for i, token in enumerate(ids) if token == stand_in_id]
            if len(positions) != len(occurrences):
                continue  # the processor wrote this token too: try another
            typed = [
                tokenizer(text[start:end], add_special_tokens=False, split_special_tokens=True)["input_ids"]
                for start, end in occurrences
            ]
            return _splice(batch, positions, typed)
        raise InvalidInput("the prompt's control tokens cannot be kept as text for this model")


def _splice(batch, positions: list[int], pieces: list[list[int]]):
    """`batch` with the token at each position replaced by a piece's ids; the other per-token
    tensors repeat that token's value (text: attended to, no image, prefix as it was)."""
    length = batch["input_ids"].shape[1]
    keys = [key for key in TOKEN_KEYS if key in batch and tuple(batch[key].shape) == (1, length)]
    rows = {key: batch[key][0].tolist() for key in keys}
    spliced: dict[str, list[int]] = {key: [] for key in keys}
    previous = 0
    for position, piece in zip(positions, pieces):
        for key in keys:
            spliced[key] += rows[key][previous:position]
            spliced[key] += piece if key == "input_ids" else [rows[key][position]] * len(piece)
        previous = position + 1
    for key in keys:
        spliced[key] += rows[key][previous:]
        batch[key] = torch.tensor([spliced[key]], dtype=batch[key].dtype)
    return batch


def _pil(frame: np.ndarray):
    """An RGB frame as the PIL image processors expect (no guessing of the channel axis)."""
    from PIL import Image

    return Image.fromarray(np.ascontiguousarray(frame), mode="RGB")


class ProcessorRunner:
    """The runner protocol of generation.py over a processor-driven model: prefill takes a
    ProcessorPrompt (only at position 0: no prefix reuse), decode steps feed one token.

    The KV cache is transformers' DynamicCache built from the model's config (sliding-window
    layers included, as Gemma 3 needs), new for every prefill. Touched only by the thread that
    generates."""

    def __init__(self, model):
        self._model = model
        self._device = next(model.parameters()).device
        self._cache = None
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.token_mask = DeviceTokenMask(self.vocab_size, self._device)

    def set_token_mask(self, words) -> None:
        """The tokens the next choice may take (token_mask.py's layout); None = all."""
        self.token_mask.set(words)

    def prefill(self, prompt: ProcessorPrompt, start: int) -> int:
        if start != 0:
            raise ValueError("a processor-driven model prefills its whole prompt (no prefix reuse)")
        self.reset()
        return self._forward(**prompt.tensors)

    def decode_step(self, token: int, position: int, *, more: bool = False, fill_mask=None) -> int:
        """The next token after `token` (the model knows its position from the cache; `more`
        changes nothing: eager transformers has no step to start early)."""
        if fill_mask is not None:
            fill_mask()
        return self._forward(input_ids=torch.tensor([[token]], device=self._device))

    def reset(self) -> None:
        """Forget the last prompt: a new cache, and no rope_deltas of its images (Qwen)."""
        self._cache = DynamicCache(config=self._model.config)
        inner = getattr(self._model, "model", None)
        if hasattr(inner, "rope_deltas"):
            inner.rope_deltas = None

    def _forward(self, **inputs) -> int:
        output = self._model(**inputs, past_key_values=self._cache, use_cache=True, logits_to_keep=1)
        return int(self.token_mask.apply(output.logits[0, -1]).argmax())


def family_dtype(name: str, device: torch.device, family: ModuleType) -> torch.dtype:
    """EngineConfig.dtype for this family: `auto` on a GPU is the family's CUDA_DTYPE where it
    has one (Gemma's activations overflow float16), else as for every model."""
    if name == "auto" and device.type == "cuda":
        return getattr(torch, getattr(family, "CUDA_DTYPE", "float16"))
    return resolve_dtype(name, device)


class ProcessorBackend(Backend):
    """A processor-driven family's model, loaded from a transformers directory (see the module's
    docstring for what it leaves out). One request at a time (the engine serialises calls)."""

    def __init__(self, config: EngineConfig, family: ModuleType):
        self._start(config, family, Path(config.model_path).expanduser().resolve().name)
        read_model_config(config.model_path)  # the path's errors, worded as for every model
        model, processor = family.load(config.model_path, dtype=self._dtype)
        self._use_model(model, processor, config)

    @classmethod
    def from_model(cls, model, processor, family: ModuleType, config: EngineConfig, name: str = "in-memory"):
        """A backend around a family's transformers model already in memory (benchmarks); on a
        GPU its language model moves into FastLlama and leaves `model`."""
        backend = cls.__new__(cls)
        backend._start(config, family, name)
        backend._use_model(model, processor, config)
        return backend

    def _start(self, config: EngineConfig, family: ModuleType, name: str) -> None:
        self._device = resolve_device(config.device)
        self._dtype = family_dtype(config.dtype, self._device, family)
        self._name = name
        self.family = family
        self.default_system_prompt = ""
        self._grammars = None

    def _use_model(self, model, processor, config: EngineConfig) -> None:
        text_config = model.config.get_text_config()
        max_positions = getattr(text_config, "max_position_embeddings", None) or config.max_context_tokens
        self.max_context = min(config.max_context_tokens, max_positions)
        fast_reason = self._fast_path_reason(self.family, text_config)
        if config.quantization == "int4" and fast_reason:
            raise ModelLoadError(f"4-bit weights are not available for '{config.model_path}': {fast_reason}")
        if fast_reason:
            self.quantization = "none"
            self.model = model.to(self._device, self._dtype).eval()
            self.lm = ProcessorRunner(self.model)
        else:  # the language model moves into FastLlama (cuda/processor_fast.py)
            from ..cuda.processor_fast import FastProcessorRunner, move_language_model

            self.quantization = "none" if config.quantization == "none" else "int4"
            self._dtype = torch.float16
            self.model = model.eval()
            lm = move_language_model(
                self.model, self._device, quantize=self.quantization == "int4", max_tokens=self.max_context
            )
            lm.capture()
            self.lm = FastProcessorRunner(self.model, lm)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.prompter = ProcessorPrompter(processor, self.family, self._device, self._dtype)
        self.eos_ids = _eos_token_ids(self.model, self.tokenizer)

    def _fast_path_reason(self, family: ModuleType, text_config) -> str:
        """ "" when FastLlama runs this model's language model, else why not."""
        if self._device.type != "cuda":
            return "the GPU fast path needs a CUDA device"
        if not getattr(family, "FAST_LANGUAGE_MODEL", False):
            return f"the GPU fast path does not run {family.MODEL_TYPE}'s language model"
        from ..cuda.support import unsupported_reason

        return unsupported_reason(text_config)

    @property
    def model_name(self) -> str:
        return self._name

    @property
    def device(self) -> str:
        return str(self._device)

    @property
    def multiple_images(self) -> bool:
        return self.family.MULTIPLE_IMAGES

    @torch.inference_mode()
    def generate(self, request: GenerationRequest, control: GenerationControl | None = None) -> Answer:
        started = time.perf_counter()
        timings = Timings()
        prompt = self.prompter.inputs(request.system_prompt or self.default_system_prompt, request.turns)
        if prompt.images:
            timings.vision_ms = _ms_since(started)
        if prompt.length >= self.max_context:
            raise InvalidInput(
                f"the prompt is {prompt.length} tokens (images included), over the context of "
                f"{self.max_context - 1}; shorten it or reset the conversation"
            )
        budget = min(request.max_new_tokens, self.max_context - prompt.length)
        constraint = control.constraint if control else None
        if request.json is not None:
            if constraint is not None:
                raise InvalidInput("JSON mode and a token constraint of the caller cannot be combined")
            constraint = self._json_grammars().constraint(request.json.schema, request.max_new_tokens)
        result = generation.generate(
            self.lm,
            prompt,
            0,
            max_new_tokens=request.max_new_tokens,
            budget=budget,
            stop_ids=self.eos_ids,
            text=generation.TextStream(self.tokenizer),
            kv_keys=lambda keys: None,  # no prefix tracking: nothing is reused
            control=control,
            constraint=constraint,
        )
        timings.prefill_ms = result.prefill_ms
        timings.decode_ms = result.decode_ms
        timings.total_ms = _ms_since(started)
        return Answer(
            text=result.text,
            token_ids=result.token_ids,
            prompt_tokens=prompt.length,
            reused_tokens=0,
            image_cache_hit=False,
            stop_reason=result.stop_reason,
            timings=timings,
        )

    def _json_grammars(self):
        if self._grammars is None:
            from ..structured import JsonGrammars

            self._grammars = JsonGrammars(self.tokenizer, self.lm.vocab_size, self.eos_ids)
        return self._grammars

    def count_tokens(self, text: str) -> int:
        return self.prompter.count_tokens(text)

    def release_cached_memory(self) -> None:
        gc.collect()
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    def close(self) -> None:
        self.model = None
        self.lm = None
        gc.collect()
        if self._device.type == "cuda":
            torch.cuda.empty_cache()
