"""The node's model: loaded, replaced and freed on the inference worker, read by everyone.

No ROS imports. load() and close() run on the worker thread (so no answer is ever running on a
model being replaced); `engine()` and `state` are read from executor threads (single
reference reads). close() gives the memory back: the engine's tensors, CUDA's cached blocks,
and the heap pages glibc keeps after the free (malloc_trim), so RSS falls at cleanup.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import sys
from collections.abc import Callable

from ..engine import EngineConfig, EngineError, VLMEngine


class ModelUnavailable(RuntimeError):
    """No model is loaded (still loading, the load failed, or it was freed); str() says which."""


class ModelSlot:
    def __init__(self, log_error: Callable[[str], None]):
        self._log_error = log_error
        self._engine: VLMEngine | None = None
        self.problem = "no model loaded: the node is not configured"
        self.loading = False

    def engine(self) -> VLMEngine:
        engine = self._engine
        if engine is None:
            raise ModelUnavailable(self.problem)
        return engine

    @property
    def loaded(self) -> VLMEngine | None:
        return self._engine

    def mark_loading(self) -> None:
        """Called when a load is queued, so diagnostics and errors say 'loading' at once."""
        self.loading = True
        self.problem = "no model loaded: the model is loading"

    def load(self, config: Callable[[], EngineConfig]) -> bool:
        """Replace the engine (the old one goes first, to free its memory). Any failure leaves a
        clear `problem`, never "loading"."""
        self.mark_loading()
        self.close(problem="no model loaded: the model is loading")
        try:
            engine = VLMEngine.load(config())
        except Exception as error:  # noqa: BLE001 - any load failure leaves a clear state
            reason = str(error) if isinstance(error, (EngineError, ValueError, OSError)) else repr(error)
            self.problem = f"no model loaded: {reason}"
            self.loading = False
            self._log_error(self.problem)
            return False
        self._engine = engine
        self.problem = ""
        self.loading = False
        return True

    def close(self, problem: str = "no model loaded: the model was freed (cleanup)") -> None:
        engine, self._engine = self._engine, None
        self.problem = problem
        if engine is None:
            return
        engine.close()
        del engine
        gc.collect()
        _return_cuda_cache()
        _return_heap_to_os()


def _return_cuda_cache() -> None:
    """After the last reference went, torch still keeps the freed blocks for reuse."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        # cuBLAS keeps a workspace per stream it has seen (the graph captures use side
        # streams): ~100 MiB on the H200 that empty_cache alone does not give back.
        clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear_workspaces is not None:
            clear_workspaces()
        torch.cuda.empty_cache()


def _return_heap_to_os() -> None:
    """glibc keeps freed heap pages for reuse; malloc_trim hands them back (Linux only)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # musl or another libc: nothing to trim
            ctypes.CDLL("libc.so.6").malloc_trim(0)
