"""
`autoresearch plot`: progress.png. Every experiment's val_bpb at its experiment number (the ledger's, as in
`status`); kept ones on the running-best step line with short labels, discarded ones faint, crashes as red
crosses along the top edge, and the band a single run had to beat the best by when each experiment was judged:
the gate's bar for one run against the best's pool (gate.bar(margin, 1, n_best)), narrower than the margin once
the best is a mean of several runs; past the last experiment, the bar the next run must beat. The values are the
ones results.tsv and status show (pooled means, gate.shown_value).
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


def series(records, margin=None, in_history=lambda commit: True):
    """What the plot draws: (experiment number, value[, record]) of kept and discarded experiments, the crashes'
    numbers, the margin in force at each experiment (the record's, else `margin`), the bar a single run had to
    beat the best by there (for the best's pool of that time), and the bar for the next run, against today's best.
    A kept commit no longer in the branch's history (a `git reset --hard` past it) is "left": still a keep, as in
    status and results.tsv, but off the running-best line, which follows the branch as the gate does."""
    exps = [r for r in gate.experiments(records) if r["verdict"] != "interrupted"]
    xs = [r.get("exp") or i for i, r in enumerate(exps, 1)]
    vals = [gate.shown_value(records, r) if r["verdict"] in ("keep", "discard") else None for r in exps]
    vals = [v if isinstance(v, (int, float)) and math.isfinite(v) else None for v in vals]
    margins = [r.get("margin") if isinstance(r.get("margin"), (int, float)) else margin for r in exps]
    best_rec, _ = gate.best_kept(records, in_history)
    n_best = len(gate.pool(records, best_rec["content_hash"])) if best_rec else 1
    now = margin if margin is not None else next((m for m in reversed(margins) if m), None)
    return {"exps": exps, "xs": xs, "vals": vals,
            "kept": [(x, v, r) for x, v, r in zip(xs, vals, exps) if v is not None and r["verdict"] == "keep"
                     and in_history(r["commit"])],
            "left": [(x, v) for x, v, r in zip(xs, vals, exps) if v is not None and r["verdict"] == "keep"
                     and not in_history(r["commit"])],
            "discarded": [(x, v) for x, v, r in zip(xs, vals, exps) if v is not None and r["verdict"] == "discard"],
            "crash": [x for x, r in zip(xs, exps) if r["verdict"] == "crash"],
            "margins": margins,
            "bars": [gate.bar(m, 1, r.get("best_runs") or 1) if m else None for m, r in zip(margins, exps)],
            "next_bar": gate.bar(now, 1, max(n_best, 1)) if now else None, "next_best_runs": n_best}


def make_plot(records, path, title="", margin=None, in_history=lambda commit: True):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)  # -o into a folder not made yet
    s = series(records, margin, in_history)
    exps, xs, vals, kept, left, disc, crash, bars = (s[k] for k in ("exps", "xs", "vals", "kept", "left", "discarded",
                                                                     "crash", "bars"))

    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    good = [v for v in vals if v is not None]
    # y range from the kept results, so one terrible discard doesn't flatten the interesting part
    if kept:
        lo = min(min(good), min(v for _, v, _ in kept) - max([b for b in bars + [s["next_bar"]] if b] or [0]))
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
        ax.step(steps_x + [xs[-1]], steps_y + [steps_y[-1]], where="post", color="tab:green", linewidth=2,
                label="running best", zorder=3)
        # under the best after each experiment, what the experiment after it had to beat that best by (the gate's
        # bar for one run against the best's pool); after the last one, what the next run must beat
        following = bars[1:] + [s["next_bar"]]
        band = [(x, b) for x, b in zip(xs, following) if x >= steps_x[0] and b]
        if s["next_bar"]:
            band += [(xs[-1] + 1.5, s["next_bar"])]  # to the plot's right edge
        band_best = [steps_y[max(i for i, sx in enumerate(steps_x) if sx <= x)] for x, _ in band]
        if band:
            ax.fill_between([x for x, _ in band], [v - b for v, (_, b) in zip(band_best, band)], band_best,
                            step="post", color="tab:green", alpha=0.08,
                            label=f"bar one run must beat the best by (next run: {band[-1][1]:.4f}, "
                                  f"vs the best's {s['next_best_runs']} run{'s' * (s['next_best_runs'] != 1)})")
        ax.scatter([x for x, _, _ in kept], [v for _, v, _ in kept], s=40, color="tab:green", edgecolor="black",
                   label=f"kept ({len(kept)})", zorder=4)
        for x, v, r in kept:
            label = r.get("description", "")
            label = label if len(label) <= LABEL_CHARS else label[:LABEL_CHARS - 1] + "…"
            ax.annotate(label, (x, v), xytext=(4, 6), textcoords="offset points", fontsize=7, rotation=25,
                        color="darkgreen")
    if left:
        ax.scatter([x for x, _ in left], [min(v, top) for _, v in left], s=40, facecolor="none", edgecolor="tab:green",
                   label=f"kept, then left by a git reset ({len(left)})", zorder=4)
    if crash:
        ax.scatter(crash, [top] * len(crash), marker="x", s=40, color="tab:red", label=f"crash ({len(crash)})",
                   zorder=4)

    ax.set_ylim(ylo, yhi)
    ax.set_xlim(0.5, max(xs or [1]) + 1.5)  # room for the last label
    ax.set_xlabel("experiment #")
    ax.set_ylabel("val_bpb (lower is better)")
    n_all = len(gate.experiments(records))
    ax.set_title(f"{title + ': ' if title else ''}{n_all} experiments = {len(kept) + len(left)} kept + {len(disc)} "
                 f"discarded + {len(crash)} crashed + {n_all - len(exps)} interrupted")
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
