"""Figures: image grids and loss curves, written as PNG (matplotlib, no display needed)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from brainvq.io_utils import atomic_path


def save_grid(cells: Sequence[Sequence[np.ndarray]], path: Path,
              col_titles: Sequence[str] | None = None, row_titles: Sequence[str] | None = None,
              index_cols: Sequence[int] = (), n_codes: int | None = None,
              cell_inches: float = 1.8) -> None:
    """cells[row][col] is an (H, W) array: images in [0, 1] shown grey, columns listed in
    `index_cols` are code-index maps shown in colour."""
    n_rows, n_cols = len(cells), len(cells[0])
    fig, axes = plt.subplots(n_rows, n_cols, squeeze=False,
                             figsize=(cell_inches * n_cols, cell_inches * n_rows))
    for r, row in enumerate(cells):
        for c, cell in enumerate(row):
            ax = axes[r][c]
            if c in index_cols:
                ax.imshow(cell, cmap="viridis", vmin=0, vmax=(n_codes or cell.max() + 1) - 1,
                          interpolation="nearest")
            else:
                ax.imshow(cell, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0 and col_titles:
                ax.set_title(col_titles[c], fontsize=9)
            if c == 0 and row_titles:
                ax.set_ylabel(row_titles[r], fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def save_loss_curves(history: Sequence[dict[str, float]], keys: Sequence[str], path: Path,
                     title: str, ylabel: str = "loss", log_y: bool = False) -> None:
    """One line per key over epochs; keys missing from the history are skipped."""
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [row["epoch"] for row in history]
    for key in keys:
        if key in history[0]:
            ax.plot(epochs, [row[key] for row in history], marker="o", ms=3, label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def save_line_panels(x: Sequence[float], panels: dict[str, dict[str, Sequence[float]]],
                     path: Path, title: str, xlabel: str) -> None:
    """One panel per entry of `panels` (its key is the y label), stacked over a shared x axis,
    with one line per series."""
    fig, axes = plt.subplots(len(panels), 1, sharex=True, squeeze=False,
                             figsize=(6, 2.6 * len(panels)))
    for ax, (ylabel, series) in zip(axes[:, 0], panels.items(), strict=True):
        for name, ys in series.items():
            ax.plot(x, ys, marker="o", ms=3, label=name)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0, 0].set_title(title)
    axes[-1, 0].set_xlabel(xlabel)
    axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    _save(fig, path)


def save_heatmap_grid(images: Sequence[Sequence[np.ndarray]],
                      heat: Sequence[Sequence[np.ndarray | None]], path: Path,
                      col_titles: Sequence[str], vmax: float, label: str,
                      outlines: Sequence[np.ndarray | None] | None = None,
                      cell_inches: float = 2.2) -> None:
    """images[row][col] are (H, W) images in [0, 1] shown grey; where heat[row][col] is not None,
    that coarser map is stretched over the image (nearest neighbour) in semi-transparent
    colour, on one scale from 0 to `vmax` with a shared colour bar. outlines[row], an (H, W)
    bool mask, is outlined in every cell of its row."""
    n_rows, n_cols = len(images), len(images[0])
    fig, axes = plt.subplots(n_rows, n_cols, squeeze=False,
                             figsize=(cell_inches * n_cols + 0.8, cell_inches * n_rows))
    shown = None
    for r in range(n_rows):
        for c in range(n_cols):
            ax, image = axes[r][c], images[r][c]
            height, width = image.shape
            ax.imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            if heat[r][c] is not None:
                shown = ax.imshow(heat[r][c], cmap="inferno", vmin=0, vmax=vmax, alpha=0.6,
                                  interpolation="nearest",
                                  extent=(-0.5, width - 0.5, height - 0.5, -0.5))
            if outlines is not None and outlines[r] is not None:
                ax.contour(outlines[r].astype(float), levels=[0.5], colors="cyan",
                           linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(col_titles[c], fontsize=9)
    if shown is not None:
        fig.colorbar(shown, ax=axes.ravel().tolist(), shrink=0.8, label=label)
    _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
