"""The one rule for plots: matplotlib's object API (a `Figure`, never pyplot), so no backend is chosen and no global
figure state is kept by a library that jobs and tests import; a plot is PNG bytes, written atomically by its caller.
matplotlib is imported here, when a plot is made: the CLI's quick commands must not load it."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def new_figure(width: float, height: float, dpi: int = 100) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=dpi)


def png_bytes(figure: Figure, dpi: int | None = None) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", **({} if dpi is None else {"dpi": dpi}))
    return buffer.getvalue()
