"""Files nanovlm ships beside its code (config/, data/images/): in share/nanovlm once installed
with ament, at the root of the source tree when run from a checkout or a pip install -e."""

from __future__ import annotations

from pathlib import Path

import cv2

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")
SOURCE_ROOT = Path(__file__).resolve().parent.parent


def package_file(*parts: str) -> Path:
    """share/nanovlm/<parts> when nanovlm is installed in a sourced ROS prefix, else <source>/<parts>."""
    try:
        from ament_index_python.packages import PackageNotFoundError, get_package_share_directory

        try:
            installed = Path(get_package_share_directory("nanovlm")).joinpath(*parts)
            if installed.exists():
                return installed
        except (PackageNotFoundError, OSError):  # OSError: AMENT_PREFIX_PATH not set
            pass
    except ImportError:
        pass
    return SOURCE_ROOT.joinpath(*parts)


def bundled_photos_dir() -> Path:
    return package_file("data", "images")


def default_params_file() -> Path:
    return package_file("config", "vlm.yaml")


def list_photos(source: str | Path) -> list[Path]:
    """The photographs in a directory (sorted), or the single file named."""
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no such photo or directory: '{source}'")
    photos = sorted(p for p in path.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)
    if not photos:
        raise FileNotFoundError(f"no .jpg or .png photos in '{source}'")
    return photos


def load_photo(path, width: int):
    """RGB uint8 frame of a photo file, resized to `width` pixels wide (0 = as it is)."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"cannot read image '{path}'")
    if width and bgr.shape[1] != width:
        height = round(bgr.shape[0] * width / bgr.shape[1])
        bgr = cv2.resize(bgr, (width, height), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
