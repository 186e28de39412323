"""The answered frame with the answer drawn on it, for rviz's Image display and rqt_image_view.

A dark band at the top holds the prompt and a status line (model, latency); one at the bottom
holds the answer, wrapped to the image width. Text size follows the image width, so a 320 px
test frame and a 1920 px camera frame both stay readable. Drawing is plain opencv on a copy of
the RGB frame; the node wraps the result in the frame's own header.
"""

from __future__ import annotations

import cv2
import numpy as np

FONT = cv2.FONT_HERSHEY_SIMPLEX
BAND_ALPHA = 0.6  # how dark the bands behind the text are (0 = none, 1 = black)
MAX_ANSWER_LINES = 8  # longer answers end with "..." (the full text is on the answer topic)


def annotate(frame: np.ndarray, prompt: str, answer: str, status: str) -> np.ndarray:
    """A copy of RGB uint8 `frame` with `prompt` and `status` at the top and `answer` below."""
    image = np.ascontiguousarray(frame).copy()
    height, width = image.shape[:2]
    scale = max(0.35, width / 1280)
    thickness = max(1, round(scale * 2))
    line_height = int(cv2.getTextSize("Ag", FONT, scale, thickness)[0][1] * 1.9) + 2
    margin = max(4, line_height // 3)

    top_lines = wrap(f"Q: {prompt}", width - 2 * margin, scale, thickness)[:2] + [status]
    # Only what fits is wrapped: the full answer is on the answer topic.
    answer_lines = wrap((answer or "(no answer)")[:4000], width - 2 * margin, scale, thickness)
    if len(answer_lines) > MAX_ANSWER_LINES:
        answer_lines = answer_lines[: MAX_ANSWER_LINES - 1] + [answer_lines[MAX_ANSWER_LINES - 1] + " ..."]

    top = min(height, len(top_lines) * line_height + margin)
    bottom = max(0, height - len(answer_lines) * line_height - margin)
    _darken(image[:top])
    _darken(image[bottom:])
    for row, line in enumerate(top_lines):
        colour = (255, 255, 255) if row < len(top_lines) - 1 else (180, 220, 255)
        _text(image, line, margin, (row + 1) * line_height, scale, thickness, colour)
    for row, line in enumerate(answer_lines):
        _text(image, line, margin, bottom + (row + 1) * line_height, scale, thickness, (120, 255, 120))
    return image


def wrap(text: str, width_px: int, scale: float, thickness: int) -> list[str]:
    """Greedy word wrap by rendered width; a word wider than the line is cut by characters.
    Hershey fonts draw ASCII only: other characters become '?', so the box never lies about width."""
    text = "".join(c if 32 <= ord(c) < 127 else ("?" if not c.isspace() else " ") for c in text)
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if _width(candidate, scale, thickness) <= width_px:
                line = candidate
                continue
            if line:
                lines.append(line)
            while (word_width := _width(word, scale, thickness)) > width_px and len(word) > 1:
                # Start from the average character width, then step back: compact JSON is one
                # long "word", and measuring every prefix of it would be quadratic.
                cut = max(1, min(len(word) - 1, len(word) * width_px // word_width))
                while cut > 1 and _width(word[:cut], scale, thickness) > width_px:
                    cut -= 1
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines


def _width(text: str, scale: float, thickness: int) -> int:
    return cv2.getTextSize(text, FONT, scale, thickness)[0][0]


def _darken(region: np.ndarray) -> None:
    region[:] = (region * (1.0 - BAND_ALPHA)).astype(np.uint8)


def _text(image, text, x, y, scale, thickness, colour) -> None:
    cv2.putText(image, text, (x, y), FONT, scale, colour, thickness, cv2.LINE_AA)
