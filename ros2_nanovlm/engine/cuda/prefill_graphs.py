"""Prefill replayed as CUDA graphs.

An eager prefill of a 7B model launches about 550 kernels, and with Triton's Python launcher
the host needs about as long to issue them (~22 ms) as the GPU needs to run them: the GPU
waits, and every hiccup of the host lands in the answer's latency. A captured graph is issued
in one call.

A graph has fixed shapes, so each one serves one (start, padded length): the prompt is padded
with zero embeddings up to a multiple of `pad` tokens. Causal attention keeps the real tokens
blind to the padding after them; the padding's keys and values go to cache positions past the
prompt, which the next prefill or decode step overwrites before anything reads them. A camera
stream asks the same question about new frames, so its prefills repeat one (start, length):
a key is captured the second time it is seen, and the last `capacity` graphs are kept. All of
them share one memory pool: they only ever run one after another, on one stream.

Follow-up turns (start > 0) start wherever the conversation has got to, so a graph per start
would rarely be seen twice. They are keyed by their padded length alone: the body gets the start
as a device tensor, filled before each replay (FastLlama._prefill_body reads nothing of it on
the host), so one graph serves every follow-up of up to 64 tokens, wherever it starts.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

# body(embeds (L, H) fp16, start (an int, or an int32 (1,) GPU tensor), last_index (1,) int64 on
# the GPU) -> logits (vocab,)
PrefillBody = Callable[[torch.Tensor, "int | torch.Tensor", torch.Tensor], torch.Tensor]
ANY_START = -1  # the start of a key whose graph reads its start from a device tensor

_log = logging.getLogger(__name__)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    embeds: torch.Tensor  # static input (padded, hidden)
    last_index: torch.Tensor  # static input: the last real token's row
    logits: torch.Tensor  # static output
    start: torch.Tensor | None = None  # static input of an ANY_START graph: the first slot


class PrefillGraphs:
    def __init__(self, body: PrefillBody, hidden: int, max_tokens: int, device: torch.device,
                 warmup_stream: torch.cuda.Stream, *, pad: int = 64, capacity: int = 4, capture_after: int = 2):  # fmt: skip
        self._body = body
        # One side stream for every warm-up: cuBLAS keeps a workspace per stream it has seen.
        self._warmup_stream = warmup_stream
        self._hidden = hidden
        self._max_tokens = max_tokens
        self._device = device
        self.pad = pad
        self.capacity = capacity
        self.capture_after = capture_after
        self._graphs: collections.OrderedDict[tuple[int, int], _Captured] = collections.OrderedDict()
        self._seen: collections.Counter[tuple[int, int]] = collections.Counter()
        self._pool = torch.cuda.graph_pool_handle()
        self.disabled_reason = ""  # set when a capture failed: prefill stays eager from then on
        self.replays = 0

    def padded_length(self, start: int, length: int) -> int:
        return min(-(-length // self.pad) * self.pad, self._max_tokens - start)

    def __call__(self, embeds: torch.Tensor, start: int) -> torch.Tensor:
        """Logits after the last of positions start..start+L-1; their KV is written."""
        length = embeds.shape[0]
        if start > 0:
            padded = -(-length // self.pad) * self.pad
            if start + padded > self._max_tokens:  # the padding would run past the cache
                return self._body(embeds, start, self._last_index(length))
            key = (ANY_START, padded)
        else:
            key = (start, self.padded_length(start, length))
        captured = self._graphs.get(key)
        if captured is None:
            if len(self._seen) > 1024:  # a long chat: many one-off keys
                self._seen.clear()
            self._seen[key] += 1
            if self.disabled_reason or self._seen[key] < self.capture_after:
                return self._body(embeds, start, self._last_index(length))
            captured = self._capture(key, embeds, start)
            if captured is None:
                return self._body(embeds, start, self._last_index(length))
        self._graphs.move_to_end(key)
        self._load(captured, embeds, start)
        captured.graph.replay()
        self.replays += 1
        return captured.logits.clone()  # the next replay overwrites it

    def _last_index(self, length: int) -> torch.Tensor:
        return torch.full((1,), length - 1, dtype=torch.long, device=self._device)

    @staticmethod
    def _load(captured: _Captured, embeds: torch.Tensor, start: int) -> None:
        length = embeds.shape[0]
        captured.embeds[:length].copy_(embeds)
        captured.embeds[length:].zero_()  # finite padding: it must not put NaN into the cache
        captured.last_index.fill_(length - 1)
        if captured.start is not None:
            captured.start.fill_(start)

    def _capture(self, key: tuple[int, int], embeds: torch.Tensor, start: int) -> _Captured | None:
        key_start, padded = key
        static = torch.zeros(padded, self._hidden, dtype=torch.float16, device=self._device)
        captured = _Captured(None, static, self._last_index(embeds.shape[0]), None)  # type: ignore[arg-type]
        if key_start == ANY_START:
            captured.start = torch.zeros(1, dtype=torch.int32, device=self._device)
        self._load(captured, embeds, start)
        body_start = captured.start if captured.start is not None else key_start
        try:
            stream = self._warmup_stream
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._body(static, body_start, captured.last_index)  # compile kernels for these shapes
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                captured.logits = self._body(static, body_start, captured.last_index)
        except Exception as error:  # noqa: BLE001 - a capture failure must not fail the answer
            torch.cuda.synchronize(self._device)
            self.disabled_reason = f"capturing a prefill of {padded} tokens at {start} failed: {error}"
            _log.warning("%s; prefill stays eager", self.disabled_reason)
            return None
        captured.graph = graph
        self._graphs[key] = captured
        while len(self._graphs) > self.capacity:
            self._graphs.popitem(last=False)
        return captured
