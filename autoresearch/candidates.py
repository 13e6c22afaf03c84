"""
The candidate queue of parallel mode: .autoresearch/queue.jsonl, an append-only log of events, one JSON object
a line. Every candidate's state is folded from it, so a restarted coordinator knows what is queued, what ran and
what is left. Verdicts live in the ledger, as for `autoresearch run`: a candidate is done once the ledger has
its run record, which is what makes restarts free of duplicate rows.

    submit   a new candidate: id, branch, commit (also at refs/autoresearch/candidates/<id>), base (the best
             commit it was submitted on), content_hash, description and its run options
    start    one job of a candidate (one seed) handed to a worker
    abort    ...taken back by an orderly stop of the coordinator: that attempt doesn't count
    lost     ...its worker died (killed, node lost) or failed outside train.py
    result   ...finished: train.py's RunResult, with where and when it ran
    confirm  a borderline candidate needs these extra seeds before its verdict
"""

import fcntl
import json
import os
from contextlib import contextmanager

from autoresearch import ledger
from autoresearch.common import now_iso

QUEUE_FILE = "queue.jsonl"
SERVE_FILE = "serve.json"     # the coordinator's workers and what they run, written by serve, read by status
SUBMIT_LOCK = "submit.lock"
CANDIDATE_REF = "refs/autoresearch/candidates/"
MAX_ATTEMPTS = 2  # a job whose worker dies gets one retry; after that the candidate is recorded as a crash


def queue_path(root):
    return os.path.join(ledger.state_dir(root), QUEUE_FILE)


def append_event(root, event, **fields):
    ledger.append_line(queue_path(root), ledger.dumps({"event": event, "time": now_iso(), **fields}))


@contextmanager
def submit_lock(root):
    """Serializes submits (the duplicate check and the new id), never held for long."""
    fd = os.open(os.path.join(ledger.state_dir(root), SUBMIT_LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def read_serve_state(root):
    """serve.json as written by the coordinator, or None."""
    return ledger.read_state_file(root, SERVE_FILE)


def finished_ids(records):
    """Candidates with a verdict in the ledger."""
    return {r["candidate"] for r in records if r["kind"] == "run" and r.get("candidate")}


class Queue:
    """All candidates in submit order, folded from the event log; refresh() reads what was appended since."""

    def __init__(self, root):
        self.path = queue_path(root)
        self.offset = 0
        self.candidates = {}
        self.refresh()

    def refresh(self):
        if not os.path.exists(self.path):
            return
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # a line still being written is read next time
        for line in data[:end].decode().splitlines():
            if line.strip():
                self.apply(json.loads(line))
        self.offset += end

    def apply(self, e):
        kind, c = e["event"], self.candidates.get(e.get("id"))
        if kind == "submit":
            self.candidates[e["id"]] = {**e, "seeds": [e["seed"]], "attempts": {}, "running": {}, "lost": {},
                                        "results": {}}
            return
        if c is None:
            return
        seed = e.get("seed")
        if kind == "confirm":
            c["seeds"] += [s for s in e["seeds"] if s not in c["seeds"]]
        elif kind == "start":
            c["attempts"][seed] = c["attempts"].get(seed, 0) + 1
            c["running"][seed] = e
        elif kind == "abort":
            c["attempts"][seed] -= 1
            c["running"].pop(seed, None)
        elif kind == "lost":
            c["running"].pop(seed, None)
            c["lost"][seed] = e["error"]
        elif kind == "result":
            c["running"].pop(seed, None)
            c["results"][seed] = e

    def forget_running(self):
        """A fresh coordinator: whatever the last one had running is gone (and counts as an attempt)."""
        for c in self.candidates.values():
            c["running"].clear()

    def pending(self, done):
        return [c for c in self.candidates.values() if c["id"] not in done]

    def jobs(self, done):
        """(candidate, seed) still to run, oldest candidate first (so confirmation seeds go before new ideas)."""
        for c in self.pending(done):
            for seed in c["seeds"]:
                if seed not in c["results"] and seed not in c["running"] and exhausted(c, seed) is None:
                    yield c, seed


def exhausted(c, seed):
    """Why a job without a result won't be tried again, or None."""
    if seed in c["results"] or c["attempts"].get(seed, 0) < MAX_ATTEMPTS:
        return None
    return f"worker lost {c['attempts'][seed]} times: {c['lost'].get(seed, 'coordinator stopped mid-run')}"
