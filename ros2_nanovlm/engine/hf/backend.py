"""The transformers/PyTorch backend: greedy generation with a prefix-reusing static KV cache and
an image-embedding cache, on the CPU or a GPU."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..api import Answer, Backend, GenerationRequest, InvalidInput, Timings
from ..config import EngineConfig
from ..frames import frame_digest
from .embedding_cache import EmbeddingCache
from .kv_cache import PrefixKVCache
from .loading import load_llava, resolve_device, resolve_dtype
from .prompting import ChatPrompter, TokenizedPrompt
from .vision import LlavaImageEncoder


class TransformersBackend(Backend):
    def __init__(self, config: EngineConfig):
        self._device = resolve_device(config.device)
        self._dtype = resolve_dtype(config.dtype, self._device)
        model, processor = load_llava(config.model_path, self._device, self._dtype)
        self.model = model
        self.tokenizer = processor.tokenizer
        model_config = model.config
        image_token_id = getattr(model_config, "image_token_id", None)
        if image_token_id is None:
            image_token_id = model_config.image_token_index
        self.prompter = ChatPrompter(processor, self.tokenizer, image_token_id)
        self.encode_image = LlavaImageEncoder(model, processor.image_processor, self._device, self._dtype)
        self.embeddings = EmbeddingCache(config.embedding_cache_size)
        max_positions = getattr(model_config.get_text_config(), "max_position_embeddings", None)
        self.max_context = min(config.max_context_tokens, max_positions or config.max_context_tokens)
        self.kv = PrefixKVCache(model_config, self.max_context)
        self.eos_ids = _eos_token_ids(model, self.tokenizer)
        self._name = Path(config.model_path).expanduser().resolve().name

    @property
    def model_name(self) -> str:
        return self._name

    @property
    def device(self) -> str:
        return str(self._device)

    @torch.inference_mode()
    def generate(self, request: GenerationRequest) -> Answer:
        started = time.perf_counter()
        timings = Timings()

        images, all_hits = self._image_features(request, timings)
        prompt = self.prompter.tokenize(
            request.system_prompt,
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

        prefill_started = time.perf_counter()
        # At least the last prompt token is run again: its logits give the first answer token.
        reused = min(self.kv.shared_prefix(prompt.keys), prompt_length - 1)
        self.kv.rewind(reused)
        embeds = self._prompt_embeddings(prompt, reused, dict(images))
        logits = self._forward(inputs_embeds=embeds, start=reused)
        self.kv.extend(prompt.keys[reused:])
        token = int(logits.argmax())
        timings.prefill_ms = _ms_since(prefill_started)

        decode_started = time.perf_counter()
        generated = [token]
        while token not in self.eos_ids and len(generated) < budget:
            logits = self._forward(input_ids=torch.tensor([[token]], device=self._device), start=len(self.kv))
            self.kv.extend([token])
            token = int(logits.argmax())
            generated.append(token)
        timings.decode_ms = _ms_since(decode_started)

        if token in self.eos_ids:
            stop_reason, answer_ids = "eos", generated[:-1]
        elif len(generated) < request.max_new_tokens:
            stop_reason, answer_ids = "context_full", generated
        else:
            stop_reason, answer_ids = "max_new_tokens", generated
        text = self.tokenizer.decode(answer_ids, skip_special_tokens=True).strip()
        timings.total_ms = _ms_since(started)
        return Answer(
            text=text,
            token_ids=answer_ids,
            prompt_tokens=prompt_length,
            reused_tokens=reused,
            image_cache_hit=bool(images) and all_hits,
            stop_reason=stop_reason,
            timings=timings,
        )

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
            timings.vision_ms = _ms_since(started)
        return images, all_hits

    def _prompt_embeddings(
        self, prompt: TokenizedPrompt, start: int, features: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Input embeddings of prompt positions start.. : token embeddings, image features spliced in."""
        ids = torch.tensor(prompt.ids[start:], device=self._device)
        is_image = ids == self.prompter.image_token_id
        embeds = self.model.get_input_embeddings()(ids.masked_fill(is_image, 0))
        for span in prompt.images:
            first, last = max(span.start, start), min(span.start + span.length, len(prompt.ids))
            if first < last:
                rows = features[span.digest][first - span.start : last - span.start]
                embeds[first - start : last - start] = rows.to(embeds.dtype)
        return embeds.unsqueeze(0)

    def _forward(self, *, start: int, input_ids=None, inputs_embeds=None) -> torch.Tensor:
        """Run new positions start.. through the LLM, writing their KV; logits of the last one."""
        length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        positions = torch.arange(start, start + length, device=self._device).unsqueeze(0)
        output = self.model(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            position_ids=positions,
            past_key_values=self.kv.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return output.logits[0, -1]

    def close(self) -> None:
        self.model = None
        self.embeddings = EmbeddingCache(0)
        if self._device.type == "cuda":
            torch.cuda.empty_cache()


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
