"""Figures: the per-layer early-exit plot (the paper's per-layer figure), the (E, d) speedup heatmap,
and the per-exit training losses from a training_log.jsonl.

matplotlib with the Agg backend (no display needed); every figure is written atomically.
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

from layerskip.files import save_figure


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_layer_analysis(curves: dict[str, list[dict]], path: str | Path, *, title: str = "") -> Path:
    """Early-exit quality per layer, one line per model.

    Args:
        curves: {model label: rows with "layer", "agreement", "perplexity"} (from analyze.py).
        path: the PNG to write.
    Left panel: top-1 agreement of the exit at layer l with the final layer's prediction.
    Right panel: perplexity of the exit at layer l on the text (log scale when it spans > 20x).
    """
    plt = _pyplot()
    fig, (ax_agree, ax_ppl) = plt.subplots(1, 2, figsize=(11, 4.2))
    max_layer = 1
    for label, rows in curves.items():
        layers = [int(r["layer"]) for r in rows]
        max_layer = max(max_layer, *layers)
        ax_agree.plot(layers, [float(r["agreement"]) for r in rows], marker="o", markersize=3, label=label)
        ax_ppl.plot(layers, [float(r["perplexity"]) for r in rows], marker="o", markersize=3, label=label)
    ax_agree.set_xlabel("exit layer (decoder layers run)")
    ax_agree.set_ylabel("top-1 agreement with the final layer")
    ax_agree.set_ylim(-0.02, 1.02)
    ax_ppl.set_xlabel("exit layer (decoder layers run)")
    ppl = [float(r["perplexity"]) for rows in curves.values() for r in rows]
    finite = [p for p in ppl if math.isfinite(p) and p > 0]
    if finite and max(finite) / min(finite) > 20:  # early layers are often orders of magnitude worse
        ax_ppl.set_yscale("log")
        ax_ppl.set_ylabel("perplexity (log scale)")
    else:
        ax_ppl.set_ylabel("perplexity")
    for ax in (ax_agree, ax_ppl):
        ax.set_xlim(0.5, max_layer + 0.5)
        ax.xaxis.set_major_locator(_integer_locator(max_layer))
        ax.grid(True, alpha=0.3)
        if len(curves) > 1:
            ax.legend(loc="best", fontsize=8)
    ax_agree.set_title("Early exit vs. final layer")
    ax_ppl.set_title("Early-exit perplexity")
    return _finish(plt, fig, path, title)


def plot_training_log(log_path: str | Path, path: str | Path, *, title: str = "", smooth: int = 25) -> Path:
    """Per-exit training loss against optimizer step, from `layerskip train`'s training_log.jsonl.

    Exits are active on some steps only (rotational / gradual curricula), so each exit's curve is its
    own moving average over the last `smooth` steps on which it was active. A second panel shows the
    layer-dropout rate of the last layer, p(L-1, t).
    """
    import json

    plt = _pyplot()
    rows = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    exits: dict[int, tuple[list[int], list[float]]] = {}
    for r in rows:
        for layer, loss in r.get("exit_losses", {}).items():
            steps, losses = exits.setdefault(int(layer), ([], []))
            steps.append(r["step"])
            losses.append(loss)
    fig, (ax_loss, ax_drop) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 1]})
    cmap = plt.get_cmap("viridis")
    last = max(exits) if exits else 0
    for layer in sorted(exits):
        steps, losses = exits[layer]
        avg = [sum(losses[max(0, i - smooth + 1):i + 1]) / len(losses[max(0, i - smooth + 1):i + 1])
               for i in range(len(losses))]
        ax_loss.plot(steps, avg, color=cmap(layer / max(1, last)), label=f"exit after layer {layer + 1}")
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel(f"cross-entropy (moving average of {smooth} active steps)")
    ax_loss.set_title("Early-exit loss per exit")
    ax_loss.grid(True, alpha=0.3)
    ax_loss.legend(loc="upper right", fontsize=7, ncol=2)
    ax_drop.plot([r["step"] for r in rows], [r["layer_dropout"][-1] for r in rows])
    ax_drop.set_xlabel("optimizer step")
    ax_drop.set_ylabel("layer dropout rate of the last layer")
    ax_drop.set_title("Layer dropout p(L-1, t)")
    ax_drop.grid(True, alpha=0.3)
    return _finish(plt, fig, path, title)


def plot_sweep_heatmap(rows: list[dict], path: str | Path, *, title: str = "",
                       heading: str = "Self-speculative speedup") -> Path:
    """Measured (or, for a replay, predicted) speedup over autoregressive for each (exit layer E, speculations d).

    Args:
        rows: sweep rows with "exit_layer", "num_speculations", "speedup" (missing cells stay blank).
        path: the PNG to write.
        heading: the title's first line.
    The best cell is outlined; each cell is annotated with its speedup.
    """
    import numpy as np

    plt = _pyplot()
    exits = sorted({int(r["exit_layer"]) for r in rows})
    specs = sorted({int(r["num_speculations"]) for r in rows})
    grid = np.full((len(exits), len(specs)), np.nan)
    for r in rows:
        value = _float(r.get("speedup"))
        if value is not None:
            grid[exits.index(int(r["exit_layer"])), specs.index(int(r["num_speculations"]))] = value
    fig, ax = plt.subplots(figsize=(1.6 + 0.75 * max(len(specs), 4), 1.6 + 0.55 * max(len(exits), 3)))
    finite = grid[np.isfinite(grid)]
    vmax = max(1.5, float(finite.max())) if finite.size else 2.0
    vmin = min(0.5, float(finite.min())) if finite.size else 0.0
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="RdYlGn", origin="lower", aspect="auto",
                      norm=_centered_norm(vmin, vmax))
    cbar = fig.colorbar(image, ax=ax)
    cbar.set_label("speedup vs. autoregressive (×)")
    ax.set_xticks(range(len(specs)), [str(d) for d in specs])
    ax.set_yticks(range(len(exits)), [str(e) for e in exits])
    ax.set_xlabel("speculations per round d")
    ax.set_ylabel("exit layer E")
    for i in range(len(exits)):
        for j in range(len(specs)):
            if math.isfinite(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8)
    if finite.size:
        i, j = np.unravel_index(np.nanargmax(grid), grid.shape)
        ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2))
    width_chars = int(fig.get_figwidth() * 11)  # about 11 characters per inch at this font size
    ax.set_title("\n".join([heading] + (textwrap.wrap(title, width_chars) if title else [])),
                 fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_auto_choices(stats, path: str | Path, *, title: str = "") -> Path:
    """What exit_layer="auto" chose over one generation: the exit layer of every round (top), its draft length d
    and the drafts accepted (bottom; d = 0: an autoregressive step). `stats`: a GenerationStats."""
    plt = _pyplot()
    rounds = list(range(1, len(stats.exit_layer_per_round) + 1))
    fig, (ax_e, ax_d) = plt.subplots(2, 1, figsize=(9, 5), sharex=True)
    ax_e.step(rounds, stats.exit_layer_per_round, where="mid", color="tab:blue")
    ax_e.set_ylabel("exit layer E")
    ax_e.yaxis.set_major_locator(_integer_locator(max(stats.exit_layer_per_round, default=1)))
    ax_d.step(rounds, stats.speculations_per_round, where="mid", color="tab:orange", label="d chosen")
    ax_d.bar(rounds, stats.accepted_per_round[:len(rounds)], color="tab:green", alpha=0.5, label="drafts accepted")
    ax_d.set_ylabel("drafts")
    ax_d.set_xlabel("round")
    ax_d.legend(loc="upper right", fontsize=8)
    for ax in (ax_e, ax_d):
        ax.grid(True, alpha=0.3)
    ax_e.set_title(f"exit_layer='auto': {stats.num_new_tokens} tokens in {len(rounds)} rounds")
    return _finish(plt, fig, path, title)


def _finish(plt, fig, path, title: str) -> Path:
    """Title, layout, atomic write, close."""
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return Path(path)


def _centered_norm(vmin: float, vmax: float):
    """Colour 1.0x (no gain) as the neutral middle: red below, green above."""
    from matplotlib.colors import TwoSlopeNorm

    return TwoSlopeNorm(vcenter=1.0, vmin=min(vmin, 0.99), vmax=max(vmax, 1.01))


def _integer_locator(max_layer: int):
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True, nbins=min(max_layer, 16))


def _float(value) -> float | None:
    if value is None or value == "":
        return None
    return float(value)
