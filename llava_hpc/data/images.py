"""Opening the images records and bench questions name, and the one error for a record that cannot be used."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # PIL only where an image is opened: planning and `llava-hpc status` import this module
    from PIL import Image


class BadRecord(Exception):
    """A record (or its image) that is skipped and reported: the reason names the field or the file."""


def open_image(root: Path, candidates: list[str]) -> Image.Image:
    """The first candidate name that exists under `root`, decoded as RGB. A name that resolves outside `root`
    (`..`, an absolute path, a symlink out) or a file that does not decode is a BadRecord; none existing is
    FileNotFoundError naming every path tried."""
    from PIL import Image, UnidentifiedImageError

    root = Path(root).resolve()
    tried = []
    for relative in candidates:
        path = (root / relative).resolve()
        if not path.is_relative_to(root):
            raise BadRecord(f"image path {relative!r} escapes the image root {root}")
        if path.is_file():
            try:
                with Image.open(path) as image:
                    image.load()
                    return image.convert("RGB")
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
                raise BadRecord(f"corrupt image {path}: {exc}") from None
        tried.append(str(path))
    also = f" (also tried {', '.join(tried[1:])})" if len(tried) > 1 else ""
    raise FileNotFoundError(f"image file missing: {tried[0]}{also}")
