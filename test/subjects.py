"""What counts as naming the main subject of each test photo: ImageNet classes (the demo
model's encoder knows those) grouped by subject. An answer names the subject when it contains
the short name of one of them (or the generic word)."""

from __future__ import annotations

from pathlib import Path

CLASSES_FILE = (
    Path(__file__).resolve().parent.parent / "ros2_nanovlm" / "engine" / "demo_model" / "imagenet_classes.txt"
)

# photo -> (generic words, ImageNet class indices that name the subject)
SUBJECTS = {
    "dogs": ({"dog", "puppy"}, range(151, 269)),  # the dog breeds of ImageNet
    "dogs_2": ({"dog", "puppy"}, range(151, 269)),
    "fruit": ({"fruit"}, range(948, 958)),  # Granny Smith .. pomegranate
    "soccer": ({"ball"}, [805, 768, 852, 430, 890]),
    "hoover": ({"sign"}, [919, 920]),
    "path": ({"sign"}, [919, 920]),
    "lake": ({"lake", "boat", "dock"}, [449, 472, 536, 693, 814, 975, 576]),  # 576: gondola
}


def _class_names() -> list[list[str]]:
    return [[name.strip().lower() for name in line.split(",")] for line in CLASSES_FILE.read_text().splitlines()]


def names_subject(photo: str, answer: str) -> bool:
    words, classes = SUBJECTS[photo]
    answer = answer.lower()
    if any(word in answer for word in words):
        return True
    names = _class_names()
    return any(names[index][0] in answer for index in classes)
