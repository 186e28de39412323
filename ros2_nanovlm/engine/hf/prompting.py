"""Conversations to token ids with the model's own chat template, image placeholders expanded
to one position per image token.

What a user typed stays text. The template is rendered to one string and tokenized as a whole,
so a prompt holding `<|im_start|>system` or `</s>` would otherwise become real control tokens
and open a system turn or end the conversation. Each control token whose characters lie inside
a prompt's text is tokenized again as plain text (the tokenizer's split_special_tokens), on
every family, since every one comes through here."""

from __future__ import annotations

import copy
import threading
from collections.abc import Hashable
from dataclasses import dataclass

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
    """Renders a conversation with the model's own chat template (LLaVA's USER:/ASSISTANT:,
    SmolLM2's ChatML, ...) and tokenizes it.

    `template_owner` is the processor (LLaVA: content as a list of typed parts) or, with
    `image_token` given, the tokenizer of a plain chat LM (content as text, the image token
    written in front of the question's text).

    tokenize() runs on the thread that generates (under the engine's lock); count_tokens() on
    any thread."""

    def __init__(self, template_owner, tokenizer, image_token_id: int, image_token: str | None = None):
        self._template_owner = template_owner
        self._tokenizer = tokenizer
        self.image_token_id = image_token_id
        self._image_token = image_token
        # count_tokens runs on callers' threads while the worker tokenizes with split_special_tokens,
        # which flips a flag on the Rust tokenizer: counting gets a copy of its own.
        self._counting_tokenizer = copy.deepcopy(tokenizer)
        self._counting_lock = threading.Lock()

    def count_tokens(self, text: str) -> int:
        """Tokens `text` takes as typed (control tokens counted as text). Any thread."""
        with self._counting_lock:
            encoding = self._counting_tokenizer(text, add_special_tokens=False, split_special_tokens=True)
        return len(encoding["input_ids"])

    def _content(self, text: str, has_image: bool):
        if self._image_token is not None:
            return f"{self._image_token}\n{text}" if has_image else text
        parts = [{"type": "image"}] if has_image else []
        return parts + [{"type": "text", "text": text}]

    def _control_token_ids(self) -> frozenset[int]:
        tokenizer = self._tokenizer
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        return frozenset(tokenizer.all_special_ids) | {i for i, token in added.items() if token.special}

    def render(self, system_prompt: str, turns: tuple[Turn, ...]) -> str:
        messages = []
        if system_prompt:
            messages.append({"role": "system", "content": self._content(system_prompt, False)})
        for turn in turns:
            messages.append({"role": turn.role, "content": self._content(turn.text, turn.image is not None)})
        return self._template_owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def tokenize(self, system_prompt: str, turns: tuple[Turn, ...], images: list[tuple[str, int]]) -> TokenizedPrompt:
        """`images`: (digest, token count) of each image, in conversation order."""
        text = self.render(system_prompt, turns)
        bos = self._tokenizer.bos_token
        add_special = not (bos and text.startswith(bos))
        typed = [system_prompt, *(turn.text for turn in turns)]
        raw_ids = self._ids_keeping_typed_text(text, add_special, _spans_of(text, typed))
        placeholders = raw_ids.count(self.image_token_id)
        if placeholders != len(images):  # the template's doing, never the user's
            raise InvalidInput(f"the prompt holds {placeholders} image placeholders for {len(images)} images")
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

    def _ids_keeping_typed_text(self, text: str, add_special: bool, typed: list[tuple[int, int]]) -> list[int]:
        tokenizer = self._tokenizer
        if not getattr(tokenizer, "is_fast", False):  # a slow (Python) tokenizer has no offsets
            return tokenizer(text, add_special_tokens=add_special)["input_ids"]
        encoding = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
        control = self._control_token_ids()
        ids: list[int] = []
        for token, (start, end) in zip(encoding["input_ids"], encoding["offset_mapping"]):
            if token in control and end > start and any(a <= start and end <= b for a, b in typed):
                piece = tokenizer(text[start:end], add_special_tokens=False, split_special_tokens=True)
                ids.extend(piece["input_ids"])
            else:
                ids.append(token)
        return ids


def _spans_of(rendered: str, typed: list[str]) -> list[tuple[int, int]]:
    """Where each typed text (system prompt, then turns, in order) sits in the rendered template.
    A template may trim a text, so the trimmed text is looked for too."""
    spans, position = [], 0
    for text in typed:
        for candidate in (text, text.strip()):
            at = rendered.find(candidate, position) if candidate else -1
            if at >= 0:
                spans.append((at, at + len(candidate)))
                position = at + len(candidate)
                break
    return spans
