"""
The request `autoresearch agent` sends for each experiment, rebuilt from files on disk every time (never a
growing transcript), so its size stays flat however long the night: program.md's rules, the current train.py,
the best result and the kept changes that reached it, the last results one line each, near-misses, the notes
the model asked to keep, and the tail of the last crash. Only train.py itself can make it grow.
"""

import os

from autoresearch import gate, gitops, ledger
from autoresearch.common import short

PROGRAM_FILE = "program.md"
NOTES_FILE = "notes.md"         # in .autoresearch/: ideas the model asked to remember (NOTE: lines)
RULE_SECTIONS = ("What you may and may not do", "What train.py prints", "The keep gate", "Simplicity",
                 "Time-outs", "Driven by `autoresearch agent`", "NEVER STOP")
LAST_RESULTS = 15               # one line each
KEPT_SHOWN = 10                 # the latest kept changes on the way to the best
NEAR_MISSES = 6                 # discarded ideas that came closest to the best
NOTES_CHARS = 2000              # the newest notes
CRASH_CHARS = 1500              # the end of the last crash's log
CRASH_RECENT = 10               # show the last crash only if it is among this many latest experiments
DESCRIPTION_CHARS = 120
BEST_METRICS = ("training_seconds", "startup_seconds", "eval_seconds", "total_seconds", "num_steps", "total_tokens_M",
                "peak_vram_mb")  # the harness's figures of the best run: where the time went

REPLY_FORMAT = """\
You are an autonomous ML researcher. A harness runs your experiments: you propose ONE change to train.py, it
trains for the fixed time budget, measures val_bpb (lower is better) and keeps the change only if it beats the
best result by more than the noise margin; otherwise train.py goes back to the best version. You only ever see
the current best train.py.

Answer in plain text, in this format and nothing else:

DESCRIPTION: one line saying what this experiment tries (it becomes the commit message and the results row)
NOTE: optional; a line worth remembering for later experiments (an idea to try, a lesson). Any number of them.
<<<<<<< SEARCH
the exact lines of the current train.py to change, copied character for character, enough to be unique
=======
the new lines
>>>>>>> REPLACE

Use one or more SEARCH/REPLACE blocks, all for train.py (no other file may be changed). Keep each block small.
One idea per experiment, so the result says what caused it. Think briefly before the DESCRIPTION line if you
like; only the DESCRIPTION, NOTE and block lines are read."""

TOOL = {"type": "function", "function": {
    "name": "propose_edit",
    "description": "Propose the next experiment: one idea, as exact search/replace edits of train.py.",
    "parameters": {"type": "object", "required": ["description", "edits"], "properties": {
        "description": {"type": "string", "description": "one line: what this experiment tries"},
        "edits": {"type": "array", "items": {"type": "object", "required": ["search", "replace"], "properties": {
            "search": {"type": "string", "description": "exact lines of the current train.py"},
            "replace": {"type": "string", "description": "the new lines"}}}},
        "notes": {"type": "array", "items": {"type": "string"}, "description": "lines worth remembering"}}}}}


def read_text(path, default=""):
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return default


def program_rules(root):
    """The sections of program.md that hold for a driven model (set-up and shell commands are the driver's job)."""
    text = read_text(os.path.join(root, PROGRAM_FILE))
    sections, current = {}, None
    for line in text.split("\n"):
        if line.startswith("#"):
            title = line.lstrip("#").strip()
            current = title if title in RULE_SECTIONS else None
            if current:
                sections[current] = []
        if current:
            sections[current].append(line)
    picked = ["\n".join(sections[t]).strip() for t in RULE_SECTIONS if t in sections]
    return "\n\n".join(picked) if picked else text.strip()


def _val(r):
    v = r.get("val_bpb_mean") if r.get("val_bpb_mean") is not None else r.get("val_bpb")
    return v if isinstance(v, (int, float)) and r["verdict"] in ("keep", "discard") else None


def _desc(r):
    d = " ".join(str(r.get("description", "")).split())
    return d if len(d) <= DESCRIPTION_CHARS else d[:DESCRIPTION_CHARS - 3] + "..."


def result_line(r):
    val, before = _val(r), r.get("best_before")
    score = f"{val:.6f}" if val is not None else "-"
    delta = f" ({val - before:+.4f})" if val is not None and isinstance(before, (int, float)) else ""
    return f"#{r.get('exp', '?')} {r['verdict']:<9} {score}{delta}  {_desc(r)}"


def build(root, branch, last_crash=None, pending=(), guidance=None, in_history=None):
    """[system, user] messages for the next experiment. `in_history(commit)`: is a kept commit still on the
    branch (default: ask git)."""
    records = gate.branch_records(ledger.read_ledger(root), branch)
    in_history = in_history or gitops.history(root)
    best_rec, best = gate.best_kept(records, in_history)
    kept = gate.kept(records, in_history)
    exps = gate.experiments(records)
    m, _ = gate.margin(ledger.read_noise(root, branch))
    # what changes least comes first, so servers that cache a common prompt prefix (OpenAI, vLLM, llama.cpp,
    # mlx_lm.server) reuse it: the rules, then train.py (new only after a keep), then the results
    train = read_text(os.path.join(root, gitops.TRAIN_FILE))
    parts = [f"## Current train.py (the best version; your SEARCH text must match it exactly)\n```python\n"
             f"{train}```"]

    if best_rec:
        base = gate.reference_value(records, kept[0]["content_hash"])
        parts.append(f"## Best so far\nval_bpb {best:.6f} (commit {short(best_rec['commit'])}: "
                     f"{_desc(best_rec)}); baseline {base:.6f}; keep margin {m:.4f}. "
                     f"{len(exps)} experiments so far, {len(kept)} kept.")
        metrics = best_rec.get("metrics") or {}
        shown = [f"{k} {metrics[k]}" for k in BEST_METRICS if k in metrics]
        if shown:
            parts[-1] += "\nIts run: " + ", ".join(shown) + "."
        chain = [f"- {_desc(r)} -> {gate.reference_value(records, r['content_hash']) or float('nan'):.6f}"
                 for r in kept[-KEPT_SHOWN:]]
        earlier = f" ({len(kept) - KEPT_SHOWN} earlier ones not shown)" if len(kept) > KEPT_SHOWN else ""
        parts.append(f"## Kept changes that reached it, oldest first{earlier}\n" + "\n".join(chain))

    if exps:
        lines = [result_line(r) for r in exps[-LAST_RESULTS:]]
        parts.append(f"## Last {len(lines)} results (#, verdict, val_bpb, change vs the best at the time, "
                     "description)\n" + "\n".join(lines))
        shown = {id(r) for r in exps[-LAST_RESULTS:]}
        near = [r for r in exps if r["verdict"] == "discard" and id(r) not in shown and _val(r) is not None
                and isinstance(r.get("best_before"), (int, float)) and r["best_before"] - _val(r) > -m]
        near.sort(key=lambda r: _val(r) - r["best_before"])
        if near:
            parts.append("## Near misses (discarded, within the margin of the best at the time)\n"
                         + "\n".join(result_line(r) for r in near[:NEAR_MISSES]))

    notes = read_text(os.path.join(root, ledger.STATE_DIR, NOTES_FILE)).strip()
    if notes:
        if len(notes) > NOTES_CHARS:
            notes = "...\n" + notes[-NOTES_CHARS:].split("\n", 1)[-1]
        parts.append("## Your notes (from NOTE: lines)\n" + notes)

    recent = {r.get("exp") for r in exps[-CRASH_RECENT:]}
    if last_crash and last_crash.get("exp") in recent:
        tail = last_crash.get("tail", "")[-CRASH_CHARS:]
        parts.append(f"## Last crash: #{last_crash['exp']} {last_crash.get('description', '')!r}: "
                     f"{last_crash.get('reason', '')}\n```\n{tail}\n```")

    if pending:
        parts.append("## Running or queued now (don't propose these again)\n" + "\n".join(f"- {d}" for d in pending))

    ask = guidance or ("Propose the next experiment: one idea, different from what was already tried above."
                       if exps else "Propose the first experiment.")
    parts.append(ask)
    system = REPLY_FORMAT + "\n\n# Rules (from program.md)\n\n" + program_rules(root)
    return [{"role": "system", "content": system}, {"role": "user", "content": "\n\n".join(parts)}]


def size(messages):
    return sum(len(m["content"] or "") for m in messages)
