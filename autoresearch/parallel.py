"""
Parallel mode, the commands the agent types: submit (queue train.py as a candidate, return at once), wait (print
the next verdicts) and stop. The work itself is done by the coordinator, `autoresearch serve` (serve.py), which
submit and wait start in the background when candidates are queued and none runs.
"""

import importlib.util
import json
import os
import signal
import time

from autoresearch import candidates, experiment, gate, gitops, ledger, serve
from autoresearch.candidates import CANDIDATE_REF, Queue, append_event
from autoresearch.common import EXIT_OK, EXIT_SIGNAL, Refusal, install_hint, say, short
from autoresearch.lock import holder_info as serve_info, is_serve

REPORTED_FILE = "reported.json"  # candidates whose verdict `wait` has printed
TAIL_LINES = 15
WAIT_POLL = 1.0


def need_ray():
    if importlib.util.find_spec("ray") is None:
        raise Refusal(install_hint())


def ensure_serving(root, address=None, workers=None, idle=None):
    info = serve_info(root)
    if is_serve(info):
        return f"serve pid {info['pid']} running"
    if info:
        return (f"serve not started: another command holds this repository (pid {info.get('pid')}, "
                f"{info.get('what')}); `autoresearch wait` starts it later")
    need_ray()
    pid = serve.start_background(root, address, workers, idle)
    return f"started serve pid {pid} (log in {ledger.STATE_DIR}/{serve.SERVE_LOG})"


def queue_line(root):
    q, done = Queue(root), candidates.finished_ids(ledger.read_ledger(root))
    pending = q.pending(done)
    running = sum(bool(c["running"]) for c in pending)
    return f"queue: {len(pending) - running} waiting, {running} running, {len(done)} done"


# ---------------------------------------------------------------------------
# autoresearch submit

def submit(opts, address=None, workers=None, idle=None):
    root = gitops.repo_root()
    branch = gitops.check_branch(root)
    gitops.check_clean(root, allow_train=True)
    ledger.read_results(root)  # refuse now rather than let the coordinator fail on a damaged file
    need_ray()
    with candidates.submit_lock(root):
        q, records = Queue(root), ledger.read_ledger(root)
        chash = gitops.content_hash(root)
        if not opts.rerun:
            queued = [c for c in q.pending(candidates.finished_ids(records))
                      if c["branch"] == branch and c["content_hash"] == chash]
            experiment.refuse_if_already_run(gate.branch_records(records, branch), chash, queued)
        j = experiment.Judgement(gate.branch_records(records, branch), ledger.read_noise(root, branch), opts,
                                 gitops.history(root), chash)
        j.check_settings(experiment.planned_settings(opts, here=False), branch)  # the device is checked after the run
        opts.seed = j.seeds(n=1)[0]
        tip = gitops.head(root)
        blob = gitops.write_train_blob(root)
        cid = f"c{len(q.candidates) + 1}"
        commit = tip if blob == gitops.blob_at(root, tip) else gitops.commit_blob_on(
            root, tip, blob, gitops.harness_message(opts.description, branch, candidate=cid))
        gitops.update_ref(root, CANDIDATE_REF + cid, commit)
        append_event(root, "submit", id=cid, branch=branch, commit=commit, base=tip, content_hash=chash,
                     description=opts.description, seed=opts.seed, budget=opts.budget, timeout=opts.timeout,
                     confirm=opts.confirm, margin=opts.margin, simpler=opts.simpler, rerun=opts.rerun)
        gitops.git(root, "checkout", tip, "--", gitops.TRAIN_FILE)  # the next idea starts from the best
    how = ensure_serving(root, address, workers, idle)
    say(f"submitted {cid}: commit {short(commit)} {opts.description!r} on best {short(tip)}",
        f"train.py restored to the best ({short(tip)}); {queue_line(root)}; {how}",
        "`autoresearch wait` prints the next verdict")
    return EXIT_OK


# ---------------------------------------------------------------------------
# autoresearch wait

def read_reported(root):
    path = os.path.join(root, ledger.STATE_DIR, REPORTED_FILE)
    if not os.path.exists(path):
        return set()
    with open(path) as f:
        return set(json.load(f))


def show_verdict(root, r):
    tail = []
    if r["verdict"] == "crash" and r.get("log") and os.path.exists(r["log"]):
        with open(r["log"]) as f:
            tail = [line for line in f.read().replace("\r", "\n").split("\n") if line.strip()][-TAIL_LINES:]
    say(*experiment.verdict_lines(r, tail, os.path.relpath(r["log"], root) if r.get("log") else "", root))


def sync_train(root):
    """After a keep, bring an unedited train.py to the new best; never touch one that is being edited."""
    index_blob = gitops.git(root, "rev-parse", f":{gitops.TRAIN_FILE}", check=False)
    head_blob = gitops.blob_at(root, "HEAD")
    if index_blob == head_blob:
        return None
    if gitops.git(root, "hash-object", gitops.TRAIN_FILE) == index_blob:
        gitops.git(root, "checkout", "HEAD", "--", gitops.TRAIN_FILE)
        return f"train.py updated to the new best ({short(gitops.head(root))})"
    return (f"note: train.py has edits made on an older best; the best is now {short(gitops.head(root))}. "
            "Submitting it replaces the best's train.py (kept changes since are not in it)")


def wait(all_done=False, timeout=None, address=None, workers=None):
    root = gitops.repo_root()
    reported = read_reported(root)
    t0, said = time.monotonic(), False
    try:
        while True:
            records = ledger.read_ledger(root)
            pending = Queue(root).pending(candidates.finished_ids(records))
            new = [r for r in gate.verdicts(records) if r.get("candidate") and r["candidate"] not in reported]
            if new and not (all_done and pending):
                break
            if not new and not pending:
                say("nothing queued and no new verdicts: submit a candidate first (autoresearch submit -m ...)")
                return EXIT_OK
            if not is_serve(serve_info(root)):
                say(f"resuming the queue: {ensure_serving(root, address, workers)}")
            if timeout is not None and time.monotonic() - t0 > timeout:
                say(f"no verdict within {timeout:g} s; {queue_line(root)}")
                return EXIT_OK
            if not said:
                say(f"waiting for {'all' if all_done else 'the next'} verdict(s); {queue_line(root)}")
                said = True
            time.sleep(WAIT_POLL)
    except KeyboardInterrupt:
        say("interrupted: nothing is lost, the queue keeps running; `autoresearch wait` picks up from here")
        return EXIT_SIGNAL["SIGINT"]
    for r in new:
        show_verdict(root, r)
    ledger.write_atomic(os.path.join(root, ledger.STATE_DIR, REPORTED_FILE),
                        json.dumps(sorted(reported | {r["candidate"] for r in new})))
    note = sync_train(root) if gitops.BRANCH_PATTERN.match(gitops.current_branch(root) or "") else None
    say("---", *([note] if note else []), queue_line(root))
    return EXIT_OK


# ---------------------------------------------------------------------------
# autoresearch stop

def stop(grace=60.0):
    root = gitops.repo_root()
    info = serve_info(root)
    if not is_serve(info):
        say("no serve running here")
        return EXIT_OK
    os.kill(info["pid"], signal.SIGTERM)
    deadline = time.monotonic() + grace
    while is_serve(serve_info(root)) and time.monotonic() < deadline:
        time.sleep(0.2)
    say(f"stopped serve pid {info['pid']}; running candidates went back to the queue ({queue_line(root)})")
    return EXIT_OK
