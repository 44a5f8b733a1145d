"""Pictures of what a model does: attention maps as heatmaps, loss curves. PNG files.

matplotlib is imported only when a picture is drawn (``pip install matplotlib``), and only its
object-oriented API is used (a ``Figure`` with an Agg canvas), so nothing here touches pyplot's
global state or needs a display.

    >>> logits, maps = model(src, trg, return_attention=True)
    >>> w = maps["decoder.layers.1.enc_dec_attention"][0].mean(0)   # (T, S), heads averaged
    >>> pyformer.viz.attention_heatmap(w, src_tokens, out_tokens, "attention.png")
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Sequence

__all__ = ["attention_heatmap", "attention_grid", "loss_plot"]


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("pyformer.viz needs matplotlib: pip install matplotlib") from e
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _as_2d(weights):
    import torch

    w = (
        weights.detach().float().cpu()
        if isinstance(weights, torch.Tensor)
        else torch.as_tensor(weights, dtype=torch.float32)
    )
    if w.dim() != 2:
        raise ValueError(
            f"pyformer.viz: weights must be 2-D (queries, keys), got shape {tuple(w.shape)}"
        )
    return w.numpy()


def _save(fig, path: Optional[str]):
    if path is None:
        return fig
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    return path


def _draw(
    ax,
    w,
    key_labels,
    query_labels,
    title,
    cmap,
    annotate,
    xlabel="key (attended) token",
    ylabel="query token",
):
    im = ax.imshow(w, cmap=cmap, vmin=0.0, vmax=max(float(w.max()), 1e-12), aspect="auto")
    if key_labels is not None:
        ax.set_xticks(range(len(key_labels)))
        ax.set_xticklabels([str(t) for t in key_labels], rotation=90 if len(key_labels) > 12 else 0)
    if query_labels is not None:
        ax.set_yticks(range(len(query_labels)))
        ax.set_yticklabels([str(t) for t in query_labels])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if annotate:
        for i in range(w.shape[0]):
            for j in range(w.shape[1]):
                ax.text(
                    j,
                    i,
                    f"{w[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if w[i, j] < 0.5 * w.max() else "black",
                )
    return im


def attention_heatmap(
    weights,
    key_labels: Optional[Sequence] = None,
    query_labels: Optional[Sequence] = None,
    path: Optional[str] = None,
    *,
    title: Optional[str] = None,
    cmap: str = "viridis",
    annotate: bool = False,
    xlabel: str = "key (attended) token",
    ylabel: str = "query token",
):
    """Draw one attention map as a heatmap labelled with the tokens.

    Args:
        weights: a (Lq, Lk) tensor or array of attention probabilities (rows = queries).
        key_labels: the Lk key tokens (x axis). query_labels: the Lq query tokens (y axis).
        path: where to save the PNG; None returns the matplotlib ``Figure`` instead.
        title: figure title. cmap: colormap. annotate: write each probability in its cell.
        xlabel, ylabel: axis titles.

    Returns:
        ``path`` (after saving) or the ``Figure``.
    """
    w = _as_2d(weights)
    lq, lk = w.shape
    fig = _figure(max(3.0, 0.45 * lk + 1.8), max(2.5, 0.45 * lq + 1.2))
    ax = fig.add_subplot(1, 1, 1)
    im = _draw(ax, w, key_labels, query_labels, title, cmap, annotate, xlabel, ylabel)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _save(fig, path)


def attention_grid(
    maps: Dict[str, object],
    key_labels: Optional[Sequence] = None,
    query_labels: Optional[Sequence] = None,
    path: Optional[str] = None,
    *,
    cols: int = 4,
    cmap: str = "viridis",
):
    """Several (Lq, Lk) attention maps side by side, one panel per entry of ``maps`` (title: key)."""
    names = list(maps)
    cols = max(1, min(cols, len(names)))
    rows = (len(names) + cols - 1) // cols
    first = _as_2d(maps[names[0]])
    lq, lk = first.shape
    fig = _figure(cols * max(2.5, 0.35 * lk + 1.2), rows * max(2.2, 0.35 * lq + 1.0))
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        _draw(ax, _as_2d(maps[name]), key_labels, query_labels, name, cmap, False)
    fig.tight_layout()
    return _save(fig, path)


def loss_plot(
    curves: Dict[str, Sequence[float]],
    path: Optional[str] = None,
    *,
    title: str = "training loss",
    xlabel: str = "step",
    ylabel: str = "loss",
    logy: bool = True,
    extra: Optional[Dict[str, Sequence[float]]] = None,
    extra_label: str = "|difference|",
):
    """Loss curves (name -> values per step) in one plot; ``extra`` curves on a second panel.

    Returns ``path`` (after saving) or the ``Figure``.
    """
    fig = _figure(7.0, 4.5 if not extra else 6.5)
    ax = fig.add_subplot(2 if extra else 1, 1, 1)
    styles = ["-", "--", ":", "-."]
    for i, (name, ys) in enumerate(curves.items()):
        ax.plot(range(1, len(ys) + 1), list(ys), styles[i % len(styles)], label=name, linewidth=1.2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    if extra:
        ax2 = fig.add_subplot(2, 1, 2)
        for name, ys in extra.items():
            ax2.plot(range(1, len(ys) + 1), list(ys), label=name, linewidth=1.0)
        ax2.set_yscale("log")
        ax2.set_xlabel(xlabel)
        ax2.set_ylabel(extra_label)
        ax2.grid(True, alpha=0.3)
        ax2.legend()
    fig.tight_layout()
    return _save(fig, path)
