"""Figures that several chapters draw: image grids and labelled heatmaps."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch


def image_grid(rows: list, row_labels=None, col_labels=None, cmap="gray", size: float = 1.1, vmin=0.0, vmax=1.0):
    """Draw ``rows`` (a list of rows, each a list or tensor of C×H×W / H×W images) as a grid."""
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(size * n_cols, size * n_rows), squeeze=False)
    for i, row in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i, j]
            ax.set_xticks([]), ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if j >= len(row):
                continue
            img = row[j].detach().cpu().numpy() if isinstance(row[j], torch.Tensor) else np.asarray(row[j])
            if img.ndim == 3:
                img = img[0] if img.shape[0] == 1 else np.transpose(img, (1, 2, 0))
            ax.imshow(img, cmap=cmap, vmin=vmin, vmax=vmax)
    return _labelled(fig, axes, row_labels, col_labels)


def _labelled(fig, axes, row_labels, col_labels):
    """Column titles on the first row, row labels on the first column."""
    for j, label in enumerate(col_labels if col_labels is not None else []):
        axes[0, j].set_title(str(label), fontsize=8)
    for i, label in enumerate(row_labels if row_labels is not None else []):
        axes[i, 0].set_ylabel(str(label), fontsize=8, rotation=0, ha="right", va="center")
    fig.tight_layout()
    return fig


def heatmap(tidy: pd.DataFrame, index: str, columns: str, values: str, fmt: str = ".2f", title: str = "", ax=None, **kw):
    """A seaborn heatmap of a tidy table (one row per cell), on ``ax`` or a new figure."""
    grid = tidy.pivot(index=index, columns=columns, values=values)
    if ax is None:
        fig, ax = plt.subplots(figsize=(1 + 0.7 * grid.shape[1], 0.8 + 0.45 * grid.shape[0]))
    fig = ax.figure
    sns.heatmap(grid, annot=True, fmt=fmt, cmap=kw.pop("cmap", "viridis"), ax=ax, **kw)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def overlay_grid(images, heatmaps, row_labels=None, col_labels=None, size: float = 1.2, alpha: float = 0.55,
                 scale: str = "per_map", annotations=None, colorbar_label: str | None = None):
    """Each row: an image, then each of its heat maps drawn over it (e.g. PARTICUL part maps).

    ``images``: N×C×H×W; ``heatmaps``: N×P×H×W. ``scale``:

    - ``"calibrated"``: every map of the figure on one [0, 1] scale, values as given (PARTICUL's
      calibrated maps): a weak map looks weak, and maps can be compared;
    - ``"per_map"``: each map stretched to its own range (shows *where*, never *how strongly*).

    ``annotations``: N×P texts printed on the maps (e.g. each part's confidence).
    """
    if scale not in ("calibrated", "per_map"):
        raise ValueError(f"unknown scale {scale!r}; valid scales: calibrated, per_map")
    images, heatmaps = np.asarray(images), np.asarray(heatmaps)
    n, p = heatmaps.shape[:2]
    fig, axes = plt.subplots(n, p + 1, figsize=(size * (p + 1) + (0.6 if scale == "calibrated" else 0), size * n),
                             squeeze=False)
    shown = None
    for i in range(n):
        img = images[i][0] if images[i].shape[0] == 1 else np.transpose(images[i], (1, 2, 0))
        for j in range(p + 1):
            ax = axes[i, j]
            ax.set_xticks([]), ax.set_yticks([])
            ax.imshow(img, cmap="gray", vmin=0, vmax=1)
            if j:
                m = heatmaps[i, j - 1]
                if scale == "per_map":
                    m = (m - m.min()) / (np.ptp(m) + 1e-8)
                shown = ax.imshow(m, cmap="jet", alpha=alpha, vmin=0, vmax=1)
                if annotations is not None:
                    ax.text(0.04, 0.96, str(annotations[i][j - 1]), transform=ax.transAxes, ha="left", va="top",
                            fontsize=7, color="white", bbox={"facecolor": "black", "alpha": 0.6, "pad": 1, "lw": 0})
    fig = _labelled(fig, axes, row_labels, col_labels)
    if scale == "calibrated" and shown is not None:
        fig.colorbar(shown, ax=axes, fraction=0.03, pad=0.02, label=colorbar_label or "confidence")
    return fig
