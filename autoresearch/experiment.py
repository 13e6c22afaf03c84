"""
One experiment, start to finish: check, commit train.py, run, judge, record, revert if not kept.
And `noise`: the same commit N times with different seeds.

The keep decision (gate.decide: first look, confirmation seeds if borderline, their mean), the experiment's
record and its printed verdict are built here once, by `Judgement` and `verdict_lines`, for both `autoresearch
run` and the parallel coordinator (serve.py), which only differ in how the runs are scheduled.

Order of writes after a run: git first, then the ledger, then results.tsv. A harness killed in between leaves
git at a consistent state and at worst loses that run's record; the candidate is never half-reverted.
"""

import os
import statistics
import time

from autoresearch import gate, gitops, ledger, runner
from autoresearch.common import (EXIT_CRASH, EXIT_OK, EXIT_SIGNAL, Refusal, StopSignals, now_iso, say,
                                 short)
from autoresearch.lock import RepoLock


class Session:
    """What every command checks first: repository, branch, clean tree, readable state files, the lock."""

    def __init__(self, what, allow_train_changes):
        self.root = gitops.repo_root()
        self.lock = RepoLock(self.root, what)
        self.allow_train_changes = allow_train_changes

    def __enter__(self):
        self.lock.__enter__()
        try:
            self.branch = gitops.check_branch(self.root)
            gitops.check_clean(self.root, allow_train=self.allow_train_changes)
            self.ledger = ledger.read_ledger(self.root)
            ledger.read_results(self.root)  # refuse now rather than append to a damaged file later
            self.records = gate.branch_records(self.ledger, self.branch)
            self.noise = ledger.read_noise(self.root, self.branch)
        except BaseException:
            self.lock.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        self.lock.__exit__(*exc)

    def in_history(self, commit):
        return gitops.is_ancestor(self.root, commit, "HEAD")

    def run_once(self, opts, seed, stop, label):
        def on_start(pid):
            self.lock.note(child_pid=pid)
        return runner.run_train(self.root, seed, opts.budget, opts.hard_timeout(), stop, label=label,
                                pass_fds=(self.lock.fd,), on_start=on_start)

    def record(self, kind, opts, result, seed, commit, content_hash, started, **extra):
        return make_record(kind, self.branch, opts, result, seed, commit, content_hash, started, **extra)


def make_record(kind, branch, opts, result, seed, commit, content_hash, started, hardware=None, **extra):
    """One ledger record of one train.py process (`hardware`: where it ran, if not on this machine)."""
    rec = {"kind": kind, "branch": branch, "commit": commit, "content_hash": content_hash, "seed": seed,
           "description": opts.description, "start_time": started, "wall_seconds": round(result.child_seconds, 3),
           "budget": opts.budget, "timeout": opts.hard_timeout(), "returncode": result.returncode,
           "timed_out": result.timed_out, "metrics": result.summary, "val_bpb": result.val_bpb,
           "hardware": hardware or runner.hardware()}
    rec.update(extra)
    return rec


def outcome(result):
    """A run as the gate sees it: its val_bpb, or why it is not a valid result."""
    return result.failure() or result.val_bpb


class Judgement:
    """What a candidate is judged against, read once before its verdict: the best kept result, the last kept commit
    and the margin. Shared by `autoresearch run` and the parallel coordinator."""

    def __init__(self, records, noise, opts, in_history):
        self.records, self.opts, self.noise = records, opts, noise
        self.best_rec, self.best = gate.best_kept(records, in_history)
        kept = gate.kept(records, in_history)
        self.kept_commit = kept[-1]["commit"] if kept else None
        self.margin, self.margin_how = gate.margin(noise, opts.margin)
        self.exp_id = len(gate.experiments(records)) + 1

    def decide(self, outcomes):
        """gate.decide() with this candidate's options: (verdict, reason, values, more)."""
        return gate.decide(outcomes, self.best, self.margin, self.opts.simpler, self.opts.confirm)

    def confirm_seeds(self):
        return [self.opts.seed + k for k in range(1, self.opts.confirm + 1)]

    def record(self, branch, result, commit, content_hash, started, verdict, reason, values, git_action,
               hardware=None, **extra):
        """The experiment's ledger record (kind "run"): the first run's result, the verdict and what it rests on."""
        return make_record(
            "run", branch, self.opts, result, self.opts.seed, commit, content_hash, started, hardware=hardware,
            exp=self.exp_id, verdict=verdict, reason=reason, kept_commit=self.kept_commit, best_before=self.best,
            best_commit=self.best_rec["commit"] if self.best_rec else None, margin=self.margin,
            margin_how=self.margin_how, noise_std=(self.noise or {}).get("std"), seeds_used=len(values) or 1,
            val_bpb_mean=statistics.fmean(values) if values else None, git=git_action, simpler=self.opts.simpler,
            rerun=self.opts.rerun, **extra)


def refuse_if_already_run(records, content_hash, queued=None):
    """One refusal for a train.py that was already run (or, in parallel mode, is queued)."""
    earlier = gate.already_run(records, content_hash)
    if not earlier and not queued:
        return
    if queued:
        what = f"candidate {queued[0]['id']} ({queued[0]['description']!r}) is queued"
    else:
        e = earlier[-1]
        val = f"val_bpb {e['val_bpb']:.6f}, " if isinstance(e.get("val_bpb"), float) else ""
        what = f"commit {short(e['commit'])} ran it ({val}{e['verdict']}: {e['description']!r})"
    raise Refusal(f"this exact train.py was already run or queued: {what}.\n"
                  "  Edit train.py to try something new, or pass --rerun to run it again on purpose.")


def verdict_lines(rec, tail=(), log_name=runner.LOG_FILE, root=None):
    """The verdict block, as `run` and `wait` print it: the log tail of a failed run first."""
    lines = [f"--- last lines of {log_name} ---", *tail, "---"] if tail else []
    val = gate.run_value(rec)
    seeds = f" (mean of {rec['seeds_used']} seeds)" if rec.get("seeds_used", 1) > 1 else ""
    best = rec.get("best_before")
    hw = rec.get("hardware") or {}
    where = f"ran on {hw.get('host', '?')} {hw.get('gpu') or ''}".rstrip()
    if rec.get("log"):
        where += f"; log {os.path.relpath(rec['log'], root) if root else rec['log']}"
    lines += [f"--- {rec['candidate']}: {rec['description']!r}" if rec.get("candidate") else "---",
              f"verdict:      {rec['verdict']}", f"reason:       {rec['reason']}",
              f"val_bpb:      {val:.6f}{seeds}" if isinstance(val, float) and rec["verdict"] in ("keep", "discard")
              else "val_bpb:      -",
              f"best_before:  {best:.6f} ({short(rec.get('best_commit'))})" if isinstance(best, float)
              else "best_before:  - (baseline)",
              f"commit:       {short(rec['commit'])} ({rec['git']})",
              f"wall_seconds: {rec['harness_seconds']:.1f} (harness overhead {rec['overhead_seconds']:.2f}); {where}"]
    return lines


# ---------------------------------------------------------------------------
# autoresearch run

def run_experiment(opts):
    t0 = time.monotonic()
    with Session(f"run: {opts.description}", allow_train_changes=True) as s:
        root = s.root
        j = Judgement(s.records, s.noise, opts, s.in_history)
        chash = gitops.content_hash(root)
        if not opts.rerun:
            refuse_if_already_run(s.records, chash)

        base = gitops.head(root)
        committed = gitops.train_changed(root)
        candidate = gitops.commit_train(root, opts.description) if committed else base
        say(f"experiment #{j.exp_id} on {s.branch}: commit {short(candidate)} {opts.description!r}",
            "  best so far: " + (f"{j.best:.6f} ({short(j.best_rec['commit'])})" if j.best_rec
                                 else "none (this run is the baseline)")
            + f", margin {j.margin:.4f} [{j.margin_how}], timeout {opts.hard_timeout():.0f} s, log in {runner.LOG_FILE}")

        with StopSignals() as stop:
            started = now_iso()
            result = s.run_once(opts, opts.seed, stop, "train.py")
            outcomes, confirms = [(opts.seed, outcome(result))], []
            verdict, reason, values, more = j.decide(outcomes)
            if verdict == "confirm":
                say(f"borderline (val_bpb {result.val_bpb:.6f}): confirming with {opts.confirm} more seed(s)")
            for k, seed in enumerate(j.confirm_seeds(), 1):
                if verdict != "confirm" or result.signal_name:
                    break
                c_started = now_iso()
                c = s.run_once(opts, seed, stop, f"confirm {k}/{opts.confirm}")
                c_fail = c.failure()
                confirms.append(s.record("confirm", opts, c, seed, candidate, chash, c_started,
                                         verdict=("interrupted" if c.signal_name else "crash") if c_fail else "confirm",
                                         reason=c_fail or "confirmation seed", exp=j.exp_id))
                outcomes.append((seed, outcome(c)))
                verdict, reason, values, more = j.decide(outcomes)
                if c.signal_name:
                    result = c  # the interrupted run is the one to show
            if result.signal_name:
                verdict = "interrupted"

            # git first: a kept candidate stays; anything else gives train.py back to the kept commit
            git_action = f"{short(candidate)} is the new kept commit" if verdict == "keep" else "train.py left as it was"
            if verdict == "interrupted":
                if committed and gitops.undo_commit(root, candidate, base):
                    git_action = "candidate commit undone, your edited train.py left in the working tree"
                git_action += "; run it again when ready"
            elif verdict in ("discard", "crash") and j.kept_commit:
                how = gitops.revert_train(root, j.kept_commit, f"autoresearch: revert train.py to {short(j.kept_commit)}")
                git_action = f"train.py reverted to kept commit {short(j.kept_commit)} ({how})"
            elif verdict == "crash":
                git_action = (f"baseline crashed; train.py left as committed in {short(candidate)}, "
                              "fix it and run again")

            rec = j.record(s.branch, result, candidate, chash, started, verdict, reason, values, git_action)
            child = result.child_seconds + sum(c["wall_seconds"] for c in confirms)
            rec["harness_seconds"] = round(time.monotonic() - t0, 3)
            rec["overhead_seconds"] = round(rec["harness_seconds"] - child, 3)
            for c in confirms:
                ledger.append_record(root, c)
            ledger.append_record(root, rec)
            ledger.append_result(root, rec)

        say(*verdict_lines(rec, tail=result.tail if verdict in ("crash", "interrupted") else ()))
        if verdict == "interrupted":
            return EXIT_SIGNAL.get(stop.name, 130)
        return EXIT_CRASH if verdict == "crash" else EXIT_OK


# ---------------------------------------------------------------------------
# autoresearch noise

def run_noise(opts):
    with Session(f"noise x{opts.runs}", allow_train_changes=False) as s:
        root = s.root
        if gitops.train_changed(root):
            raise Refusal("train.py has uncommitted changes; noise is measured on a committed train.py. "
                          "Run the change as an experiment first (autoresearch run -m ...), or revert it.")
        commit, chash = gitops.head(root), gitops.content_hash(root)
        seeds = [opts.seed + k for k in range(1, opts.runs + 1)]
        say(f"noise: running {short(commit)} {opts.runs} times (seeds {', '.join(map(str, seeds))}), "
            f"timeout {opts.hard_timeout():.0f} s each")
        with StopSignals() as stop:
            for k, seed in enumerate(seeds, 1):
                started = now_iso()
                result = s.run_once(opts, seed, stop, f"noise {k}/{opts.runs}")
                failure = result.failure()
                verdict = ("interrupted" if result.signal_name else "crash") if failure else "noise"
                ledger.append_record(root, s.record("noise", opts, result, seed, commit, chash, started,
                                                    verdict=verdict, reason=failure or "noise run"))
                if failure:
                    say(f"--- last lines of {runner.LOG_FILE} ---", *result.tail, "---")
                    say(f"noise run {k} failed: {failure}. No noise estimate written.")
                    return EXIT_SIGNAL.get(stop.name, 130) if result.signal_name else EXIT_CRASH
                say(f"  seed {seed}: val_bpb {result.val_bpb:.6f} ({result.child_seconds:.0f} s)")

        # every valid run of this exact train.py counts, one per seed (the experiment's own run included)
        records = gate.branch_records(ledger.read_ledger(root), s.branch)
        by_seed = {r["seed"]: r["val_bpb"] for r in records if r.get("content_hash") == chash and gate.valid_value(r)}
        values = list(by_seed.values())
        std = gate.noise_estimate(values)
        if std is None:
            say("only one valid run of this train.py so far: run noise with -n 2 or more.")
            return EXIT_CRASH
        estimate = {"commit": commit, "content_hash": chash, "seeds": list(by_seed), "val_bpb": values,
                    "mean": statistics.fmean(values), "std": std, "time": now_iso(), "budget": opts.budget,
                    "hardware": runner.hardware()}
        ledger.write_noise(root, s.branch, estimate)
        m, how = gate.margin(estimate)
        say("---", f"noise_std:    {std:.6f} over {len(values)} runs", f"mean:         {estimate['mean']:.6f}",
            f"range:        {min(values):.6f} .. {max(values):.6f}", f"margin:       {m:.6f} ({how})")
        return EXIT_OK
