"""
`autoresearch run --detach` / `noise --detach`: the same command in the background, so no call has to block for
the 6 to 20 minutes a run or a noise measurement takes, past the ~10-minute limit of many agents' shell tools.
`autoresearch wait [--timeout S]` then blocks (up to S seconds at a time) until it ends and prints its output and
verdict, exactly once. `autoresearch stop` interrupts it (the harness then undoes the candidate commit, as for
Ctrl-C). Nothing is lost if `wait` is interrupted: the run goes on, and the next `wait` picks it up.

The background process is `python -m autoresearch.detach ID <command> ...`: it runs the command as the CLI
would, then writes its exit code to detached.done.json (matched by ID), so `wait` can report it.
"""

import json
import os
import signal
import subprocess
import sys
import time
import uuid

from autoresearch import candidates, gitops, ledger
from autoresearch.common import EXIT_CRASH, EXIT_OK, EXIT_SIGNAL, Refusal, now_iso, say

INFO_FILE = "detached.json"       # the latest detached command: id, pid, args, started, reported
DONE_FILE = "detached.done.json"  # written by the background process when it ends: id, exit code
LOG_FILE = "detached.log"         # its whole output
START_WATCH = 3.0                 # seconds to watch for an immediate refusal, so it is reported at once
POLL = 0.5


def _path(root, name):
    return os.path.join(ledger.state_dir(root), name)



def _write(root, name, data):
    ledger.write_atomic(_path(root, name), json.dumps(data, indent=2) + "\n")


def _alive(pid):
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:  # a zombie (exited, not yet reaped) is not running
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def current(root):
    """The latest detached command if its outcome has not been printed by `wait` yet, else None."""
    info = ledger.read_state_file(root, INFO_FILE)
    return info if info and not info.get("reported") else None


def _done(root, info):
    done = ledger.read_state_file(root, DONE_FILE)
    return done if done and done.get("id") == info["id"] else None


def running(root):
    info = current(root)
    return info if info and not _done(root, info) and _alive(info["pid"]) else None


def start(args):
    """Start `autoresearch <args>` in the background and return at once (after a short look for a refusal)."""
    root = gitops.repo_root()
    busy = running(root)
    if busy:
        raise Refusal(f"a detached `{' '.join(busy['args'])}` is still running (pid {busy['pid']}); "
                      "`autoresearch wait` prints its verdict when it ends.")
    if current(root):
        raise Refusal("the last detached command's result has not been read yet: run `autoresearch wait` first.")
    info = {"id": uuid.uuid4().hex[:12], "args": list(args), "started": now_iso(),
            "started_at": time.time(), "log": os.path.join(ledger.STATE_DIR, LOG_FILE), "reported": False}
    with open(_path(root, LOG_FILE), "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "autoresearch.detach", info["id"], *args], cwd=root,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # its own session: the terminal's Ctrl-C doesn't reach it
    info["pid"] = proc.pid
    _write(root, INFO_FILE, info)
    deadline = time.monotonic() + START_WATCH
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    if proc.poll() is not None:  # ended at once: a refusal or a quick failure, report it now
        return report(root, info)
    say(f"started in the background (pid {proc.pid}): autoresearch {' '.join(args)}",
        f"output in {info['log']}; `autoresearch wait --timeout 300` blocks up to 5 minutes and prints the verdict "
        "once it ends (call it again while it says 'still running'); `autoresearch stop` interrupts it")
    return EXIT_OK


def _log_text(root):
    try:
        with open(_path(root, LOG_FILE), errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def report(root, info):
    """Print the finished command's output, mark it read, return its exit code."""
    done = _done(root, info)
    text = _log_text(root).replace("\r", "\n")
    lines = [line for line in text.split("\n") if line.strip()]
    print("\n".join(lines), flush=True)
    if done:
        code = done["rc"]
    else:
        say("--- the background process ended without writing its exit code (killed?)")
        code = EXIT_CRASH
    _write(root, INFO_FILE, {**info, "reported": True})
    return code


def wait(root, timeout=None):
    info = current(root)
    t0 = time.monotonic()
    said = False
    try:
        while not _done(root, info) and _alive(info["pid"]):
            if timeout is not None and time.monotonic() - t0 >= timeout:
                last = next((s for s in reversed(_log_text(root).replace("\r", "\n").split("\n")) if s.strip()), "")
                say(f"still running after {time.time() - info['started_at']:.0f} s (pid {info['pid']}); last line: "
                    f"{last.strip()[:120]}", "run `autoresearch wait` again")
                return EXIT_OK
            if not said:
                say(f"waiting for the detached `autoresearch {' '.join(info['args'])}` (pid {info['pid']}, started "
                    f"{time.time() - info['started_at']:.0f} s ago)")
                said = True
            time.sleep(POLL)
    except KeyboardInterrupt:
        say("stopped waiting; the run goes on in the background, `autoresearch wait` picks it up again")
        return EXIT_SIGNAL["SIGINT"]
    return report(root, info)


def nothing_to_wait_for(root):
    """True (and says so) if the last detached command was already reported and parallel mode was never used."""
    info = ledger.read_state_file(root, INFO_FILE)
    parallel_used = os.path.exists(os.path.join(root, ledger.STATE_DIR, candidates.QUEUE_FILE))
    if not info or not info.get("reported") or parallel_used:
        return False
    say(f"nothing to wait for: the detached `autoresearch {' '.join(info['args'])}` ended and its verdict was "
        "printed; `autoresearch status` shows all results")
    return True


def stop(root, grace=60.0):
    """Interrupt the detached command like Ctrl-C would, and wait for its bookkeeping to finish."""
    info = running(root)
    if not info:
        return False
    os.killpg(info["pid"], signal.SIGINT)
    deadline = time.monotonic() + grace
    while _alive(info["pid"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    say(f"interrupted the detached `autoresearch {' '.join(info['args'])}` (pid {info['pid']}); "
        "`autoresearch wait` prints what happened")
    return True


def main(argv):
    """The background process: run the command, then record its exit code for `wait`."""
    run_id, args = argv[0], argv[1:]
    from autoresearch import cli
    code = EXIT_CRASH
    try:
        code = cli.main(args)
    finally:
        root = gitops.repo_root()
        _write(root, DONE_FILE, {"id": run_id, "rc": code, "finished": now_iso()})
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
