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

from autoresearch import gate, gitops, ledger, runner, sandbox
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
            undone = ledger.undo_unrecorded_head(self.root, self.branch, self.ledger)  # a harness killed mid-run
            if undone:
                ledger.warn(undone)
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

    def run_once(self, opts, seed, stop, label, startup_reference=None):
        def on_start(pid):
            self.lock.note(child_pid=pid)
        return runner.run_train(self.root, seed, opts.budget, opts.hard_timeout(), stop, label=label,
                                on_start=on_start, die_with_parent=True, startup_reference=startup_reference)

    def record(self, kind, opts, result, seed, commit, content_hash, started, **extra):
        return make_record(kind, self.branch, opts, result, seed, commit, content_hash, started, **extra)


TOK_PER_SEC_TOLERANCE = 0.15    # a run this much faster or slower than the noise runs ran under another load
STARTUP_FACTOR, STARTUP_SLACK = 2.0, 30.0  # start-up above 2x the baseline's and 30 s more is flagged
NOISE_AGAIN = ("measure noise again (`autoresearch noise`) once the machine's load is what it will be for the next "
               "runs, and after a keep that changes the model's speed")


def run_settings(result, opts):
    """The settings a run was made with, as compared between runs (gate.SETTINGS)."""
    f = result.facts
    return {"budget": opts.budget, "corpus": f.get("corpus"), "eval_request": f.get("eval_request"),
            "eval_tokens": f.get("eval_tokens"), "device": f.get("device"), "fixed_files": f.get("fixed_files"),
            "untimed_steps": f.get("untimed_steps")}  # steps trained before the clock starts: free training


def planned_settings(opts, here=True, root=None):
    """The settings a run will have, as far as they are known before it starts (`here`: on this machine; `root`:
    the checkout whose fixed modules it will import)."""
    return {"budget": opts.budget, "corpus": runner.corpus_identity() if here else None,
            "eval_request": runner.eval_request(), "device": runner.device_key(runner.hardware()) if here else None,
            "fixed_files": runner.fixed_identity(root) if root else None}


def make_record(kind, branch, opts, result, seed, commit, content_hash, started, hardware=None, **extra):
    """One ledger record of one train.py process (`hardware`: where it ran, if not on this machine)."""
    rec = {"kind": kind, "branch": branch, "commit": commit, "content_hash": content_hash, "seed": seed,
           "description": opts.description, "start_time": started, "wall_seconds": round(result.child_seconds, 3),
           "budget": opts.budget, "timeout": opts.hard_timeout(), "returncode": result.returncode,
           "timed_out": result.timed_out, "metrics": result.summary, "val_bpb": result.val_bpb,
           "hardware": hardware or runner.hardware(), "settings": run_settings(result, opts),
           "steps": result.facts.get("steps"), "tok_per_sec": result.facts.get("tok_per_sec"),
           "startup_seconds": result.facts.get("startup_seconds"), "loss_curve": result.facts.get("loss_curve"),
           "sandbox": result.facts.get("sandbox")}
    rec.update(extra)
    return rec


def outcome(result):
    """A run as the gate sees it: its val_bpb, or why it is not a valid result."""
    return result.failure() or result.val_bpb


class Judgement:
    """What a candidate is judged against, read once before its verdict: the best kept result (its pool and
    settings), the last kept commit, the margin, the candidate's own earlier runs and seeds. Shared by
    `autoresearch run`, `noise` and the parallel coordinator."""

    def __init__(self, records, noise, opts, in_history, content_hash):
        self.records, self.opts, self.noise, self.content_hash = records, opts, noise, content_hash
        self.best_rec, self.best = gate.best_kept(records, in_history)
        kept = gate.kept(records, in_history)
        self.kept_commit = kept[-1]["commit"] if kept else None
        self.baseline_rec = kept[0] if kept else None
        self.margin, self.margin_how = gate.margin(noise, opts.margin)
        # the clock's start-up allowance: the baseline's, not the best's (a kept run must not raise the next one's)
        self.startup_reference = (self.baseline_rec or {}).get("startup_seconds")
        self.exp_id = len(gate.experiments(records)) + 1
        self.n_best = len(gate.pool(records, self.best_rec["content_hash"])) if self.best_rec else 0
        self.reference = (self.best_rec or {}).get("settings")
        self.prior = gate.pool(records, content_hash)  # --rerun: earlier runs of this train.py join its pool
        # --rerun of a kept train.py: a measurement of that commit, not an idea (no verdict on git, no count)
        self.remeasured, self.kept_before = gate.kept_with(records, content_hash, in_history)
        self.recheck = None  # (holds, reason, better commit) once a remeasurement is decided

    def seeds(self, n=None):
        """Seeds this train.py has not run with yet, from --seed up: the run's own, then its confirmation seeds."""
        return gate.free_seeds(self.records, self.content_hash, self.opts.seed, 1 + self.opts.confirm if n is None else n)

    def check_settings(self, planned, branch):
        """Refuse, before anything changes, a run that could not be compared with the best kept run."""
        diffs = gate.settings_differ(planned, self.reference)
        if diffs:
            fixed = (f"\n  {', '.join(runner.FIXED_FILES)} are fixed: restore them as they were in the best kept run "
                     f"with git checkout {self.best_rec['commit'][:12]} -- {' '.join(runner.FIXED_FILES)}"
                     if any(d.startswith("fixed_files") for d in diffs) else "")
            raise Refusal(f"this run would not be comparable with the best kept run on {branch} ({'; '.join(diffs)}). "
                          f"Use the same settings, or start a new baseline on a new branch: "
                          f"git checkout -b autoresearch/<new-tag>{fixed}")

    def decide(self, outcomes, settings=None):
        """gate.decide() with this candidate's options and pool: (verdict, reason, values, more)."""
        diffs = gate.settings_differ(settings, self.reference)
        if diffs and not isinstance(outcomes[0][1], str):
            return ("discard", f"not comparable with the best kept run ({'; '.join(diffs)}): start a new baseline "
                    "on a new branch (git checkout -b autoresearch/<new-tag>) to use these settings", [], 0)
        if self.remeasured and not isinstance(outcomes[0][1], str):
            values = [*self.prior, outcomes[0][1]]
            return "remeasure", self.remeasure_reason(values), values, 0
        return gate.decide(outcomes, self.best, self.margin, self.opts.simpler, self.opts.confirm, self.prior,
                           self.n_best)

    def remeasure_reason(self, values):
        """Whether the remeasured commit's pooled mean still clears the bar it was kept on (gate.recheck)."""
        r, mean = self.remeasured, statistics.fmean(values)
        earlier = [(k["commit"], gate.reference_value(self.records, k["content_hash"]),
                    len(gate.pool(self.records, k["content_hash"]))) for k in self.kept_before]
        # the margin it was kept on (a --margin of its own, or the noise of the time), not this run's
        kept_margin = r.get("margin") or self.margin
        self.recheck = gate.recheck(mean, len(values), earlier, kept_margin, r.get("simpler", False))
        holds, why, _ = self.recheck
        return (f"measured again: kept commit {short(r['commit'])} (experiment #{r.get('exp', '?')}), now the mean of "
                f"{len(values)} runs {mean:.6f}, {'still clears' if holds else 'NO LONGER clears'} the bar it was "
                f"kept on: {why}")

    def warnings(self, rec):
        """Throughput against the noise runs', start-up against the baseline's: lines to print, or none."""
        out = []
        noise_tps, tps = (self.noise or {}).get("tok_per_sec"), rec.get("tok_per_sec")
        if noise_tps and tps and abs(tps / noise_tps - 1) > TOK_PER_SEC_TOLERANCE:
            out.append(f"tok/s {tps:,.0f} is {abs(tps / noise_tps - 1):.0%} {'below' if tps < noise_tps else 'above'} "
                       f"the noise runs' {noise_tps:,.0f}: the machine's load (or the model's speed) changed, so the "
                       f"margin may not fit; {NOISE_AGAIN}")
        base = (self.baseline_rec or {}).get("startup_seconds")
        start = rec.get("startup_seconds")
        if base is not None and start is not None and start > STARTUP_FACTOR * base and start > base + STARTUP_SLACK:
            out.append(f"start-up {start:.0f} s is far above the baseline's {base:.0f} s: work before the timer "
                       "starts is outside the time budget; move it into the timed loop")
        return out

    def record(self, branch, result, commit, started, verdict, reason, values, git_action, hardware=None,
               seed=None, **extra):
        """The experiment's ledger record (kind "run"): the first run's result, the verdict and what it rests on."""
        rec = make_record(
            "run", branch, self.opts, result, seed if seed is not None else self.opts.seed, commit, self.content_hash,
            started, hardware=hardware, exp=self.exp_id, verdict=verdict, reason=reason,
            kept_commit=self.kept_commit, best_before=self.best,
            best_commit=self.best_rec["commit"] if self.best_rec else None, best_runs=self.n_best,
            margin=self.margin, margin_how=self.margin_how, noise_std=(self.noise or {}).get("std"),
            noise_tok_per_sec=(self.noise or {}).get("tok_per_sec"), seeds_used=len(values) or 1,
            val_bpb_mean=statistics.fmean(values) if values else None, git=git_action, simpler=self.opts.simpler,
            rerun=self.opts.rerun, **extra)
        if self.remeasured:  # a measurement of a kept commit, not an idea: no results.tsv row, not counted
            rec.update(remeasure=True, commit=self.remeasured["commit"], exp=self.remeasured.get("exp"))
            if verdict == "remeasure" and self.recheck and not self.recheck[0]:
                better = self.recheck[2]
                rec["fails_bar"] = {"better_commit": better, "command": f"git reset --hard {short(better)}"}
        if gate.settings_differ(rec["settings"], self.reference):
            rec["comparable"] = False  # never pooled with, or judged against, the branch's runs
        rec["warnings"] = self.warnings(rec) if verdict in ("keep", "discard", "remeasure") else []
        return rec


def refuse_if_already_run(records, content_hash, queued=None):
    """One refusal for a train.py that was already run (or, in parallel mode, is queued)."""
    earlier = gate.already_run(records, content_hash)
    if not earlier and not queued:
        return
    if queued:
        what = f"candidate {queued[0]['id']} ({queued[0]['description']!r}) is queued"
    else:
        e = earlier[-1]
        shown = gate.shown_value(records, e)  # the number results.tsv and status show for it
        val = f"val_bpb {shown:.6f}, " if isinstance(shown, float) else ""
        what = f"commit {short(e['commit'])} ran it ({val}{e['verdict']}: {e['description']!r})"
    raise Refusal(f"this exact train.py was already run or queued: {what}.\n"
                  "  Edit train.py to try something new, or pass --rerun to add a run to its pool on purpose.")


def throughput(rec):
    """'33 steps, 2,345 tok/s, start-up 4 s' from a record, with the noise runs' tok/s for comparison."""
    steps, tps, start = rec.get("steps"), rec.get("tok_per_sec"), rec.get("startup_seconds")
    text = f"{steps if steps is not None else '-'} steps, {f'{tps:,.0f}' if tps else '-'} tok/s"
    if start is not None:
        text += f", start-up {start:.0f} s"
    if rec.get("noise_tok_per_sec") and tps:
        text += f" (noise runs: {rec['noise_tok_per_sec']:,.0f} tok/s, {tps / rec['noise_tok_per_sec'] - 1:+.0%})"
    return text


def verdict_lines(rec, tail=(), log_name=runner.LOG_FILE, root=None):
    """The verdict block, as `run` and `wait` print it: the log tail of a failed run first."""
    lines = [f"--- last lines of {log_name} ---", *tail] if tail else []
    val = gate.run_value(rec)
    runs = f" (mean of {rec['seeds_used']} runs)" if rec.get("seeds_used", 1) > 1 else ""
    best = rec.get("best_before")
    best_runs = f", mean of {rec['best_runs']} runs" if (rec.get("best_runs") or 1) > 1 else ""
    hw = rec.get("hardware") or {}
    where = f"ran on {hw.get('host', '?')} {hw.get('gpu') or ''}".rstrip()
    if rec.get("log"):
        where += f"; log {os.path.relpath(rec['log'], root) if root else rec['log']}"
    lines += [f"--- {rec['candidate']}: {rec['description']!r}" if rec.get("candidate") else "---",
              f"verdict:      {rec['verdict']}", f"reason:       {rec['reason']}",
              f"val_bpb:      {val:.6f}{runs}" if isinstance(val, float) and rec["verdict"] in ("keep", "discard",
                                                                                                "remeasure")
              else "val_bpb:      -",
              f"best_before:  {best:.6f} ({short(rec.get('best_commit'))}{best_runs})" if isinstance(best, float)
              else "best_before:  - (baseline)",
              f"throughput:   {throughput(rec)}",
              f"commit:       {short(rec['commit'])} ({rec['git']})",
              *([f"go back:      {short(rec['fails_bar']['better_commit'])} is better by the rule "
                 f"{short(rec['commit'])} was kept on; the branch stays on {short(rec['commit'])} until you run: "
                 f"{rec['fails_bar']['command']}"] if rec.get("fails_bar") else []),
              f"wall_seconds: {rec['harness_seconds']:.1f} (harness overhead {rec['overhead_seconds']:.2f}); {where}"]
    lines += [f"warning:      {w}" for w in rec.get("warnings") or ()]
    return lines


# ---------------------------------------------------------------------------
# autoresearch run

def run_experiment(opts):
    t0 = time.monotonic()
    with Session(f"run: {opts.description}", allow_train_changes=True) as s:
        root = s.root
        chash = gitops.content_hash(root)
        j = Judgement(s.records, s.noise, opts, s.in_history, chash)
        if not opts.rerun:
            refuse_if_already_run(s.records, chash)
        j.check_settings(planned_settings(opts, root=s.root), s.branch)
        seeds = j.seeds()

        base = gitops.head(root)
        committed = gitops.train_changed(root) and not j.remeasured  # a remeasurement commits nothing
        candidate = gitops.commit_train(root, opts.description, j.exp_id) if committed else base
        what = f"experiment #{j.exp_id} on {s.branch}: commit {short(candidate)} {opts.description!r}"
        if j.remeasured:
            candidate = j.remeasured["commit"]
            what = (f"measuring kept commit {short(candidate)} (experiment #{j.remeasured.get('exp', '?')}) again on "
                    f"{s.branch}: its pool of {len(j.prior)} gets one more run, nothing changes in git")
        say(f"{what}, seed {seeds[0]}",
            "  best so far: " + (f"{j.best:.6f} ({short(j.best_rec['commit'])}, mean of {j.n_best} run{'s' * (j.n_best != 1)})"
                                 if j.best_rec else "none (this run is the baseline)")
            + f", margin {j.margin:.4f} [{j.margin_how}]"
            # the best is a pooled mean: the verdict's bar for one run against it is not the margin itself
            + (f", bar {gate.bar(j.margin, 1, j.n_best):.4f} for 1 run vs the best's {j.n_best}"
               if j.best_rec and j.n_best != 1 else "")
            + f", timeout {opts.hard_timeout():.0f} s, log in {runner.LOG_FILE}")
        walled, how = sandbox.check()
        if not walled:
            say(f"  warning: train.py runs without walls ({how})")

        with StopSignals() as stop:
            started = now_iso()
            result = s.run_once(opts, seeds[0], stop, "train.py", j.startup_reference)
            outcomes, confirms = [(seeds[0], outcome(result))], []
            verdict, reason, values, more = j.decide(outcomes, run_settings(result, opts))
            if verdict == "confirm":
                say(f"borderline (val_bpb {result.val_bpb:.6f}): confirming with {opts.confirm} more seed(s)")
            for k, seed in enumerate(seeds[1:], 1):
                if verdict != "confirm" or result.signal_name:
                    break
                c_started = now_iso()
                c = s.run_once(opts, seed, stop, f"confirm {k}/{opts.confirm}", j.startup_reference)
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

            # git first: a kept candidate stays; anything else gives train.py back to the kept commit, except an
            # edit made to train.py while the run was going: the newer file stays in the working tree
            git_action = f"{short(candidate)} is the new kept commit" if verdict == "keep" else "train.py left as it was"
            if j.remeasured:
                git_action = (f"nothing changed in git: {short(candidate)} stays kept"
                              + (", with one more run in its pool" if verdict == "remeasure" else ""))
            elif verdict == "interrupted":
                if committed and gitops.undo_commit(root, candidate, base):
                    git_action = "candidate commit undone, your edited train.py left in the working tree"
                git_action += "; run it again when ready"
            elif verdict in ("discard", "crash") and j.kept_commit:
                newer = gitops.read_train(root) if gitops.content_hash(root) not in (chash, None) else None
                how = gitops.revert_train(root, j.kept_commit, f"autoresearch: revert train.py to {short(j.kept_commit)}")
                git_action = f"train.py reverted to kept commit {short(j.kept_commit)} ({how})"
                if newer is not None:
                    gitops.write_train(root, newer)
                    git_action += ("; train.py was edited during the run: your newer version is left in the working "
                                   "tree, not run yet")
            elif verdict == "crash":
                git_action = (f"baseline crashed; train.py left as committed in {short(candidate)}, "
                              "fix it and run again")

            rec = j.record(s.branch, result, candidate, started, verdict, reason, values, git_action, seed=seeds[0])
            child = result.child_seconds + sum(c["wall_seconds"] for c in confirms)
            rec["harness_seconds"] = round(time.monotonic() - t0, 3)
            rec["overhead_seconds"] = round(rec["harness_seconds"] - child, 3)
            for c in confirms:
                ledger.append_record(root, c)
            ledger.append_record(root, rec)
            ledger.write_results(root)

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
        j = Judgement(s.records, s.noise, opts, s.in_history, chash)
        j.check_settings(planned_settings(opts, root=s.root), s.branch)
        seeds = j.seeds(n=opts.runs)
        say(f"noise: running {short(commit)} {opts.runs} times (seeds {', '.join(map(str, seeds))}), "
            f"timeout {opts.hard_timeout():.0f} s each")
        with StopSignals() as stop:
            for k, seed in enumerate(seeds, 1):
                started = now_iso()
                result = s.run_once(opts, seed, stop, f"noise {k}/{opts.runs}", j.startup_reference)
                failure = result.failure()
                verdict = ("interrupted" if result.signal_name else "crash") if failure else "noise"
                rec = s.record("noise", opts, result, seed, commit, chash, started, verdict=verdict,
                               reason=failure or "noise run")
                if not failure and gate.settings_differ(rec["settings"], j.reference):
                    rec["comparable"] = False
                    failure = f"not comparable with the best kept run ({'; '.join(gate.settings_differ(rec['settings'], j.reference))})"
                ledger.append_record(root, rec)
                if failure:
                    say(f"--- last lines of {runner.LOG_FILE} ---", *result.tail, "---")
                    say(f"noise run {k} failed: {failure}. No noise estimate written.")
                    return EXIT_SIGNAL.get(stop.name, 130) if result.signal_name else EXIT_CRASH
                say(f"  seed {seed}: val_bpb {result.val_bpb:.6f} ({throughput(rec)}, {result.child_seconds:.0f} s)")

        # every valid run of this exact train.py counts, one per seed (the experiment's own run included)
        records = gate.branch_records(ledger.read_ledger(root), s.branch)
        runs = {r["seed"]: r for r in records if r.get("content_hash") == chash and gate.valid_value(r)}
        values = gate.pool(records, chash)
        std = gate.noise_estimate(values)
        if std is None:
            say("only one valid run of this train.py so far: run noise with -n 2 or more.")
            return EXIT_CRASH
        speeds = [r["tok_per_sec"] for r in runs.values() if r.get("tok_per_sec")]
        steps = [r["steps"] for r in runs.values() if r.get("steps") is not None]
        estimate = {"commit": commit, "content_hash": chash, "seeds": sorted(runs), "val_bpb": values,
                    "mean": statistics.fmean(values), "std": std, "time": now_iso(), "budget": opts.budget,
                    "hardware": runner.hardware(), "tok_per_sec": statistics.fmean(speeds) if speeds else None,
                    "steps": statistics.fmean(steps) if steps else None}
        ledger.write_noise(root, s.branch, estimate)
        ledger.write_results(root)  # the kept rows show the pooled means, now with these runs
        m, how = gate.margin(estimate)
        say("---", f"noise_std:    {std:.6f} over {len(values)} runs", f"mean:         {estimate['mean']:.6f}",
            f"range:        {min(values):.6f} .. {max(values):.6f}", f"margin:       {m:.6f} ({how})",
            "throughput:   " + (f"{estimate['steps']:.0f} steps, {estimate['tok_per_sec']:,.0f} tok/s a run"
                                if speeds and steps else "-"),
            f"when:         verdicts warn when a run's tok/s differs from these runs' by more than "
            f"{TOK_PER_SEC_TOLERANCE:.0%}; then {NOISE_AGAIN}")
        return EXIT_OK
