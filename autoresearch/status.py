"""
`autoresearch status`: where the branch stands, from the ledger alone (read-only, needs no lock).
"""

import json
import math
import os
import time
from datetime import datetime

from autoresearch import gate, gitops, ledger
from autoresearch.gitops import short

LAST_RUNS = 10
CRASH_HINT_AFTER = 3


def _time(iso):
    try:
        return datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except (TypeError, ValueError):
        return None


def summarize(records, noise=None, in_history=lambda commit: True):
    """The numbers status prints, as a dict (tests and other tools use it too)."""
    exps = gate.experiments(records)
    done = [r for r in exps if r["verdict"] != "interrupted"]
    kept = gate.kept(records, in_history)
    best_rec, best = gate.best_kept(records, in_history)
    baseline = kept[0] if kept else None
    tried = [r for r in done if r is not baseline]  # the baseline is a measurement, not an idea
    keeps = [r for r in tried if r["verdict"] == "keep"]
    crashes_in_row = 0
    for r in reversed(done):
        if r["verdict"] != "crash":
            break
        crashes_in_row += 1
    times = [(_time(r.get("start_time")), r.get("harness_seconds") or r.get("wall_seconds") or 0) for r in exps]
    times = [(t, d) for t, d in times if t is not None]
    hours = (max(t + d for t, d in times) - min(t for t, _ in times)) / 3600 if times else 0.0
    overheads = [r["overhead_seconds"] for r in exps if isinstance(r.get("overhead_seconds"), (int, float))]
    return {
        "experiments": len(done), "interrupted": len(exps) - len(done),
        "kept": sum(r["verdict"] == "keep" for r in done), "discarded": sum(r["verdict"] == "discard" for r in done),
        "crashed": sum(r["verdict"] == "crash" for r in done),
        "keep_rate": len(keeps) / len(tried) if tried else None,
        "hours": hours, "per_hour": len(done) / hours if hours > 0 else None,
        "best": best, "best_record": best_rec,
        "baseline": gate.reference_value(records, baseline["content_hash"]) if baseline else None,
        "baseline_record": baseline, "crashes_in_row": crashes_in_row,
        "noise_std": (noise or {}).get("std"), "margin": gate.margin(noise)[0],
        "overhead_mean": sum(overheads) / len(overheads) if overheads else None,
        "last": exps,
    }


def _fmt(v, spec=".6f"):
    return format(v, spec) if isinstance(v, (int, float)) and math.isfinite(v) else "-"


def render(root, branch, n_last=LAST_RUNS):
    records = gate.branch_records(ledger.read_ledger(root), branch)
    noise = ledger.read_noise(root, branch)
    in_history = (lambda c: gitops.is_ancestor(root, c, "HEAD")) if gitops.head(root) else (lambda c: True)
    s = summarize(records, noise, in_history)
    out = [f"branch:          {branch}"]
    if not s["last"]:
        others = sorted({r.get("branch") for r in ledger.read_ledger(root)} - {branch, None})
        out.append("no experiments on this branch yet: run the baseline with `autoresearch run -m baseline`.")
        if others:
            out.append("branches with experiments: " + ", ".join(others))
        from autoresearch import agent
        return "\n".join(out + agent.status_lines(root))
    b, base = s["best_record"], s["baseline_record"]
    if b:
        gain = f", {s['baseline'] - s['best']:+.4f} vs baseline" if s["baseline"] is not None else ""
        out.append(f"best:            {_fmt(s['best'])}  {short(b['commit'])}  {b['description']!r}{gain}")
        out.append(f"baseline:        {_fmt(s['baseline'])}  {short(base['commit'])}")
    else:
        out.append("best:            - (no successful baseline yet)")
    if s["noise_std"] is not None:
        out.append(f"noise:           std {s['noise_std']:.4f} -> keep margin {s['margin']:.4f}")
    else:
        out.append(f"noise:           not measured -> default keep margin {s['margin']:.4f} "
                   "(run `autoresearch noise` after the baseline)")
    rate = f"{s['keep_rate']:.0%}" if s["keep_rate"] is not None else "-"
    out.append(f"experiments:     {s['experiments']} ({s['kept']} kept incl. baseline, {s['discarded']} discarded, "
               f"{s['crashed']} crashed" + (f", {s['interrupted']} interrupted" if s["interrupted"] else "") + ")")
    out.append(f"keep rate:       {rate} of ideas after the baseline")
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
    out += parallel_lines(root)
    from autoresearch import agent
    out += agent.status_lines(root)
    out.append(f"last {min(n_last, len(s['last']))} experiments:")
    out.append(f"  {'#':>4}  {'commit':7}  {'val_bpb':>9}  {'status':11}  description")
    for r in s["last"][-n_last:]:
        val = r.get("val_bpb_mean") if r.get("val_bpb_mean") is not None else r.get("val_bpb")
        val = _fmt(val) if r["verdict"] in ("keep", "discard") else "-"
        out.append(f"  {r.get('exp', ''):>4}  {short(r['commit']):7}  {val:>9}  {r['verdict']:11}  {r['description']}")
    return "\n".join(out)


def parallel_lines(root):
    """Parallel mode: the queue, and what each worker of the coordinator runs (from serve.json)."""
    from autoresearch import candidates, serve  # parallel mode only
    q = candidates.Queue(root)
    if not q.candidates:
        return []
    pending = q.pending(candidates.finished_ids(ledger.read_ledger(root)))
    waiting = [c for c in pending if not c["running"]]
    out = [f"queue:           {len(waiting)} waiting, {len(pending) - len(waiting)} running"]
    out += [f"  waiting  {c['id']:>5}  {short(c['commit'])}  {c['description']}" for c in waiting]
    from autoresearch.parallel import is_serve, serve_info
    try:
        with open(os.path.join(root, ledger.STATE_DIR, serve.SERVE_FILE)) as f:
            state = json.load(f)
        if not is_serve(serve_info(root)):
            raise OSError("serve.json left behind by a coordinator that was killed")
    except (OSError, ValueError, KeyError):
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
