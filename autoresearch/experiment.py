"""
One experiment, start to finish: check, commit train.py, run, judge, record, revert if not kept.
And `noise`: the same commit N times with different seeds.

Order of writes after a run: git first, then the ledger, then results.tsv. A harness killed in between leaves
git at a consistent state and at worst loses that run's record; the candidate is never half-reverted.
"""

import signal
import statistics
import time
from dataclasses import dataclass

from autoresearch import gate, gitops, ledger, runner
from autoresearch.gitops import Refusal, short
from autoresearch.lock import RepoLock

EXIT_OK, EXIT_CRASH, EXIT_REFUSED = 0, 1, 2
EXIT_SIGNAL = {"SIGINT": 130, "SIGTERM": 143}
DEFAULT_SEED = 42
NOISE_RUNS = 3


@dataclass
class Options:
    description: str = ""
    seed: int = DEFAULT_SEED
    budget: float = runner.DEFAULT_BUDGET
    timeout: float = None        # None: runner.default_timeout(budget)
    confirm: int = gate.CONFIRM_SEEDS
    rerun: bool = False
    simpler: bool = False
    margin: float = None         # None: from the noise estimate
    runs: int = NOISE_RUNS       # noise only

    def hard_timeout(self):
        return self.timeout if self.timeout is not None else runner.default_timeout(self.budget)


class StopSignals:
    """Ctrl-C and SIGTERM become a flag: the run loop stops train.py in order, and the bookkeeping after it
    can't be cut in half by a second Ctrl-C."""

    def __init__(self):
        self.name = None

    def __enter__(self):
        self.saved = {s: signal.signal(s, self.handler) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handler(self, signum, frame):
        self.name = self.name or signal.Signals(signum).name

    def __call__(self):
        return self.name

    def __exit__(self, *exc):
        for s, h in self.saved.items():
            signal.signal(s, h)


def say(*lines):
    for line in lines:
        print(line, flush=True)


def now_iso():
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


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


def show_failure(result):
    say(f"--- last lines of {runner.LOG_FILE} ---", *result.tail, "---")


# ---------------------------------------------------------------------------
# autoresearch run

def run_experiment(opts):
    t0 = time.monotonic()
    with Session(f"run: {opts.description}", allow_train_changes=True) as s:
        root = s.root
        best_rec, best = gate.best_kept(s.records, s.in_history)
        kept_list = gate.kept(s.records, s.in_history)
        kept_commit = kept_list[-1]["commit"] if kept_list else None
        m, m_how = gate.margin(s.noise, opts.margin)

        chash = gitops.content_hash(root)
        earlier = [r for r in gate.experiments(s.records) if r["content_hash"] == chash
                   and r["verdict"] != "interrupted"]
        if earlier and not opts.rerun:
            e = earlier[-1]
            val = f"val_bpb {e['val_bpb']:.6f}, " if isinstance(e.get("val_bpb"), float) else ""
            raise Refusal(f"this exact train.py was already run: commit {short(e['commit'])} ({val}{e['verdict']}: "
                          f"{e['description']!r}).\n  Edit train.py to try something new, or pass --rerun to run it "
                          "again on purpose.")

        base = gitops.head(root)
        committed = gitops.train_changed(root)
        candidate = gitops.commit_train(root, opts.description) if committed else base
        exp_id = len(gate.experiments(s.records)) + 1
        say(f"experiment #{exp_id} on {s.branch}: commit {short(candidate)} {opts.description!r}",
            f"  best so far: " + (f"{best:.6f} ({short(best_rec['commit'])})" if best_rec else "none (this run is the baseline)")
            + f", margin {m:.4f} [{m_how}], timeout {opts.hard_timeout():.0f} s, log in {runner.LOG_FILE}")

        with StopSignals() as stop:
            started = now_iso()
            result = s.run_once(opts, opts.seed, stop, "train.py")
            failure = result.failure()
            seeds_used, values, confirms = 1, [], []
            if failure:
                verdict, reason = ("interrupted" if result.signal_name else "crash"), failure
            else:
                values.append(result.val_bpb)
                verdict, reason = gate.first_look(result.val_bpb, best, m, opts.simpler, opts.confirm)
            if verdict == "borderline":
                say(f"borderline (val_bpb {result.val_bpb:.6f}): confirming with {opts.confirm} more seed(s)")
                for k in range(1, opts.confirm + 1):
                    seed = opts.seed + k
                    c_started = now_iso()
                    c = s.run_once(opts, seed, stop, f"confirm {k}/{opts.confirm}")
                    c_fail = c.failure()
                    confirms.append(s.record("confirm", opts, c, seed, candidate, chash, c_started,
                                             verdict=("interrupted" if c.signal_name else "crash") if c_fail else "confirm",
                                             reason=c_fail or "confirmation seed", exp=exp_id))
                    if c_fail:
                        verdict = "interrupted" if c.signal_name else "crash"
                        reason = f"confirmation seed {seed}: {c_fail}"
                        result = c if c.signal_name else result
                        break
                    values.append(c.val_bpb)
                else:
                    seeds_used = len(values)
                    verdict, reason = gate.judge_mean(statistics.fmean(values), seeds_used, best, m)

            # git first: a kept candidate stays; anything else gives train.py back to the kept commit
            git_action = "kept" if verdict == "keep" else "none"
            if verdict == "interrupted":
                git_action = "train.py left as it was"
                if committed and gitops.undo_commit(root, candidate, base):
                    git_action = "candidate commit undone, your edited train.py left in the working tree"
            elif verdict in ("discard", "crash") and kept_commit:
                git_action = gitops.revert_train(root, kept_commit, f"autoresearch: revert train.py to {short(kept_commit)}")

            rec = s.record("run", opts, result, opts.seed, candidate, chash, started, exp=exp_id,
                           verdict=verdict, reason=reason, kept_commit=kept_commit, best_before=best, margin=m,
                           margin_how=m_how, noise_std=(s.noise or {}).get("std"), seeds_used=seeds_used,
                           val_bpb_mean=statistics.fmean(values) if values else None, git=git_action,
                           simpler=opts.simpler, rerun=opts.rerun)
            child = result.child_seconds + sum(c["wall_seconds"] for c in confirms)
            rec["harness_seconds"] = round(time.monotonic() - t0, 3)
            rec["overhead_seconds"] = round(rec["harness_seconds"] - child, 3)
            for c in confirms:
                ledger.append_record(root, c)
            ledger.append_record(root, rec)
            ledger.append_result(root, rec)

        report_verdict(rec, best, best_rec, result, kept_commit)
        if verdict == "interrupted":
            return EXIT_SIGNAL.get(stop.name, 130)
        return EXIT_CRASH if verdict == "crash" else EXIT_OK


def report_verdict(rec, best, best_rec, result, kept_commit):
    verdict = rec["verdict"]
    if verdict in ("crash", "interrupted"):
        show_failure(result)
    val = rec["val_bpb_mean"] if rec.get("val_bpb_mean") is not None else rec.get("val_bpb")
    where = {"keep": f"{short(rec['commit'])} is the new kept commit",
             "discard": f"train.py reverted to kept commit {short(kept_commit)}",
             "crash": (f"train.py reverted to kept commit {short(kept_commit)}" if kept_commit else
                       f"baseline crashed; train.py left as committed in {short(rec['commit'])}, fix it and run again"),
             "interrupted": f"{rec['git']}; run it again when ready"}[verdict]
    lines = ["---", f"verdict:      {verdict}", f"reason:       {rec['reason']}",
             f"val_bpb:      {val:.6f}" if isinstance(val, float) else "val_bpb:      -",
             f"best_before:  {best:.6f} ({short(best_rec['commit'])})" if best_rec else "best_before:  - (baseline)",
             f"commit:       {short(rec['commit'])} ({where})",
             f"wall_seconds: {rec['harness_seconds']:.1f} (harness overhead {rec['overhead_seconds']:.2f})"]
    say(*lines)


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
                    show_failure(result)
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
