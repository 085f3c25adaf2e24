"""The picture people look at first: accuracy against width, a manifold beside individual models.

matplotlib is optional (``pip install neumeta[plot]``); it is imported only when a plot is drawn.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional


def plot_width_curve(curve: Mapping[float, float], path, individual: Optional[Mapping[float, float]] = None,
                     trained: tuple = (0.5, 1.0), metric: str = "test accuracy %", title: str = "",
                     matched: Optional[Mapping[float, float]] = None, labels: tuple = ()) -> Path:
    """Line: the manifold's metric at every width of ``curve`` ({width: value in [0, 1]}); dots:
    individually trained models (``matched``: a second set, e.g. given as much data as the
    manifold; ``labels`` name the two sets); shaded: the widths outside the ``trained`` range."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    widths = sorted(curve)
    ax.plot(widths, [100 * curve[w] for w in widths], "-", color="black", linewidth=2.2, marker=".",
            label="NeuMeta: one manifold, sampled at each width")
    labels = tuple(labels) + ("individual models, one trained per width",
                              "individual models given the manifold's data")[len(labels):]
    for dots, style, color, label in ((individual, "o", "tab:red", labels[0]),
                                      (matched, "s", "tab:blue", labels[1])):
        if dots:
            xs = sorted(dots)
            ax.plot(xs, [100 * dots[w] for w in xs], style, color=color, markersize=7, label=label)
    lo, hi = min(widths + list(individual or ())), max(widths + list(individual or ()))
    pad = 0.02
    if lo < trained[0]:
        ax.axvspan(lo - pad, trained[0], color="grey", alpha=0.18, label="widths never seen in training")
    if hi > trained[1]:
        ax.axvspan(trained[1], hi + pad, color="grey", alpha=0.18)
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_xlabel("width (multiplier of every group's channels; compression γ = 1 − width)")
    ax.set_ylabel(metric)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
