"""
The keep gate: is a candidate's val_bpb better than the best kept result by more than run-to-run noise?

margin  = max(NOISE_MULT * noise_std, MARGIN_FLOOR) once `autoresearch noise` has measured noise_std on this
          branch, DEFAULT_MARGIN before that (or a fixed --margin).
gain    = best - val_bpb    (best = lowest reference value among kept commits; a commit's reference value is
                             the mean of all its successful runs, so noise/confirmation runs sharpen it)
keep    if gain > 2 * margin                      clear win
confirm if margin < gain <= 2 * margin            borderline: re-run with CONFIRM_SEEDS more seeds and keep
                                                  only if the mean of all n seeds still gains more than
                                                  margin * sqrt((1 + 1/n) / 2)  (the difference of a mean of
                                                  n runs and one run has that much less noise than two runs)
discard otherwise. With --simpler (a change that removes code) the bar is only "not worse by more than margin".
The first successful run on a branch is the baseline and is always kept.
"""

import math
import statistics

from autoresearch.common import CONFIRM_SEEDS

DEFAULT_MARGIN = 0.005   # used until `autoresearch noise` has run: a guess, measure it
NOISE_MULT = 2.0         # two noise standard deviations: a no-op change passes by luck only ~8% of the time
MARGIN_FLOOR = 0.001     # never trust gains below this, however quiet the hardware looks
OK_VERDICTS = ("keep", "discard", "noise")  # runs whose val_bpb is a valid measurement


def branch_records(ledger, branch):
    return [r for r in ledger if r.get("branch") == branch]


def experiments(records):
    return [r for r in records if r["kind"] == "run"]


def valid_value(record):
    v = record.get("val_bpb")
    return isinstance(v, (int, float)) and math.isfinite(v) and record.get("verdict") in OK_VERDICTS + ("confirm",)


def run_value(record):
    """The val_bpb an experiment record stands for: the mean of its seeds if it has one, else its single run."""
    v = record.get("val_bpb_mean")
    return v if v is not None else record.get("val_bpb")


def already_run(records, content_hash):
    """Earlier experiments of this exact train.py (interrupted ones don't count: they never finished)."""
    return [r for r in experiments(records) if r.get("content_hash") == content_hash and r["verdict"] != "interrupted"]


def reference_value(records, content_hash):
    """Mean val_bpb over every valid run of this exact train.py (any seed, any kind)."""
    vals = [r["val_bpb"] for r in records if r.get("content_hash") == content_hash and valid_value(r)]
    return statistics.fmean(vals) if vals else None


def kept(records, in_history=lambda commit: True):
    """Kept experiments whose commit is still in the branch's history, oldest first."""
    return [r for r in experiments(records) if r["verdict"] == "keep" and in_history(r["commit"])]


def best_kept(records, in_history=lambda commit: True):
    """(record, reference value) of the best kept commit, or (None, None) before the baseline."""
    best = None
    for r in kept(records, in_history):
        value = reference_value(records, r["content_hash"])
        if value is not None and (best is None or value < best[1]):
            best = (r, value)
    return best or (None, None)


def margin(noise=None, override=None):
    """(margin, how it was chosen)."""
    if override is not None:
        return override, "fixed by --margin"
    if noise and noise.get("std") is not None:
        m = max(NOISE_MULT * noise["std"], MARGIN_FLOOR)
        return m, f"max({NOISE_MULT:g} x noise std {noise['std']:.4f}, {MARGIN_FLOOR:g})"
    return DEFAULT_MARGIN, f"default {DEFAULT_MARGIN:g}; run `autoresearch noise` to measure it"


def judge(val, best, m, simpler=False):
    """First look at one run: ('keep' | 'discard' | 'borderline', reason)."""
    if best is None:
        return "keep", "baseline: first successful run on this branch"
    gain = best - val
    if simpler:
        if gain >= -m:
            return "keep", f"simplification: {val:.6f} is within the margin {m:.4f} of best {best:.6f}"
        return "discard", f"simplification, but {val:.6f} is worse than best {best:.6f} by more than margin {m:.4f}"
    if gain > 2 * m:
        return "keep", f"improved by {gain:.4f} (> 2 x margin {m:.4f})"
    if gain > m:
        return "borderline", f"improved by {gain:.4f}, between margin {m:.4f} and 2 x margin"
    if gain > 0:
        return "discard", f"improved by only {gain:.4f}, within the noise margin {m:.4f}"
    return "discard", f"no improvement: {val:.6f} vs best {best:.6f}"


def first_look(val, best, m, simpler=False, confirm=CONFIRM_SEEDS):
    """judge(), where a borderline result is kept outright if no confirmation seeds are wanted (confirm 0)."""
    verdict, reason = judge(val, best, m, simpler)
    if verdict == "borderline" and confirm <= 0:
        return "keep", reason + "; kept without confirmation (--confirm 0)"
    return verdict, reason


def confirm_bar(m, n):
    return m * math.sqrt((1 + 1 / n) / 2)


def judge_mean(mean, n, best, m):
    """Verdict for a borderline candidate after confirmation with n seeds in all."""
    bar = confirm_bar(m, n)
    gain = best - mean
    if gain > bar:
        return "keep", f"confirmed: mean of {n} seeds {mean:.6f} improves by {gain:.4f} (> {bar:.4f})"
    return "discard", f"not confirmed: mean of {n} seeds {mean:.6f} improves by {gain:.4f} (<= {bar:.4f})"


def decide(outcomes, best, m, simpler=False, confirm=CONFIRM_SEEDS):
    """The keep decision for one candidate from its runs so far: `outcomes` is [(seed, val_bpb or the reason the run
    failed)], the first run first, then its confirmation seeds in order. Returns (verdict, reason, values, more):
    verdict keep | discard | crash | confirm (borderline: `more` confirmation seeds still to run), and the valid
    values the verdict rests on."""
    _, first = outcomes[0]
    if isinstance(first, str):
        return "crash", first, [], 0
    verdict, reason = first_look(first, best, m, simpler, confirm)
    if verdict != "borderline":
        return verdict, reason, [first], 0
    values = [first]
    for seed, outcome in outcomes[1:1 + confirm]:
        if isinstance(outcome, str):
            return "crash", f"confirmation seed {seed}: {outcome}", values, 0
        values.append(outcome)
    if len(values) < 1 + confirm:
        return "confirm", reason, values, 1 + confirm - len(values)
    return (*judge_mean(statistics.fmean(values), len(values), best, m), values, 0)


def noise_estimate(values):
    """Sample standard deviation of val_bpb over repeated runs of one train.py (needs at least 2)."""
    return statistics.stdev(values) if len(values) >= 2 else None
