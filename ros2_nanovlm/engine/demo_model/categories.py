"""Everyday categories of the demo VLM: each ImageNet class belongs to one (imagenet_categories.tsv,
a hand mapping, provenance in its header), and the JSON schema the demo model fills.

    categories, class_category = load_class_categories()   # 24 names; (1000,) category index
    schema = object_schema()                                # {"object", "category", "is_animal"}

No ROS imports; no torch.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
CATEGORY_FILE = "imagenet_categories.tsv"
SCHEMA_FILE = "object_schema.json"

# The JSON schema's enum, in this order. "animal" is also the group of the first six.
CATEGORIES = (
    "dog",
    "cat",
    "bird",
    "fish",
    "insect",
    "animal",
    "fruit",
    "vegetable",
    "food",
    "plant",
    "person",
    "vehicle",
    "sign",
    "building",
    "landscape",
    "furniture",
    "clothing",
    "tool",
    "device",
    "container",
    "instrument",
    "ball",
    "toy",
    "object",
)
# Wider words a yes/no question may use: "Is there an animal?" is true for a dog.
GROUPS = {
    "animal": ("dog", "cat", "bird", "fish", "insect", "animal"),
    "food": ("fruit", "vegetable", "food"),
}
ANIMALS = frozenset(GROUPS["animal"])


def group_of(category: str) -> str | None:
    """The wider word for `category` ("animal" for "dog"), None when it has none (or is one)."""
    for group, members in GROUPS.items():
        if category in members and category != group:
            return group
    return None


def load_class_categories(directory: str | Path = HERE) -> tuple[tuple[str, ...], list[int]]:
    """(CATEGORIES, per ImageNet class the index of its category), from imagenet_categories.tsv."""
    class_category: dict[int, int] = {}
    for line in (Path(directory) / CATEGORY_FILE).read_text(encoding="utf-8").splitlines():
        if not line or line.startswith("#"):
            continue
        index, category, _name = line.split("\t")
        if category not in CATEGORIES:
            raise ValueError(f"{CATEGORY_FILE}: class {index} has an unknown category {category!r}")
        class_category[int(index)] = CATEGORIES.index(category)
    if sorted(class_category) != list(range(1000)):
        raise ValueError(f"{CATEGORY_FILE} must give every class 0..999 exactly one category")
    return CATEGORIES, [class_category[i] for i in range(1000)]


def object_schema() -> dict:
    """The JSON schema the demo model is trained to fill (also shipped as object_schema.json)."""
    return {
        "type": "object",
        "properties": {
            "object": {"type": "string"},
            "category": {"type": "string", "enum": list(CATEGORIES)},
            "is_animal": {"type": "boolean"},
        },
        "required": ["object", "category", "is_animal"],
        "additionalProperties": False,
    }


def load_object_schema(directory: str | Path = HERE) -> dict:
    return json.loads((Path(directory) / SCHEMA_FILE).read_text(encoding="utf-8"))
