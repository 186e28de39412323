"""Conversations to token ids with the model's own chat template, image placeholders expanded
to one position per image token."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable

from ..api import InvalidInput, Turn


@dataclass
class ImageSpan:
    start: int  # position of the image's first token in the prompt
    length: int  # number of image tokens
    digest: str


@dataclass
class TokenizedPrompt:
    ids: list[int]  # image positions carry the image token id
    keys: list[Hashable]  # what the KV cache compares: ids, and (digest, i) for image tokens
    images: list[ImageSpan]


class ChatPrompter:
    """Renders a conversation with the processor's chat template (LLaVA's USER:/ASSISTANT: or
    whatever the checkpoint ships) and tokenizes it."""

    def __init__(self, processor, tokenizer, image_token_id: int):
        self._processor = processor
        self._tokenizer = tokenizer
        self.image_token_id = image_token_id

    def render(self, system_prompt: str, turns: tuple[Turn, ...]) -> str:
        messages = []
        if system_prompt:
            messages.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
        for turn in turns:
            content = [{"type": "image"}] if turn.image is not None else []
            content.append({"type": "text", "text": turn.text})
            messages.append({"role": turn.role, "content": content})
        return self._processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )

    def tokenize(
        self, system_prompt: str, turns: tuple[Turn, ...], images: list[tuple[str, int]]
    ) -> TokenizedPrompt:
        """`images`: (digest, token count) of each image, in conversation order."""
        text = self.render(system_prompt, turns)
        bos = self._tokenizer.bos_token
        add_special = not (bos and text.startswith(bos))
        raw_ids = self._tokenizer(text, add_special_tokens=add_special)["input_ids"]
        placeholders = raw_ids.count(self.image_token_id)
        if placeholders != len(images):
            raise InvalidInput(
                f"the prompt holds {placeholders} image placeholders for {len(images)} images; "
                "do not type the image token into the prompt"
            )
        ids: list[int] = []
        keys: list[Hashable] = []
        spans: list[ImageSpan] = []
        image_index = 0
        for token in raw_ids:
            if token != self.image_token_id:
                ids.append(token)
                keys.append(token)
                continue
            digest, length = images[image_index]
            image_index += 1
            spans.append(ImageSpan(len(ids), length, digest))
            ids.extend([token] * length)
            keys.extend((digest, i) for i in range(length))
        return TokenizedPrompt(ids, keys, spans)
