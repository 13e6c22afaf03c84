"""
The keep gate: is a candidate's val_bpb better than the best kept result by more than run-to-run noise?

Every number is a mean over a pool: all valid runs of one train.py content (by content hash, one per seed) with
the same settings (budget, corpus, evaluation size, device). Runs of different settings are never compared.

margin  = max(NOISE_MULT * noise_std, MARGIN_FLOOR) once `autoresearch noise` has measured noise_std on this
          branch, DEFAULT_MARGIN before that (or a fixed --margin): the bar for one run against one run.
bar     = margin * sqrt((1/n + 1/n_best) / 2)   for a mean of n runs against a mean of n_best runs (the difference
          of two means has that much less noise than the difference of two single runs)
gain    = best - mean       (best = lowest pooled mean among kept commits still in the branch's history)
keep    if gain > 2 * bar                         clear win
confirm if bar < gain <= 2 * bar                  borderline: CONFIRM_SEEDS more seeds join the pool, and the
                                                  pooled mean must still gain more than the bar for its new n
discard otherwise. With --simpler (a change that removes code) the bar is only "not worse by more than bar".
The first successful run on a branch is the baseline and is always kept. Running a kept train.py again (--rerun)
is a measurement, not an idea: it adds a run to that commit's pool, changes nothing in git, and says whether the
pooled mean still clears the bar the commit was kept on (recheck).
"""

import math
import statistics

from autoresearch.common import CONFIRM_SEEDS

DEFAULT_MARGIN = 0.005   # used until `autoresearch noise` has run: a guess, measure it
NOISE_MULT = 2.0         # two noise standard deviations: a no-op change passes by luck only ~8% of the time
MARGIN_FLOOR = 0.001     # never trust gains below this, however quiet the hardware looks
OK_VERDICTS = ("keep", "discard", "noise", "remeasure")  # runs whose val_bpb is a valid measurement
RUN_VERDICTS = ("keep", "discard", "crash", "interrupted", "remeasure")  # what an experiment record can say
# what must be equal for two runs to be compared: eval_request is AUTORESEARCH_EVAL_TOKENS as set (or "default"),
# known before a run; eval_tokens what the run says it evaluated
# untimed steps are not compared: the harness's clock bounds work before it (runner.judge_clock), and fewer
# untimed steps only move compilation into the budget
SETTINGS = ("budget", "corpus", "eval_request", "eval_tokens", "device", "fixed_files")


def branch_records(ledger, branch):
    return [r for r in ledger if r.get("branch") == branch]


def verdicts(records):
    """Every record with a verdict of its own: the experiments and the remeasurements of kept train.py's. A run
    record without a known verdict (edited by hand, or another tool's) is left out of every view: see unjudged."""
    return [r for r in records if r["kind"] == "run" and r.get("verdict") in RUN_VERDICTS]


def unjudged(records):
    """The run records that verdicts() leaves out, for status and the other views to name."""
    return [r for r in records if r["kind"] == "run" and r.get("verdict") not in RUN_VERDICTS]


def experiments(records):
    """The ideas tried, in order; a --rerun of a kept train.py (`remeasure`) is a measurement, not one of them."""
    return [r for r in verdicts(records) if not r.get("remeasure")]


def crashes_in_row(records):
    """How many of the latest finished experiments crashed, counting back to the last that did not."""
    n = 0
    for r in reversed([r for r in experiments(records) if r["verdict"] != "interrupted"]):
        if r["verdict"] != "crash":
            break
        n += 1
    return n


def valid_value(record):
    v = record.get("val_bpb")
    return (isinstance(v, (int, float)) and math.isfinite(v) and record.get("verdict") in OK_VERDICTS + ("confirm",)
            and record.get("comparable", True))


def run_value(record):
    """The val_bpb an experiment record stands for: the mean of its pool if it has one, else its single run."""
    v = record.get("val_bpb_mean")
    return v if v is not None else record.get("val_bpb")


def already_run(records, content_hash):
    """Earlier experiments of this exact train.py that measured it. Interrupted ones never finished, and a crash
    can be a fluke (a timeout, a lost worker, a full disk): running the same train.py again is not a repeat."""
    return [r for r in experiments(records) if r.get("content_hash") == content_hash
            and r["verdict"] not in ("interrupted", "crash")]


def pool(records, content_hash):
    """Every valid run of this exact train.py (any kind), one value per seed (the latest), in seed order."""
    by_seed = {r.get("seed"): r["val_bpb"] for r in records if r.get("content_hash") == content_hash and valid_value(r)}
    return [by_seed[s] for s in sorted(by_seed, key=lambda s: (s is None, s or 0))]


def reference_value(records, content_hash):
    """Mean val_bpb of the pool of this exact train.py, or None."""
    vals = pool(records, content_hash)
    return statistics.fmean(vals) if vals else None


def shown_value(records, record):
    """The one number every view prints for an experiment: a kept train.py's current pooled mean (later runs of it
    sharpen it), else the mean the verdict rested on."""
    if record.get("verdict") == "keep":
        value = reference_value(records, record.get("content_hash"))
        if value is not None:
            return value
    return run_value(record)


def free_seeds(records, content_hash, start, n):
    """n seeds from `start` up that this train.py has not run with yet, so a pool never counts one seed twice. A
    crashed or interrupted run put nothing in the pool: its seed is still free."""
    used = {r.get("seed") for r in records if r.get("content_hash") == content_hash
            and r.get("verdict") not in ("interrupted", "crash")}
    seeds, s = [], start
    while len(seeds) < n:
        if s not in used:
            seeds.append(s)
        s += 1
    return seeds


def kept(records, in_history=lambda commit: True):
    """Kept experiments whose commit is still in the branch's history, oldest first."""
    return [r for r in experiments(records) if r["verdict"] == "keep" and in_history(r["commit"])]


def best_kept(records, in_history=lambda commit: True):
    """(record, pooled mean) of the best kept commit, or (None, None) before the baseline."""
    best = None
    for r in kept(records, in_history):
        value = reference_value(records, r["content_hash"])
        if value is not None and (best is None or value < best[1]):
            best = (r, value)
    return best or (None, None)


def kept_with(records, content_hash, in_history=lambda commit: True):
    """(the kept experiment of this exact train.py, the kept ones before it), or (None, []) if it was never kept."""
    kept_now = kept(records, in_history)
    for i, r in enumerate(kept_now):
        if r.get("content_hash") == content_hash:
            return r, kept_now[:i]
    return None, []


def settings_differ(a, b):
    """The settings in which two runs differ ('budget 40 vs 20'), skipping any that either does not know."""
    a, b = a or {}, b or {}
    return [f"{k} {a[k]} vs {b[k]}" for k in SETTINGS if a.get(k) is not None and b.get(k) is not None
            and a[k] != b[k]]


def margin(noise=None, override=None):
    """(margin, how it was chosen)."""
    if override is not None:
        return override, "fixed by --margin"
    if noise and noise.get("std") is not None:
        m = max(NOISE_MULT * noise["std"], MARGIN_FLOOR)
        return m, f"max({NOISE_MULT:g} x noise std {noise['std']:.4f}, {MARGIN_FLOOR:g})"
    return DEFAULT_MARGIN, f"default {DEFAULT_MARGIN:g}; run `autoresearch noise` to measure it"


def bar(m, n=1, n_best=1):
    """The margin for a mean of n runs against a mean of n_best runs (m itself for one run against one)."""
    return m * math.sqrt((1 / n + 1 / n_best) / 2)


def judge(val, best, m, simpler=False, n=1, n_best=1):
    """First look at a candidate's pooled mean of n runs: ('keep' | 'discard' | 'borderline', reason)."""
    if best is None:
        return "keep", "baseline: first successful run on this branch"
    b = bar(m, n, n_best)
    vs = (f"mean of {n} run{'s' * (n != 1)} vs the best's {n_best}, bar {b:.4f}" if (n, n_best) != (1, 1)
          else f"margin {m:.4f}")
    gain = best - val
    if simpler:
        if gain > b:  # kept as a simplification, on this one pool: not confirmed as an improvement
            return "keep", (f"simplification, and {gain:.4f} better than best {best:.6f} ({vs}); as a gain it would "
                            f"need confirming: run it again with --rerun")
        if gain >= -b:
            return "keep", f"simplification: {val:.6f} is within the bar of best {best:.6f} ({vs})"
        return "discard", f"simplification, but {val:.6f} is worse than best {best:.6f} by more than the bar ({vs})"
    if gain > 2 * b:
        return "keep", f"improved by {gain:.4f} (> 2 x bar; {vs})"
    if gain > b:
        return "borderline", f"improved by {gain:.4f}, between the bar and 2 x bar ({vs})"
    if gain > 0:
        return "discard", f"improved by only {gain:.4f}, within the noise margin ({vs})"
    return "discard", f"no improvement: {val:.6f} vs best {best:.6f} ({vs})"


def recheck(mean, n, earlier, m, simpler=False):
    """A kept train.py measured again: does its pooled mean of n runs still clear the bar it was kept on? Against
    the best of `earlier` [(commit, pooled mean, runs)], the kept commits before it, by judge's rule: simpler or
    not, the n-dependent bar (a pooled mean needs only the bar, as after confirmation). The baseline has no bar.
    Returns (holds, reason, the better commit or None)."""
    if not earlier:
        return True, "the baseline, kept without a bar", None
    commit, best, n_best = min(earlier, key=lambda e: e[1])
    verdict, why = judge(mean, best, m, simpler, n, n_best)
    return (True, why, None) if verdict != "discard" else (False, why, commit)


def judge_mean(mean, n, best, m, n_best=1):
    """Verdict for a borderline candidate after confirmation, its pool now n runs."""
    b = bar(m, n, n_best)
    gain = best - mean
    if gain > b:
        return "keep", f"confirmed: mean of {n} runs {mean:.6f} improves by {gain:.4f} (> bar {b:.4f})"
    return "discard", f"not confirmed: mean of {n} runs {mean:.6f} improves by {gain:.4f} (<= bar {b:.4f})"


def decide(outcomes, best, m, simpler=False, confirm=CONFIRM_SEEDS, prior=(), n_best=1):
    """The keep decision for one candidate from its runs so far: `outcomes` is [(seed, val_bpb or the reason the run
    failed)], the first run first, then its confirmation seeds in order; `prior` the valid values of earlier runs of
    the same train.py (--rerun), which join its pool. Returns (verdict, reason, values, more): verdict keep |
    discard | crash | confirm (borderline: `more` confirmation seeds still to run), and the pool it rests on."""
    _, first = outcomes[0]
    if isinstance(first, str):
        return "crash", first, [], 0
    values = [*prior, first]
    verdict, reason = judge(statistics.fmean(values), best, m, simpler, len(values), n_best)
    if verdict == "borderline" and confirm <= 0:
        return "keep", reason + "; kept without confirmation (--confirm 0)", values, 0
    if verdict != "borderline":
        return verdict, reason, values, 0
    for seed, outcome in outcomes[1:1 + confirm]:
        if isinstance(outcome, str):
            return "crash", f"confirmation seed {seed}: {outcome}", values, 0
        values.append(outcome)
    missing = 1 + confirm - len(outcomes[:1 + confirm])
    if missing:
        return "confirm", reason, values, missing
    return (*judge_mean(statistics.fmean(values), len(values), best, m, n_best), values, 0)


def noise_estimate(values):
    """Sample standard deviation of val_bpb over repeated runs of one train.py (needs at least 2)."""
    return statistics.stdev(values) if len(values) >= 2 else None
