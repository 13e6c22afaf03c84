"""
`autoresearch plot`: progress.png. Every experiment's val_bpb in order; kept ones on the running-best step
line with short labels, discarded ones faint, crashes as red crosses along the top edge.
"""

import math
import os

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402

from autoresearch import gate  # noqa: E402

PLOT_FILE = "progress.png"
LABEL_CHARS = 28
FIGSIZE = (12, 6)
DPI = 120


def _value(r):
    v = gate.run_value(r)
    return v if isinstance(v, (int, float)) and math.isfinite(v) and r["verdict"] in ("keep", "discard") else None


def make_plot(records, path, title="", margin=None):
    exps = [r for r in gate.experiments(records) if r["verdict"] != "interrupted"]
    xs = list(range(1, len(exps) + 1))
    vals = [_value(r) for r in exps]
    kept = [(x, v, r) for x, v, r in zip(xs, vals, exps) if v is not None and r["verdict"] == "keep"]
    disc = [(x, v) for x, v, r in zip(xs, vals, exps) if v is not None and r["verdict"] == "discard"]
    crash = [x for x, r in zip(xs, exps) if r["verdict"] == "crash"]

    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    good = [v for v in vals if v is not None]
    # y range from the kept results, so one terrible discard doesn't flatten the interesting part
    if kept:
        lo = min(good)
        hi = max(kept[0][1], max(v for _, v, _ in kept))
        span = max(hi - lo, 0.01)
        ylo, yhi = lo - 0.15 * span, hi + 0.6 * span
    elif good:
        ylo, yhi = min(good) - 0.01, max(good) + 0.01
    else:
        ylo, yhi = 0.0, 1.0
    top = yhi - 0.03 * (yhi - ylo)

    if disc:
        ax.scatter([x for x, _ in disc], [min(v, top) for _, v in disc], s=18, color="0.55", alpha=0.35,
                   label=f"discarded ({len(disc)})", zorder=2)
    if kept:
        # running best: a step that only ever goes down, extended to the last experiment
        best, steps_x, steps_y = math.inf, [], []
        for x, v, _ in kept:
            best = min(best, v)
            steps_x.append(x)
            steps_y.append(best)
        steps_x.append(xs[-1])
        steps_y.append(steps_y[-1])
        ax.step(steps_x, steps_y, where="post", color="tab:green", linewidth=2, label="running best", zorder=3)
        if margin:
            ax.fill_between(steps_x, [y - margin for y in steps_y], steps_y, step="post", color="tab:green",
                            alpha=0.08, label=f"keep margin ({margin:.4f})")
        ax.scatter([x for x, _, _ in kept], [v for _, v, _ in kept], s=40, color="tab:green", edgecolor="black",
                   label=f"kept ({len(kept)})", zorder=4)
        for x, v, r in kept:
            label = r.get("description", "")
            label = label if len(label) <= LABEL_CHARS else label[:LABEL_CHARS - 1] + "…"
            ax.annotate(label, (x, v), xytext=(4, 6), textcoords="offset points", fontsize=7, rotation=25,
                        color="darkgreen")
    if crash:
        ax.scatter(crash, [top] * len(crash), marker="x", s=40, color="tab:red", label=f"crash ({len(crash)})",
                   zorder=4)

    ax.set_ylim(ylo, yhi)
    ax.set_xlim(0.5, max(len(xs), 1) + 1.5)  # room for the last label
    ax.set_xlabel("experiment #")
    ax.set_ylabel("val_bpb (lower is better)")
    ax.set_title(f"{title + ': ' if title else ''}{len(exps)} experiments, {len(kept)} kept, {len(crash)} crashed")
    ax.grid(alpha=0.25)
    if exps:
        ax.legend(loc="upper right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no experiments yet", transform=ax.transAxes, ha="center", va="center")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)  # never a half-written png
    return path
