"""
`autoresearch status`: where the branch stands, from the ledger alone (read-only, needs no lock).
"""

import math
import time
from datetime import datetime

from autoresearch import candidates, gate, gitops, ledger
from autoresearch.common import short
from autoresearch.lock import holder_info, is_serve

LAST_RUNS = 10
CRASH_HINT_AFTER = 3


def _time(iso):
    try:
        return datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except (TypeError, ValueError):
        return None


def summarize(records, noise=None, in_history=lambda commit: True):
    """The numbers status prints, as a dict (tests and other tools use it too). The same numbers as the gate,
    results.tsv and the plot: pooled means (gate.pool) and the ledger's experiment numbers."""
    exps = gate.experiments(records)
    done = [r for r in exps if r["verdict"] != "interrupted"]
    kept = gate.kept(records, in_history)
    best_rec, best = gate.best_kept(records, in_history)
    baseline = kept[0] if kept else None
    tried = [r for r in done if r is not baseline]
    keeps = [r for r in tried if r["verdict"] == "keep"]
    times = [(_time(r.get("start_time")), r.get("harness_seconds") or r.get("wall_seconds") or 0) for r in exps]
    times = [(t, d) for t, d in times if t is not None]
    hours = (max(t + d for t, d in times) - min(t for t, _ in times)) / 3600 if times else 0.0
    overheads = [r["overhead_seconds"] for r in exps if isinstance(r.get("overhead_seconds"), (int, float))]
    counts = {v: sum(r["verdict"] == v for r in exps) for v in ("keep", "discard", "crash", "interrupted")}
    # the latest remeasurement of the commit the branch stands on, if it no longer clears its bar
    current = kept[-1] if kept else None
    again = [r for r in gate.verdicts(records) if r.get("remeasure") and current
             and r.get("content_hash") == current["content_hash"] and r["verdict"] == "remeasure"]
    return {
        "experiments": len(exps), "interrupted": counts["interrupted"],
        "kept": counts["keep"], "discarded": counts["discard"], "crashed": counts["crash"],
        "left": sum(r["verdict"] == "keep" and not in_history(r["commit"]) for r in exps),
        "keep_rate": len(keeps) / len(tried) if tried else None,
        "hours": hours, "per_hour": len(done) / hours if hours > 0 else None,
        "best": best, "best_record": best_rec,
        "best_runs": len(gate.pool(records, best_rec["content_hash"])) if best_rec else 0,
        "baseline": gate.reference_value(records, baseline["content_hash"]) if baseline else None,
        "baseline_runs": len(gate.pool(records, baseline["content_hash"])) if baseline else 0,
        "baseline_record": baseline, "crashes_in_row": gate.crashes_in_row(records),
        "noise_std": (noise or {}).get("std"), "noise_tok_per_sec": (noise or {}).get("tok_per_sec"),
        "margin": gate.margin(noise)[0], "overhead_mean": sum(overheads) / len(overheads) if overheads else None,
        "last": exps, "remeasured": sum(bool(r.get("remeasure")) for r in gate.verdicts(records)),
        "fails_bar": again[-1] if again and again[-1].get("fails_bar") else None,
        "head_record": current, "head": gate.reference_value(records, current["content_hash"]) if current else None,
        "head_runs": len(gate.pool(records, current["content_hash"])) if current else 0,
    }


def _fmt(v, spec=".6f"):
    return format(v, spec) if isinstance(v, (int, float)) and math.isfinite(v) else "-"


def _runs(n):
    return f"mean of {n} run{'s' if n != 1 else ''}"


def render(root, branch, n_last=LAST_RUNS):
    records = gate.branch_records(ledger.read_ledger(root), branch)
    noise = ledger.read_noise(root, branch)
    in_history = gitops.history(root)
    s = summarize(records, noise, in_history)
    out = [f"branch:          {branch}"]
    skipped = skipped_line(records)
    if not s["last"]:
        others = sorted({r.get("branch") for r in ledger.read_ledger(root)} - {branch, None})
        out.append("no experiments on this branch yet: run the baseline with `autoresearch run -m baseline`.")
        if others:
            out.append("branches with experiments: " + ", ".join(others))
        out += skipped
        from autoresearch import agent
        return "\n".join(out + agent.status_lines(root))
    b, base = s["best_record"], s["baseline_record"]
    if b:
        out.append(f"best:            {_fmt(s['best'])} ({_runs(s['best_runs'])})  {short(b['commit'])}  "
                   f"{b['description']!r}")
        out.append(f"baseline:        {_fmt(s['baseline'])} ({_runs(s['baseline_runs'])})  {short(base['commit'])}")
        head = s["head_record"]
        if head and head["commit"] != b["commit"]:  # a --simpler keep, slightly worse than the best, is the base
            out.append(f"branch stands on: {_fmt(s['head'])} ({_runs(s['head_runs'])})  {short(head['commit'])}  "
                       f"{head['description']!r}: the last kept commit, where the next experiment starts")
        gain = s["baseline"] - s["best"]
        out.append("improvement:     " + (f"best is {gain:.4f} below the baseline (val_bpb: lower is better)"
                                          if gain > 0 else "none yet: the best is still the baseline"))
    else:
        out.append("best:            - (no successful baseline yet)")
    if s["noise_std"] is not None:
        speed = f", noise runs at {s['noise_tok_per_sec']:,.0f} tok/s" if s["noise_tok_per_sec"] else ""
        out.append(f"noise:           std {s['noise_std']:.4f} -> keep margin {s['margin']:.4f}{speed}")
    else:
        out.append(f"noise:           not measured -> default keep margin {s['margin']:.4f} "
                   "(run `autoresearch noise` after the baseline)")
    rate = f"{s['keep_rate']:.0%}" if s["keep_rate"] is not None else "-"
    left = f"; {s['left']} since left by a git reset" if s["left"] else ""
    out.append(f"experiments:     {s['experiments']} = {s['kept']} kept (baseline included{left}) + {s['discarded']} "
               f"discarded + {s['crashed']} crashed + {s['interrupted']} interrupted")
    out += skipped
    if s["remeasured"]:
        out.append(f"remeasured:      {s['remeasured']} rerun(s) of kept commits (--rerun): runs in their pools, "
                   "not experiments")
    fail = s["fails_bar"]
    if fail:
        better = fail["fails_bar"]["better_commit"]
        out.append(f"warning:         {short(fail['commit'])}, where the branch stands, no longer clears the bar it was "
                   f"kept on ({short(better)} is better, by its last --rerun): to go back, {fail['fails_bar']['command']}")
    out.append(f"keep rate:       {rate} of finished ideas after the baseline")
    per_hour = f"{s['per_hour']:.1f}" if s["per_hour"] else "-"
    out.append(f"pace:            {per_hour} experiments/hour over {s['hours']:.1f} h"
               + (f", harness overhead {s['overhead_mean']:.2f} s/experiment" if s["overhead_mean"] is not None else ""))
    out.append(f"crashes in row:  {s['crashes_in_row']}")
    if s["crashes_in_row"] >= CRASH_HINT_AFTER:
        out.append(f"  hint: {s['crashes_in_row']} crashes in a row. Read run.log before the next edit. Fix a typo or "
                   "shape bug and re-run, but if the idea itself keeps failing (out of memory, NaN, too slow), "
                   "drop it and try something different; train.py is back at the kept commit.")
    if gitops.head(root) and gitops.train_changed(root):
        out.append("train.py:        modified, not yet run")
    unrecorded = ledger.unrecorded_head(root, branch, records) if branch == gitops.current_branch(root) else None
    if unrecorded:
        out.append(f"warning:         HEAD is the candidate commit of {ledger.candidate_name(unrecorded)}, never "
                   "recorded (the harness was killed during its run): the next `autoresearch run` undoes it and "
                   "leaves its train.py to run again")
    out += parallel_lines(root)
    from autoresearch import agent
    out += agent.status_lines(root)
    out.append(f"last {min(n_last, len(s['last']))} experiments (val_bpb: the pooled mean, as in results.tsv):")
    out.append(f"  {'#':>4}  {'commit':7}  {'val_bpb':>9}  {'runs':>4}  {'steps':>5}  {'tok/s':>9}  {'status':11}  "
               "description")
    for r in s["last"][-n_last:]:
        ok = r["verdict"] in ("keep", "discard")
        val = _fmt(gate.shown_value(records, r)) if ok else "-"
        n = (len(gate.pool(records, r["content_hash"])) if r["verdict"] == "keep" else r.get("seeds_used", 1)) if ok else ""
        tps = f"{r['tok_per_sec']:,.0f}" if r.get("tok_per_sec") else "-"
        steps = r.get("steps") if r.get("steps") is not None else "-"
        out.append(f"  {r.get('exp', ''):>4}  {short(r['commit']):7}  {val:>9}  {n:>4}  {steps:>5}  {tps:>9}  "
                   f"{r['verdict']:11}  {r['description']}")
        out += [f"        warning: {w}" for w in r.get("warnings") or ()]
    return "\n".join(out)


def skipped_line(records):
    """The run records every count leaves out for want of a known verdict, named so they can be fixed by hand."""
    bad = gate.unjudged(records)
    if not bad:
        return []
    commits = ", ".join(str(r.get("commit") or "-")[:7] for r in bad[:5]) + (", ..." if len(bad) > 5 else "")
    return [f"skipped:         {len(bad)} run record(s) in {ledger.STATE_DIR}/{ledger.LEDGER_FILE} with no known "
            f"verdict (commit {commits}): not counted or shown"]


def parallel_lines(root):
    """Parallel mode: the queue, and what each worker of the coordinator runs (from serve.json)."""
    q = candidates.Queue(root)
    if not q.candidates:
        return []
    pending = q.pending(candidates.finished_ids(ledger.read_ledger(root)))
    waiting = [c for c in pending if not c["running"]]
    out = [f"queue:           {len(waiting)} waiting, {len(pending) - len(waiting)} running"]
    out += [f"  waiting  {c['id']:>5}  {short(c['commit'])}  {c['description']}" for c in waiting]
    state = candidates.read_serve_state(root)
    if state is None or not is_serve(holder_info(root)):  # none, or left behind by a coordinator that was killed
        if pending:
            out.append("workers:         none (no coordinator running: `autoresearch wait` resumes the queue)")
        return out
    out.append(f"workers:         {len(state['workers'])} (serve pid {state['pid']}, "
               f"cluster {state.get('address') or 'local'}, since {state['since']})")
    for w in state["workers"]:
        where = f"{w.get('node', '?')} " + (f"GPU {','.join(w['gpus'])}" if w.get("gpus") else "CPU")
        job = w.get("job")
        doing = (f"running {job['id']} seed {job['seed']} for {time.time() - (_time(job['since']) or time.time()):.0f} s: "
                 f"{q.candidates[job['id']]['description']}" if job else w.get("state", "idle"))
        out.append(f"  worker {w['index']}  {where:24}  {doing}")
    return out
