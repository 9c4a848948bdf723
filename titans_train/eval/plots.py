"""PNG plots of eval results (matplotlib, the optional `eval` extra; without it no plot is drawn, with a note)."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _label(n: int) -> str:
    for unit, div in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= div and n % div == 0:
            return f"{n // div}{unit}"
    return str(n)


def plot_ppl(result: dict, path: str | Path) -> Path | None:
    """Loss against position bucket, streamed (state over the document) vs windowed (fresh every window)."""
    plt = _pyplot()
    if plt is None:
        return None
    b = [x for x in result["buckets"] if x["tokens"]]
    xs = range(len(b))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(xs, [x["loss_streamed"] for x in b], "o-", label="streamed (state over the document)")
    ax.plot(xs, [x["loss_windowed"] for x in b], "s--", label=f"windowed ({result['window']} tokens)")
    ax.set_xticks(list(xs), [f"{_label(x['start'])}-{_label(x['end'])}" for x in b], rotation=30, fontsize=8)
    ax.set_xlabel("position in document (tokens)")
    ax.set_ylabel("loss (nats / token)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_niah(result: dict, path: str | Path) -> Path | None:
    """Accuracy heatmap: depth (rows) x context length (columns), like the paper's needle figures."""
    plt = _pyplot()
    if plt is None:
        return None
    lengths, depths = result["lengths"], result["depths"]
    acc = [[result["accuracy"][str(n)][str(d)] for n in lengths] for d in depths]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.2 + 0.5 * len(depths)))
    im = ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            ax.text(j, i, f"{acc[i][j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(lengths)), [_label(n) for n in lengths], fontsize=8)
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=8)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(f"{result['needle']} needle, {result['haystack']} haystack", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
