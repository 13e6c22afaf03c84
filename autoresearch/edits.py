"""
The model's answer in plain text, parsed and applied to train.py:

    DESCRIPTION: one line saying what this experiment tries
    NOTE: an idea worth remembering (optional, any number of lines)
    <<<<<<< SEARCH
    the exact lines of train.py to replace
    =======
    the new lines
    >>>>>>> REPLACE

One or more blocks, optionally with a file name on the line above (it must be train.py) and inside ``` fences.
Anything wrong raises EditError with a reason the model can act on; nothing is written here.
"""

import difflib
import re
from dataclasses import dataclass, field

TRAIN_FILE = "train.py"
SEARCH_RE = re.compile(r"^\s*<{5,9}\s*SEARCH\s*$")
DIVIDER_RE = re.compile(r"^\s*={5,9}\s*$")
REPLACE_RE = re.compile(r"^\s*>{5,9}\s*REPLACE\s*$")
FILENAME_RE = re.compile(r"^[\w./\\-]+\.\w+$")      # a bare path such as train.py or src/model.py
DESCRIPTION_RE = re.compile(r"^\W*DESCRIPTION\W*:\s*(.*)$", re.I)
NOTE_RE = re.compile(r"^\W*NOTE\W*:\s*(.*)$", re.I)
THINKING_RE = re.compile(r"<think>.*?</think>", re.S)
MAX_DESCRIPTION = 200


class EditError(Exception):
    """Why a reply can't be applied; sent back to the model as is."""


@dataclass
class Proposal:
    description: str
    blocks: list                      # [(search, replace)], both with their trailing newline
    notes: list = field(default_factory=list)


def _file_label(line):
    """The file a block names on the line above it, or None. Markdown decorations are ignored."""
    text = line.strip().strip("`*#:").strip()
    text = re.sub(r"^(file|path)\s*:\s*", "", text, flags=re.I)
    return text if FILENAME_RE.match(text) else None


def parse(text):
    """Plain-text reply -> Proposal."""
    if not text or not text.strip():
        raise EditError("the reply was empty")
    # a reasoning model's thinking may hold drafts of blocks: only the answer after it counts
    text = THINKING_RE.sub("", text)
    lines = text.replace("\r\n", "\n").split("\n")
    description, notes, blocks = None, [], []
    i = 0
    while i < len(lines):
        line = lines[i]
        if SEARCH_RE.match(line):
            # the nearest non-fence line above the block may name its file
            j = i - 1
            while j >= 0 and lines[j].strip().startswith("```"):
                j -= 1
            label = _file_label(lines[j]) if j >= 0 else None
            if label and label.replace("\\", "/").split("/")[-1] != TRAIN_FILE:
                raise EditError(f"a block edits {label}: only {TRAIN_FILE} may be changed. Put the whole change in "
                                f"{TRAIN_FILE}.")
            search, replace, k = [], [], i + 1
            while k < len(lines) and not DIVIDER_RE.match(lines[k]):
                if SEARCH_RE.match(lines[k]) or REPLACE_RE.match(lines[k]):
                    raise EditError(f"block {len(blocks) + 1}: a SEARCH block needs a ======= line between the "
                                    "old and the new lines")
                search.append(lines[k])
                k += 1
            k += 1
            while k < len(lines) and not REPLACE_RE.match(lines[k]):
                if SEARCH_RE.match(lines[k]) or DIVIDER_RE.match(lines[k]):
                    raise EditError(f"block {len(blocks) + 1}: it does not end with a >>>>>>> REPLACE line")
                replace.append(lines[k])
                k += 1
            if k >= len(lines):
                raise EditError(f"block {len(blocks) + 1} is not closed: end every block with >>>>>>> REPLACE")
            blocks.append(("".join(s + "\n" for s in search), "".join(r + "\n" for r in replace)))
            i = k + 1
            continue
        m = DESCRIPTION_RE.match(line)
        if m and description is None and m.group(1).strip():
            description = " ".join(m.group(1).split())
        m = NOTE_RE.match(line)
        if m and m.group(1).strip():
            notes.append(" ".join(m.group(1).split()))
        i += 1
    if not blocks:
        raise EditError("no SEARCH/REPLACE block found. Answer with a DESCRIPTION: line and at least one block: "
                        "<<<<<<< SEARCH, the exact old lines of train.py, =======, the new lines, >>>>>>> REPLACE")
    if not description:
        raise EditError("no 'DESCRIPTION: ...' line: start the reply with one line saying what the experiment tries")
    return Proposal(description[:MAX_DESCRIPTION], blocks, notes)


def from_tool_call(args):
    """The arguments of a propose_edit tool call -> Proposal (same checks as the plain-text form)."""
    if not isinstance(args, dict):
        raise EditError("the propose_edit arguments must be a JSON object")
    description = " ".join(str(args.get("description") or "").split())
    edits = args.get("edits")
    if not isinstance(edits, list) or not edits:
        raise EditError("propose_edit needs a non-empty 'edits' list of {search, replace} objects")
    blocks = []
    for n, e in enumerate(edits, 1):
        if not isinstance(e, dict) or not isinstance(e.get("search"), str) or not isinstance(e.get("replace"), str):
            raise EditError(f"edit {n}: needs string fields 'search' and 'replace'")
        if e.get("file") not in (None, "", TRAIN_FILE):
            raise EditError(f"edit {n} edits {e['file']}: only {TRAIN_FILE} may be changed")
        blocks.append(tuple(s if s.endswith("\n") else s + "\n" for s in (e["search"], e["replace"])))
    if not description:
        raise EditError("propose_edit needs a 'description' of what the experiment tries")
    notes = [" ".join(str(n).split()) for n in (args.get("notes") or []) if str(n).strip()]
    return Proposal(description[:MAX_DESCRIPTION], blocks, notes)


def _find_loose(text, search):
    """Line spans of `text` equal to `search` when trailing whitespace is ignored (models often lose it)."""
    lines, want = text.split("\n"), [s.rstrip() for s in search.rstrip("\n").split("\n")]
    stripped = [s.rstrip() for s in lines]
    return [(i, i + len(want)) for i in range(len(lines) - len(want) + 1) if stripped[i:i + len(want)] == want]


def _not_found(text, search, n):
    first = next((s for s in search.split("\n") if s.strip()), "").strip()
    lines = text.split("\n")
    code = [line.split("  #")[0].strip() for line in lines]  # compare code, not trailing comments
    hint = ""
    close = difflib.get_close_matches(first.split("  #")[0].strip(), code, n=1, cutoff=0.6)
    if close:
        lineno = code.index(close[0]) + 1
        hint = f" The closest line in train.py is line {lineno}: {lines[lineno - 1].strip()!r}."
    return EditError(f"block {n}: the SEARCH text is not in the current train.py (its first line: {first!r})."
                     f"{hint} Copy the old lines exactly from the train.py shown above.")


def apply(text, blocks):
    """Apply the blocks in order to train.py's text; returns the new text, which must still compile."""
    for n, (search, replace) in enumerate(blocks, 1):
        if not search.strip():
            raise EditError(f"block {n}: the SEARCH part is empty; it must hold the exact lines to replace")
        count = text.count(search)
        if count == 1:
            text = text.replace(search, replace, 1)
            continue
        if count > 1:
            raise EditError(f"block {n}: the SEARCH text appears {count} times in train.py; include more "
                            "surrounding lines so it matches exactly once")
        inline = search.rstrip("\n")
        if "\n" not in inline and text.count(inline) == 1:  # part of one line, e.g. without its comment
            text = text.replace(inline, replace.rstrip("\n"), 1)
            continue
        spans = _find_loose(text, search)
        if len(spans) != 1:
            raise _not_found(text, search, n) if not spans else EditError(
                f"block {n}: the SEARCH text appears {len(spans)} times in train.py; include more surrounding lines")
        lines = text.split("\n")
        a, b = spans[0]
        text = "\n".join(lines[:a] + (replace.rstrip("\n").split("\n") if replace else []) + lines[b:])
    try:
        compile(text, TRAIN_FILE, "exec")
    except SyntaxError as e:
        raise EditError(f"the edited train.py does not compile: {e.msg} at line {e.lineno}: "
                        f"{(e.text or '').strip()!r}. Fix the edit.") from None
    except ValueError as e:  # null bytes and the like
        raise EditError(f"the edited train.py does not compile: {e}") from None
    return text
