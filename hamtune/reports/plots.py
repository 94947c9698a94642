"""The one matplotlib set-up of hamtune's figures: matplotlib's object-oriented Figure, never pyplot.

A Figure made this way draws with the Agg renderer when saved, needs no display and no backend switch, and is freed
with its last reference (pyplot would keep every figure in a global registry until closed).
"""

from __future__ import annotations

from matplotlib.figure import Figure


def figure(figsize: tuple[float, float], **kwargs) -> Figure:
    """A new figure to draw on; save it with hamtune.io.save_figure."""
    return Figure(figsize=figsize, **kwargs)
