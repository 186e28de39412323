"""Files nanovlm ships beside its code (config/, data/images/): in share/nanovlm once installed
with ament, at the root of the source tree when run from a checkout or a pip install -e."""

from __future__ import annotations

from pathlib import Path

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
