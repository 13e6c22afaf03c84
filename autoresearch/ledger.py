"""
Where results live.

- .autoresearch/ledger.jsonl: every train.py process the harness ever ran, one JSON object a line, append-only
  and fsync'ed. The source of truth.
- results.tsv: one row per experiment, the short view the agent reads, rewritten from the ledger after each one.
  A remeasurement of a kept commit (--rerun) has no row of its own: it moves that commit's pooled mean.
- .autoresearch/noise.json: the latest noise estimate per branch, replaced atomically.
"""

import json
import math
import os
import tempfile

from autoresearch import gate

STATE_DIR = ".autoresearch"
LEDGER_FILE = "ledger.jsonl"
NOISE_FILE = "noise.json"
RESULTS_FILE = "results.tsv"
RESULTS_HEADER = ["commit", "val_bpb", "memory_gb", "status", "description"]
STATUSES = {"keep", "discard", "crash", "interrupted"}


class LedgerError(Exception):
    """A state file is damaged; printed with the path and line so a human can fix it."""


def state_dir(root):
    path = os.path.join(root, STATE_DIR)
    os.makedirs(path, exist_ok=True)
    return path


def read_state_file(root, name):
    """A JSON file under .autoresearch/ that a process rewrites atomically (serve.json, agent.json), or None if
    it is absent or unreadable: it only reports what that process is doing."""
    try:
        with open(os.path.join(root, STATE_DIR, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def append_line(path, line):
    """Append-only write: one write() of a whole line, then fsync, so a crash can't leave half a record."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line.rstrip("\n") + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path, text):
    """Write to a temporary file beside `path`, fsync, then rename over it: readers see old or new, never half."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------
# ledger.jsonl

def _clean(value):
    # JSON has no NaN/inf: store them as strings so the file stays valid JSON for any reader
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def dumps(record):
    return json.dumps(_clean(record), sort_keys=True)


def append_record(root, record):
    append_line(os.path.join(state_dir(root), LEDGER_FILE), dumps(record))


def read_ledger(root):
    path = os.path.join(root, STATE_DIR, LEDGER_FILE)
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise LedgerError(f"{path} line {lineno} is not valid JSON ({e.msg}). The ledger is append-only: "
                                  "move the damaged line out of the file (keep a copy) and try again.") from None
            if not isinstance(record, dict) or "kind" not in record:
                raise LedgerError(f"{path} line {lineno} is not a ledger record (no 'kind').")
            records.append(record)
    return records


# ---------------------------------------------------------------------------
# results.tsv

def read_results(root):
    """Parse results.tsv, refusing loudly on anything unexpected rather than appending to a damaged file."""
    path = os.path.join(root, RESULTS_FILE)
    if not os.path.exists(path):
        return []
    hint = (f"Move it away and run `autoresearch rebuild-tsv` to rewrite it from {STATE_DIR}/{LEDGER_FILE} "
            "(the ledger holds every run).")
    with open(path) as f:
        lines = f.read().splitlines()
    if not lines:
        return []
    if lines[0].split("\t") != RESULTS_HEADER:
        raise LedgerError(f"{path}: line 1 should be the tab-separated header "
                          f"'{chr(9).join(RESULTS_HEADER)}', found {lines[0]!r}. {hint}")
    rows = []
    for lineno, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(RESULTS_HEADER):
            raise LedgerError(f"{path}: line {lineno} has {len(fields)} tab-separated fields, expected "
                              f"{len(RESULTS_HEADER)} ({', '.join(RESULTS_HEADER)}): {line!r}. {hint}")
        row = dict(zip(RESULTS_HEADER, fields))
        try:
            float(row["val_bpb"]), float(row["memory_gb"])
        except ValueError:
            raise LedgerError(f"{path}: line {lineno}: val_bpb and memory_gb must be numbers: {line!r}. {hint}") from None
        if row["status"] not in STATUSES:
            raise LedgerError(f"{path}: line {lineno}: status {row['status']!r} is not one of "
                              f"{', '.join(sorted(STATUSES))}. {hint}")
        rows.append(row)
    return rows


def results_row(record, records):
    """The results.tsv row of one experiment record (`records`: its branch's, for the pooled means). Crashes show
    0.000000, as the agent expects; a kept row shows its train.py's pooled mean, the number the gate uses."""
    val = gate.shown_value(records, record)
    val = val if isinstance(val, (int, float)) and math.isfinite(val) and record["verdict"] in ("keep", "discard") else 0.0
    mem = (record.get("metrics") or {}).get("peak_vram_mb")
    mem_gb = mem / 1024 if isinstance(mem, (int, float)) and math.isfinite(mem) and val else 0.0
    desc = " ".join(str(record.get("description", "")).split())  # no tabs or newlines in a TSV cell
    runs = len(gate.pool(records, record.get("content_hash"))) if record["verdict"] == "keep" else record.get("seeds_used", 1)
    if runs > 1 and record["verdict"] in ("keep", "discard"):
        desc += f" [mean of {runs} runs]"
    return [record["commit"][:7], f"{val:.6f}", f"{mem_gb:.1f}", record["verdict"], desc]


def write_results(root):
    """Rewrite results.tsv from the ledger (all branches, in run order): one row per experiment, the same numbers
    as `status` and `plot`. A view: the ledger is the truth."""
    records = read_ledger(root)
    by_branch = {}
    for r in records:
        by_branch.setdefault(r.get("branch"), []).append(r)
    rows = ["\t".join(RESULTS_HEADER)]
    rows += ["\t".join(results_row(r, by_branch[r.get("branch")])) for r in gate.experiments(records)]
    write_atomic(os.path.join(root, RESULTS_FILE), "\n".join(rows) + "\n")
    return len(rows) - 1


# ---------------------------------------------------------------------------
# noise.json

def _noise_problem(estimate):
    """What is wrong with one branch's noise estimate, or None: the margin, status and every verdict use its std
    and tok/s as numbers, so they are checked here, where the file is read."""
    if not isinstance(estimate, dict):
        return f"an estimate must be a JSON object, found {estimate!r}"
    for key in ("std", "tok_per_sec"):
        v = estimate.get(key)
        # bool is an int to Python, not a number here; NaN and inf are valid JSON to Python's reader
        if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                  and v >= 0):
            return f"{key} must be a number >= 0, found {v!r}"
    return None


def read_noise(root, branch):
    """This branch's noise estimate, or None if it has none; a LedgerError if the file is damaged."""
    path = os.path.join(root, STATE_DIR, NOISE_FILE)
    if not os.path.exists(path):
        return None
    fix = "delete it and run `autoresearch noise` again"
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise LedgerError(f"{path} is damaged (not valid JSON); {fix}.") from None
    if not isinstance(data, dict):
        raise LedgerError(f"{path} is damaged (not a JSON object of branches); {fix}.")
    estimate = data.get(branch)
    problem = _noise_problem(estimate) if estimate is not None else None
    if problem:
        raise LedgerError(f"{path} is damaged ({branch}: {problem}); {fix}.")
    return estimate


def write_noise(root, branch, estimate):
    path = os.path.join(state_dir(root), NOISE_FILE)
    data = {}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data[branch] = estimate
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
