"""Image files typed at the chat console: where a path points and how it is read.

Every way a path can fail gets its own message (missing, broken link, directory, named pipe,
unreadable, not an image), because the operator has to know what to fix; the console prints it
and the chat goes on. Pure functions: no state, any thread.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np

# What a line must end with to be taken for an image path even when the file does not exist
# (so that a typo gets "no such file", not an answer to the path as a question).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# A larger file is not a photo: refuse it before reading it into memory.
MAX_IMAGE_FILE_BYTES = 256 * 1024 * 1024
# NanoLLM's prompt sequences name images as /data/... (the jetson-containers mount point).
DATA_PREFIX = "/data/"


class ImageError(ValueError):
    """An image path that cannot be used; the message says why, for the operator."""


def unquote(text: str) -> str:
    """The path without the quotes a terminal adds around a dragged-in file name."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def looks_like_image_path(text: str) -> bool:
    """True for a line that names a file rather than asks a question: it ends in an image
    suffix, or it contains a path separator (or starts with ~) and something is there."""
    text = unquote(text)
    if text.lower().endswith(IMAGE_SUFFIXES):
        return True
    if os.sep in text or text.startswith("~"):
        path = Path(text).expanduser()
        return path.exists() or path.is_symlink()
    return False


def resolve_image_path(text: str, data_roots: list[Path]) -> Path:
    """The file a typed path means. A /data/... path that does not exist is looked up under
    each of `data_roots` (--data-dir, then the repository's data/); ImageError lists the places
    tried when it is in none of them."""
    path = Path(unquote(text)).expanduser()
    if path.exists() or path.is_symlink():
        return path
    tried = [path]
    if str(path).startswith(DATA_PREFIX):
        relative = str(path)[len(DATA_PREFIX) :]
        for root in data_roots:
            candidate = root / relative
            if candidate.exists():
                return candidate
            tried.append(candidate)
    where = f" (also looked for {', '.join(str(p) for p in tried[1:])})" if len(tried) > 1 else ""
    raise ImageError(f"no such file: '{path}'{where}")


def read_image(path: Path) -> np.ndarray:
    """The RGB uint8 frame (H, W, 3) of an image file, or ImageError saying why not.

    The bytes are read here and decoded by opencv (cv2.imdecode, the decoder cv2.imread uses),
    so a permission or I/O error is told apart from a file that is not an image."""
    import cv2

    if path.is_symlink() and not path.exists():
        raise ImageError(f"'{path}' is a broken symbolic link (to '{os.readlink(path)}')")
    if not path.exists():
        raise ImageError(f"no such file: '{path}'")
    if path.is_dir():
        raise ImageError(f"'{path}' is a directory, not an image; give the path of an image file in it")
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        # Opening a named pipe blocks until someone writes to it: refuse it unopened.
        kind = "a named pipe" if stat.S_ISFIFO(info.st_mode) else "a device or socket"
        raise ImageError(f"'{path}' is {kind}, not a regular file: it cannot be read as an image")
    if info.st_size > MAX_IMAGE_FILE_BYTES:
        raise ImageError(f"'{path}' is {info.st_size // 2**20} MiB, too large for an image")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ImageError(f"cannot read '{path}': {error.strerror or error}") from error
    if not data:
        raise ImageError(f"'{path}' is empty, not an image")
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ImageError(f"'{path}' is not an image opencv can decode (JPEG, PNG, BMP, WebP, TIFF)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
