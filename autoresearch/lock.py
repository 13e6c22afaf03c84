"""
One experiment at a time per repository: an flock on .autoresearch/lock. The kernel drops it when the holder
dies, so there are no stale locks to clean up. train.py inherits the descriptor, so a training process left
behind by a killed harness still holds the lock and no second run can start on top of it. `holder_info` says who
holds it (the parallel-mode coordinator holds it while it serves).
"""

import fcntl
import json
import os
import time

from autoresearch.common import Refusal
from autoresearch.ledger import STATE_DIR, state_dir

LOCK_FILE = "lock"


class RepoLock:
    def __init__(self, root, what):
        self.path = os.path.join(state_dir(root), LOCK_FILE)
        self.what = what
        self.fd = None

    def __enter__(self):
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Refusal(f"another autoresearch command is already running in this repository ({self.holder()}).\n"
                          "  Wait for it to finish (or stop it with Ctrl-C / kill <pid>); never run two at once.")
        self.fd = fd
        self.note()
        return self

    def note(self, **extra):
        """Say who holds the lock, for the refusal message of a second command."""
        info = {"pid": os.getpid(), "what": self.what, "since": time.strftime("%Y-%m-%d %H:%M:%S"), **extra}
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(info).encode(), 0)

    def holder(self):
        try:
            with open(self.path) as f:
                info = json.load(f)
            child = f", train.py pid {info['child_pid']}" if info.get("child_pid") else ""
            return f"pid {info['pid']}{child}, {info['what']}, since {info['since']}"
        except (OSError, ValueError, KeyError):
            return "holder unknown"

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


def holder_info(root):
    """The lock holder's note ({'pid', 'what', ...}) if any autoresearch command holds the repository, else None."""
    try:
        with RepoLock(root, "probe"):
            return None
    except Refusal:
        try:
            with open(os.path.join(root, STATE_DIR, LOCK_FILE)) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {"what": "unknown"}


def is_serve(info):
    """Is this lock holder the parallel-mode coordinator (`autoresearch serve`)?"""
    return bool(info) and str(info.get("what", "")).startswith("serve")
