"""
The coordinator of parallel mode (`autoresearch serve`, started in the background by submit/wait): the one
process that judges candidates and writes the ledger, results.tsv and the branch. Ray only runs train.py.

One Ray actor per GPU of the cluster (or --workers CPU workers). A worker unpacks the candidate's commit
(`git archive`, sent with the job, so workers on other machines need no clone of the branch) into its own
scratch directory and runs train.py there with the same runner as `autoresearch run`: budget, hard timeout,
process-group kill, sandbox, the harness's clock and the evaluation. Ray sets CUDA_VISIBLE_DEVICES to the worker's GPU.

Verdicts are given in the order results arrive, each against the best kept result at that moment. A kept
candidate moves its branch: to the candidate commit if the branch is still where it was submitted, otherwise
to a new commit on top of the newer best with the candidate's train.py (it replaces the file, it is not a merge).
"""

import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

from autoresearch import candidates, experiment, gate, gitops, ledger, runner
from autoresearch.candidates import SERVE_FILE, Queue, append_event
from autoresearch.common import EXIT_OK, Options, Refusal, StopSignals, install_hint, now_iso, short
from autoresearch.experiment import Judgement, outcome
from autoresearch.lock import RepoLock

SERVE_LOG = "serve.log"
LOG_DIR = "logs"              # run.log of every job: logs/<id>-<seed>.log
IDLE_SECONDS = 300            # stop (and free the GPUs and the lock) after this long with nothing to do
LOG_KEEP = 1 << 20            # bytes of a job's log sent back from its worker
POLL = 0.5


class Worker:
    """A Ray actor: runs one job at a time in its own scratch copy of the candidate's tree."""

    def __init__(self, index):
        self.index = index
        self.dir = os.path.join(tempfile.gettempdir(), f"autoresearch-worker-{os.getpid()}")

    def info(self):
        import ray
        return {"index": self.index, "pid": os.getpid(), "node": ray.util.get_node_ip_address(),
                "gpus": [str(g) for g in ray.get_gpu_ids()], "hardware": runner.hardware()}

    def run(self, job):
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir)
        with tarfile.open(fileobj=io.BytesIO(job["tree"])) as tar:
            tar.extractall(self.dir)
        with open(os.devnull, "w") as quiet:
            result = runner.run_train(self.dir, job["seed"], job["budget"], job["timeout"], stop=lambda: None,
                                      stream=quiet, die_with_parent=True, tree=self.dir,
                                      startup_reference=job.get("startup_reference"))
        with open(os.path.join(self.dir, runner.LOG_FILE), "rb") as f:
            f.seek(max(0, os.path.getsize(f.name) - LOG_KEEP))
            log = f.read().decode(errors="replace")
        return {"result": dataclasses.asdict(result), "log": log, "hardware": runner.hardware()}


def log(*parts):
    print(now_iso(), *parts, flush=True)


def options(c):
    return Options(description=c["description"], seed=c["seed"], budget=c["budget"], timeout=c["timeout"],
                   confirm=c["confirm"], margin=c["margin"], simpler=c["simpler"], rerun=c["rerun"])


def run_result(event):
    return runner.RunResult(**event["result"]) if event else runner.RunResult()


class Coordinator:
    def __init__(self, root, ray, n_workers, gpus_per_worker):
        self.root, self.ray = root, ray
        self.queue = Queue(root)
        self.queue.forget_running()
        self.done = candidates.finished_ids(ledger.read_ledger(root))
        opts = {"num_gpus": gpus_per_worker} if gpus_per_worker else {"num_cpus": 1}
        self.actor_class = ray.remote(Worker).options(**opts)
        self.workers = [self.new_worker(i) for i in range(n_workers)]
        self.inflight = {}  # object ref -> worker
        os.makedirs(os.path.join(ledger.state_dir(root), LOG_DIR), exist_ok=True)

    def new_worker(self, index):
        actor = self.actor_class.remote(index)
        return {"index": index, "actor": actor, "info": actor.info.remote(), "job": None}

    # --- dispatch -----------------------------------------------------------------------------------------

    def dispatch(self):
        idle = [w for w in self.workers if w["job"] is None]
        for c, seed in list(self.queue.jobs(self.done))[:len(idle)]:
            w = idle.pop(0)
            tree = subprocess.run(["git", "archive", "--format=tar", c["commit"]], cwd=self.root, check=True,
                                  capture_output=True).stdout
            job = {"id": c["id"], "seed": seed, "budget": c["budget"], "timeout": options(c).hard_timeout(),
                   "tree": tree}
            ref = w["actor"].run.remote(job)
            w["job"] = {"id": c["id"], "seed": seed, "since": now_iso()}
            self.inflight[ref] = w
            append_event(self.root, "start", id=c["id"], seed=seed, worker=w["index"])
            log(f"start {c['id']} seed {seed} on worker {w['index']}: {c['description']!r}")
        self.queue.refresh()

    def collect(self, timeout):
        ready, _ = self.ray.wait(list(self.inflight), num_returns=1, timeout=timeout)
        for ref in ready:
            w = self.inflight.pop(ref)
            job, w["job"] = w["job"], None
            try:
                out = self.ray.get(ref)
            except self.ray.exceptions.RayError as e:
                error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
                log(f"lost {job['id']} seed {job['seed']} on worker {w['index']}: {error}")
                append_event(self.root, "lost", id=job["id"], seed=job["seed"], worker=w["index"], error=error)
                if isinstance(e, self.ray.exceptions.RayActorError):
                    self.workers[w["index"]] = self.new_worker(w["index"])
                continue
            path = os.path.join(ledger.state_dir(self.root), LOG_DIR, f"{job['id']}-{job['seed']}.log")
            with open(path, "w") as f:
                f.write(out["log"])
            append_event(self.root, "result", id=job["id"], seed=job["seed"], worker=w["index"],
                         started=job["since"], result=out["result"], hardware=out["hardware"], log=path)
            log(f"result {job['id']} seed {job['seed']}: "
                f"{run_result({'result': out['result']}).failure() or out['result']['summary'].get('val_bpb')}")
        self.queue.refresh()

    def abort_all(self):
        """An orderly stop: take the running jobs back (they run again next time, the attempt doesn't count)."""
        for ref, w in self.inflight.items():
            append_event(self.root, "abort", id=w["job"]["id"], seed=w["job"]["seed"], worker=w["index"])
            self.ray.kill(w["actor"])
        self.inflight.clear()

    # --- verdicts -----------------------------------------------------------------------------------------

    def finalize_ready(self):
        for c in self.queue.pending(self.done):
            if c["running"]:
                continue
            rec = self.judge(c)
            if rec:
                self.done.add(c["id"])

    def judge(self, c):
        """Record the verdict of a candidate whose jobs are all in, against the best kept result right now.
        Returns the record, or None while jobs are still to run."""
        root, branch, opts = self.root, c["branch"], options(c)
        ref = f"refs/heads/{branch}"
        tip = gitops.rev(root, ref)  # the branch as it is now: judged against, even if it moves meanwhile
        records = gate.branch_records(ledger.read_ledger(root), branch)
        in_history = gitops.history(root, tip) if tip else (lambda commit: False)
        j = Judgement(records, ledger.read_noise(root, branch), opts, in_history, c["content_hash"])
        confirm_seeds = c["seeds"][1:] or [s for s in j.seeds() if s != c["seed"]][:opts.confirm]

        outcomes, confirms = [], []
        for seed in [c["seed"]] + confirm_seeds:
            event, lost = c["results"].get(seed), candidates.exhausted(c, seed)
            if event is None and lost is None:
                if seed not in c["seeds"]:  # borderline: ask for the confirmation seeds, all at once
                    append_event(root, "confirm", id=c["id"], seeds=confirm_seeds)
                    log(f"borderline {c['id']}: confirming with seeds {confirm_seeds}")
                    self.queue.refresh()
                return None
            result = run_result(event)
            outcomes.append((seed, lost or outcome(result)))
            if seed != c["seed"]:
                fail = lost or result.failure()
                confirms.append(experiment.make_record(
                    "confirm", branch, opts, result, seed, c["commit"], c["content_hash"], (event or {}).get("started"),
                    hardware=(event or {}).get("hardware"), verdict="crash" if fail else "confirm",
                    reason=fail or "confirmation seed", candidate=c["id"], exp=j.exp_id))
            verdict, reason, values, _ = j.decide(outcomes, experiment.run_settings(result, opts)
                                                  if seed == c["seed"] else None)
            if verdict != "confirm":
                break

        commit, git_action = c["commit"], f"branch unchanged; candidate at {candidates.CANDIDATE_REF}{c['id']}"
        if verdict == "keep":
            commit, git_action = self.keep(c, ref)
        first = c["results"].get(c["seed"])
        events = [c["results"].get(s) for s in c["seeds"]]
        child = sum(e["result"]["child_seconds"] for e in events if e)
        harness = max(0.0, time.time() - self.start_epoch(c))
        rec = j.record(branch, run_result(first), commit, (first or {}).get("started"), verdict, reason, values,
                       git_action, hardware=(first or {}).get("hardware"), seed=c["seed"], candidate=c["id"],
                       worker=(first or {}).get("worker"), candidate_commit=c["commit"], base=c["base"],
                       submitted=c["time"], log=(first or {}).get("log"), harness_seconds=round(harness, 3),
                       overhead_seconds=round(harness - child, 3))
        for r in confirms:
            ledger.append_record(root, r)
        ledger.append_record(root, rec)
        ledger.write_results(root)
        log(f"verdict {c['id']}: {verdict} ({reason}); {git_action}")
        return rec

    def start_epoch(self, c):
        first = c["results"].get(c["seed"]) or {}
        started = first.get("started") or c["time"]
        try:
            return time.mktime(time.strptime(started, "%Y-%m-%dT%H:%M:%S%z"))
        except ValueError:
            return time.time()

    def keep(self, c, ref):
        """Move the branch to a commit whose train.py is the candidate's; compare-and-swap, so a commit made
        meanwhile by someone else is built upon, never lost."""
        root, blob = self.root, gitops.blob_at(self.root, c["commit"])
        while True:
            tip = gitops.rev(root, ref)
            if tip == c["base"]:
                new, how = c["commit"], "branch moved to the candidate commit"
            elif gitops.blob_at(root, tip) == blob:
                return tip, "branch already has this train.py"
            else:
                msg = gitops.harness_message(
                    f"{c['description']}\n\nautoresearch candidate {c['id']}, submitted on {short(c['base'])}: "
                    f"its train.py replaces the one of {short(tip)} (not a merge)", c["branch"], candidate=c["id"])
                new = gitops.commit_blob_on(root, tip, blob, msg)
                how = f"committed on top of the newer best {short(tip)} (its train.py replaced)"
            if new == tip or gitops.update_ref(root, ref, new, tip):
                return new, how

    # --- state for `autoresearch status` ----------------------------------------------------------------

    def write_state(self, address):
        workers = []
        for w in self.workers:
            info, _ = self.ray.wait([w["info"]], timeout=0)
            entry = {"index": w["index"], "job": w["job"]}
            if info:
                try:
                    entry.update({k: v for k, v in self.ray.get(info[0]).items() if k != "hardware"})
                except self.ray.exceptions.RayError:
                    entry["state"] = "lost"
            else:
                entry["state"] = "starting"
            workers.append(entry)
        text = json.dumps({"pid": os.getpid(), "address": address, "since": self.since, "workers": workers}, indent=1)
        if text != getattr(self, "written", None):
            ledger.write_atomic(os.path.join(ledger.state_dir(self.root), SERVE_FILE), text)
            self.written = text

    def loop(self, stop, idle, address):
        self.since = now_iso()
        last_busy = time.monotonic()
        while not stop():
            self.queue.refresh()
            self.finalize_ready()
            self.dispatch()
            self.write_state(address)
            if self.inflight:
                self.collect(POLL)
                last_busy = time.monotonic()
            elif any(True for _ in self.queue.jobs(self.done)):
                time.sleep(POLL)  # all workers still starting
            elif time.monotonic() - last_busy > idle:
                log(f"nothing to do for {idle:g} s: stopping")
                return
            else:
                time.sleep(POLL)
        log(f"stopping on {stop()}: running jobs go back to the queue")
        self.abort_all()


def serve(root, address=None, workers=None, idle=IDLE_SECONDS):
    with RepoLock(root, "serve: parallel experiments (stop it with `autoresearch stop`)"):
        try:
            import ray
        except ImportError:
            raise Refusal(install_hint()) from None
        ledger.write_results(root)  # stopped between the ledger and results.tsv: the ledger is the truth
        local = not (address or os.environ.get("RAY_ADDRESS"))
        kwargs = {"num_cpus": max(os.cpu_count() or 1, workers or 1)} if local else {}
        ray.init(address=address, include_dashboard=False, log_to_driver=False, **kwargs)
        try:
            gpus = int(ray.cluster_resources().get("GPU", 0))
            n = workers or gpus or 1
            log(f"serving {root}: {n} {'GPU' if gpus else 'CPU'} worker(s), cluster {ray.cluster_resources()}")
            # more workers than GPUs (--workers): they share the GPUs, each asking Ray for a fraction of one
            coordinator = Coordinator(root, ray, n, gpus_per_worker=min(1.0, gpus / n) if gpus else 0)
            with StopSignals() as stop:
                coordinator.loop(stop, idle, address)
        finally:
            ray.shutdown()
            path = os.path.join(root, ledger.STATE_DIR, SERVE_FILE)
            if os.path.exists(path):
                os.unlink(path)
    return EXIT_OK


def start_background(root, address=None, workers=None, idle=None):
    """Start `autoresearch serve` detached from the terminal (its output goes to .autoresearch/serve.log)."""
    cmd = [sys.executable, "-m", "autoresearch", "serve"]
    if address:
        cmd += ["--address", address]
    if workers:
        cmd += ["--workers", str(workers)]
    if idle is not None:
        cmd += ["--idle", f"{idle:g}"]
    with open(os.path.join(ledger.state_dir(root), SERVE_LOG), "ab") as out:
        proc = subprocess.Popen(cmd, cwd=root, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    return proc.pid
