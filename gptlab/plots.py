"""PNG curves from metrics.jsonl (matplotlib's Agg backend: no display needed)."""
from __future__ import annotations

import io
import json
from pathlib import Path

from gptlab.io import atomic_write_bytes


def read_metrics(path: str | Path) -> list[dict]:
    rows = []
    path = Path(path)
    if not path.is_file():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a crash
    return rows


def save_figure(fig, out: str | Path) -> None:
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())


def plot_curves(rows: list[dict], keys: list[str], out: str | Path, title: str = "",
                x: str = "step") -> bool:
    """One panel per key present in the rows; returns False when there is nothing to plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    present = [k for k in keys if any(k in r and r[k] is not None for r in rows)]
    if not present:
        return False
    cols = min(3, len(present))
    nrows = (len(present) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, present):
        pts = [(r[x], r[key]) for r in rows if key in r and r[key] is not None and x in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None)
        ax.set_title(key)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, out)
    return True


def plot_loss(rows: list[dict], out: str | Path, title: str = "") -> bool:
    """Train and validation loss on one axis: the curve every training run keeps up to date."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    train = [(r["step"], r["train_loss"]) for r in rows if r.get("train_loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    if not train and not val:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train", alpha=0.7)
    if val:
        ax.plot(*zip(*val), label="val", marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, out)
    return True


def plot_comparisons(results: list[dict], labels: list[str], out: str | Path, title: str = "") -> None:
    """A forest plot of `gptlab compare` results, one row each: the paired accuracy difference A - B
    (points) and the labeler's win rate of A, both with their 95% intervals, and the line of no effect."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(results)
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.9 + 0.42 * n), sharey=True)
    ys = list(range(n))[::-1]
    panels = [("accuracy_diff", "accuracy_diff_ci95", 100.0, 0.0, "paired accuracy A - B (points)"),
              ("win_rate_a", "win_rate_ci95", 100.0, 50.0, "labeler win rate of A (%)")]
    for ax, (key, ci, scale, null, xlabel) in zip(axes, panels):
        for y, r in zip(ys, results):
            v, (lo, hi) = r[key] * scale, (c * scale for c in r[ci])
            clear = lo > null or hi < null
            ax.errorbar(v, y, xerr=[[v - lo], [hi - v]], fmt="o", capsize=3,
                        color="tab:blue" if clear else "tab:gray")
        ax.axvline(null, color="black", lw=0.8, ls="--")
        ax.set_xlabel(xlabel)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(ys, labels)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, out)


def plot_family_bars(results: dict[str, dict], families: list[str], out: str | Path, title: str = "",
                     floor: float | None = None) -> None:
    """Accuracy per family (grouped bars, one colour per model) with each model's mean in the legend,
    and an optional dashed target line (``floor``, a fraction)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(results)
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(families), 3.6))
    for i, name in enumerate(names):
        per = results[name]["per_family"]
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(families))]
        mean = 100 * sum(per.get(f, 0) for f in families) / len(families)
        ax.bar(xs, [100 * per.get(f, 0) for f in families], width, label=f"{name} (mean {mean:.0f}%)")
    if floor is not None:
        ax.axhline(100 * floor, color="black", lw=0.8, ls="--")
    ax.set_xticks(range(len(families)), families)
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy (%)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, out)
