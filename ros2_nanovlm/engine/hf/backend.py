"""The transformers/PyTorch backend: greedy generation with a prefix-reusing static KV cache and
an image-embedding cache. On the CPU the language model runs through transformers; on a GPU,
Llama-family language models run through FastLlama (4-bit weights, CUDA-graph decode)."""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .. import generation
from ..api import Answer, Backend, GenerationControl, GenerationRequest, InvalidInput, ModelLoadError, Timings
from ..config import EngineConfig
from ..frames import frame_digest
from .composed import is_composed, load_composed
from .embedding_cache import EmbeddingCache
from .kv_cache import PrefixTracker
from .lm_runner import TransformersLMRunner
from .loading import load_llava, read_model_config, resolve_device, resolve_dtype
from .prompting import ChatPrompter, TokenizedPrompt
from .vision import LlavaImageEncoder


class TransformersBackend(Backend):
    def __new__(cls, config: EngineConfig | None = None):
        """A directory of a processor-driven family (Qwen2.5-VL, SmolVLM2, ...: engine/families
        PROCESSOR_FAMILIES) gets that family's backend (processor_runner.py) instead."""
        if cls is TransformersBackend and config is not None:
            from ..families import find_processor_family

            family = find_processor_family(config.model_path)
            if family is not None:
                from .processor_runner import ProcessorBackend

                return ProcessorBackend(config, family)
        return super().__new__(cls)

    def __init__(self, config: EngineConfig):
        self._start(config, Path(config.model_path).expanduser().resolve().name)
        if is_composed(config.model_path):
            self._load_composed(config)
            return
        text_config = read_model_config(config.model_path).get("text_config", {})
        if self._plan(config, text_config):
            from ..config import nanovlm_home
            from ..cuda.loading import load_fast_llava

            model, processor, lm = load_fast_llava(
                config.model_path,
                self._device,
                quantize=self.quantization == "int4",
                max_tokens=self.max_context,
                cache_home=nanovlm_home(),
            )
            self._use_fast_model(model, processor, lm)
        else:
            model, processor = load_llava(config.model_path, self._device, self._dtype)
            self._use_transformers_model(model, processor)

    @classmethod
    def from_model(cls, model, processor, config: EngineConfig, name: str = "in-memory") -> TransformersBackend:
        """A backend around a transformers LLaVA already in memory (benchmarks, notebooks).
        On CUDA the language model moves into FastLlama and leaves `model`."""
        backend = cls.__new__(cls)
        backend._start(config, name)
        if backend._plan(config, model.config.get_text_config().to_dict()):
            from ..cuda.loading import fast_llava_from_model

            lm = fast_llava_from_model(
                model, backend._device, quantize=backend.quantization == "int4", max_tokens=backend.max_context
            )
            backend._use_fast_model(model, processor, lm)
        else:
            backend._use_transformers_model(model.to(backend._device, backend._dtype), processor)
        return backend

    def _start(self, config: EngineConfig, name: str) -> None:
        self._device = resolve_device(config.device)
        self._dtype = resolve_dtype(config.dtype, self._device)
        self._name = name
        self.default_system_prompt = ""
        self.embeddings = EmbeddingCache(config.embedding_cache_size)
        self._grammars = None  # JSON grammars, made on the first JSON request

    def _plan(self, config: EngineConfig, text_config: dict) -> bool:
        """Context size and quantization for a LLaVA text config; True when FastLlama runs it."""
        max_positions = text_config.get("max_position_embeddings") or config.max_context_tokens
        self.max_context = min(config.max_context_tokens, max_positions)
        self.quantization = _resolve_quantization(config, self._device, text_config)
        return self._device.type == "cuda" and _fast_path_reason(text_config) == ""

    def _load_composed(self, config: EngineConfig) -> None:
        """A vision encoder + projector + causal LM (the embedded demo model is one)."""
        if config.quantization == "int4":
            raise ModelLoadError(f"4-bit weights are not available for composed models ('{config.model_path}')")
        self.quantization = "none"
        language_model, tokenizer, encoder, system_prompt, image_token = load_composed(
            config.model_path, self._device, self._dtype
        )
        self.model = language_model
        self.tokenizer = tokenizer
        self.default_system_prompt = system_prompt
        self.encode_image = encoder
        max_positions = getattr(language_model.config, "max_position_embeddings", None) or config.max_context_tokens
        self.max_context = min(config.max_context_tokens, max_positions)
        self.lm = TransformersLMRunner(language_model, self.max_context)
        image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.prompter = ChatPrompter(tokenizer, tokenizer, image_token_id, image_token=image_token)
        self.eos_ids = _eos_token_ids(language_model, tokenizer)
        self.kv = PrefixTracker(self.max_context)

    def _use_transformers_model(self, model, processor) -> None:
        self.lm = TransformersLMRunner(model, self.max_context)
        self.encode_image = LlavaImageEncoder(model, processor.image_processor, self._device, self._dtype)
        self._finish_load(model, processor)

    def _use_fast_model(self, model, processor, lm) -> None:
        from ..cuda.vision import GpuLlavaImageEncoder

        self._dtype = torch.float16
        lm.capture()
        self.lm = lm
        if model.config.model_type == "llava":
            self.encode_image = GpuLlavaImageEncoder(model, processor.image_processor, self._device, self._dtype)
            self.encode_image.capture()
        else:  # LLaVA-1.6 tiles the image by its aspect ratio: its processor does that on the CPU
            self.encode_image = LlavaImageEncoder(model, processor.image_processor, self._device, self._dtype)
        self._finish_load(model, processor)

    def _finish_load(self, model, processor) -> None:
        self.model = model
        self.tokenizer = processor.tokenizer
        image_token_id = getattr(model.config, "image_token_id", None)
        if image_token_id is None:
            image_token_id = model.config.image_token_index
        self.prompter = ChatPrompter(processor, self.tokenizer, image_token_id)
        self.eos_ids = _eos_token_ids(model, self.tokenizer)
        self.kv = PrefixTracker(self.max_context)

    @property
    def model_name(self) -> str:
        return self._name

    @property
    def device(self) -> str:
        return str(self._device)

    @property
    def multiple_images(self) -> bool:
        return False  # LLaVA-1.5/1.6 and the demo model were trained on one image a conversation

    @torch.inference_mode()
    def generate(self, request: GenerationRequest, control: GenerationControl | None = None) -> Answer:
        started = time.perf_counter()
        timings = Timings()

        images, all_hits = self._image_features(request, timings)
        prompt = self.prompter.tokenize(
            request.system_prompt or self.default_system_prompt,
            request.turns,
            [(digest, len(features)) for digest, features in images],
        )
        prompt_length = len(prompt.ids)
        if prompt_length >= self.max_context:
            raise InvalidInput(
                f"the prompt is {prompt_length} tokens ({sum(s.length for s in prompt.images)} of "
                f"them image tokens), over the context of {self.max_context - 1}; "
                "shorten it or reset the conversation"
            )
        budget = min(request.max_new_tokens, self.max_context - prompt_length)
        constraint = control.constraint if control else None
        if request.json is not None:
            if constraint is not None:
                raise InvalidInput("JSON mode and a token constraint of the caller cannot be combined")
            constraint = self._json_grammars().constraint(request.json.schema, request.max_new_tokens)

        # At least the last prompt token is run again: its logits give the first answer token.
        reused = min(self.kv.shared_prefix(prompt.keys), prompt_length - 1)
        self.kv.truncate(reused)
        self.lm.rewind(reused)
        embeds_started = time.perf_counter()
        embeds = self._prompt_embeddings(prompt, reused, dict(images))
        embeds_ms = _ms_since(embeds_started)
        self.kv.extend(prompt.keys[reused:])
        result = generation.generate(
            self.lm,
            embeds,
            reused,
            max_new_tokens=request.max_new_tokens,
            budget=budget,
            stop_ids=self.eos_ids,
            text=generation.TextStream(self.tokenizer),
            kv_keys=self.kv.extend,
            control=control,
            constraint=constraint,
        )
        timings.prefill_ms = embeds_ms + result.prefill_ms
        timings.decode_ms = result.decode_ms
        timings.total_ms = _ms_since(started)
        return Answer(
            text=result.text,
            token_ids=result.token_ids,
            prompt_tokens=prompt_length,
            reused_tokens=reused,
            image_cache_hit=bool(images) and all_hits,
            stop_reason=result.stop_reason,
            timings=timings,
        )

    def _json_grammars(self):
        """The JSON grammar compiler of this model's tokenizer, made on the first JSON request."""
        if self._grammars is None:
            from ..structured import JsonGrammars

            self._grammars = JsonGrammars(self.tokenizer, self.lm.vocab_size, self.eos_ids)
        return self._grammars

    @torch.inference_mode()
    def prepare_images(self, frames: Sequence[np.ndarray]) -> int:
        """Encode the frames the embedding cache lacks with one batched call of the encoder."""
        batch: set[str] = set()  # distinct frames of this call, cached or not
        pending: dict[str, np.ndarray] = {}  # digest -> frame to encode
        for frame in frames:
            digest = frame_digest(frame)
            if digest in batch:
                continue
            # No more frames than the cache holds: the later puts would evict the earlier
            # frames of the same call before anyone asked about them.
            if len(batch) == self.embeddings.capacity:
                break
            batch.add(digest)
            # A hit is looked up all the same: that marks it recently used, so this call's
            # puts evict older entries rather than a frame that is about to be asked about.
            if self.embeddings.get(digest) is None:
                pending[digest] = np.ascontiguousarray(frame)
        if not pending:
            return 0
        features = self.encode_image.encode_batch(list(pending.values()))
        for digest, each in zip(pending, features, strict=True):
            self.embeddings.put(digest, each)
        return len(pending)

    def _image_features(self, request: GenerationRequest, timings: Timings):
        """(digest, features) for each image of the conversation, through the embedding cache."""
        started = time.perf_counter()
        images: list[tuple[str, torch.Tensor]] = []
        all_hits = True
        for turn in request.turns:
            if turn.image is None:
                continue
            digest = frame_digest(turn.image)
            features = self.embeddings.get(digest)
            if features is None:
                all_hits = False
                features = self.encode_image(np.ascontiguousarray(turn.image))
                self.embeddings.put(digest, features)
            images.append((digest, features))
        if not all_hits:
            if self._device.type == "cuda":
                torch.cuda.synchronize(self._device)  # charge the encoder's GPU time to vision
            timings.vision_ms = _ms_since(started)
        return images, all_hits

    def _prompt_embeddings(
        self, prompt: TokenizedPrompt, start: int, features: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """(L, hidden) input embeddings of prompt positions start.. , image features spliced in."""
        ids = torch.tensor(prompt.ids[start:], device=self._device)
        is_image = ids == self.prompter.image_token_id
        embeds = self.lm.embed(ids.masked_fill(is_image, 0))
        for span in prompt.images:
            first, last = max(span.start, start), min(span.start + span.length, len(prompt.ids))
            if first < last:
                rows = features[span.digest][first - span.start : last - span.start]
                embeds[first - start : last - start] = rows.to(embeds.dtype)
        return embeds

    def release_cached_memory(self) -> None:
        gc.collect()
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    def count_tokens(self, text: str) -> int:
        return self.prompter.count_tokens(text)

    def close(self) -> None:
        """Drop every reference to the model's tensors (the image encoder holds the vision tower
        and its CUDA graph), then collect: the fast path's graphs hold bound methods of their
        model, a reference cycle that only the collector frees. Only then can CUDA's cached
        blocks go back to the driver."""
        self.model = None
        self.lm = None
        self.encode_image = None
        self.embeddings = EmbeddingCache(0)
        gc.collect()
        if self._device.type == "cuda":
            torch.cuda.empty_cache()


def _fast_path_reason(text_config: dict) -> str:
    """ "" when the GPU fast path can run this checkpoint's language model, else why not."""
    from ..cuda.support import unsupported_reason

    return unsupported_reason(text_config)


def _resolve_quantization(config: EngineConfig, device: torch.device, text_config: dict) -> str:
    if config.quantization == "none":
        return "none"
    fast_reason = _fast_path_reason(text_config) if device.type == "cuda" else "it needs a CUDA device"
    if config.quantization == "int4" and fast_reason:
        raise ModelLoadError(f"4-bit weights are not available for '{config.model_path}': {fast_reason}")
    return "int4" if not fast_reason else "none"


def _eos_token_ids(model, tokenizer) -> set[int]:
    ids = set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0
