"""
`autoresearch agent`: the experiment loop without a coding agent. Any OpenAI-compatible chat endpoint proposes one
change of train.py at a time; the harness runs it exactly as `autoresearch run` would (same gate, ledger,
results.tsv, revert) or, with --workers, through `submit`/`wait`; the next request is rebuilt from the files on
disk (context.py), so the verdict is fed back and the context never grows.

Stopping is always safe: Ctrl-C (or SIGTERM) during a run is handled by the harness (the run is recorded as
interrupted, the candidate commit undone, the edit left in train.py), anywhere else it simply ends the loop. The
next start resumes from the ledger: it re-runs an interrupted edit (agent.json remembers what it was), then asks
for the next one.

Files in .autoresearch/: agent.jsonl (every exchange with the model and every verdict, one JSON object a line),
agent.json (the agent's state, read by `status`), notes.md (the model's NOTE: lines), agent.lock.
"""

import email.utils
import fcntl
import json
import os
import signal
import time
from dataclasses import asdict, dataclass, field, replace

from autoresearch import common, context, edits, experiment, gate, gitops, ledger, runner
from autoresearch.common import Refusal

HELP = """\
Run the experiment loop unattended with any OpenAI-compatible chat model (OpenAI, OpenRouter, vLLM, Ollama,
llama.cpp, mlx_lm.server): needs `uv sync --extra agent`; the API key comes from $OPENAI_API_KEY (optional for
local servers). On an autoresearch/<tag> branch it runs the baseline and `noise` if the branch has none, then
asks the model for one change of train.py at a time (a DESCRIPTION line and SEARCH/REPLACE blocks), runs it
exactly like `autoresearch run` (or `submit`/`wait` with --workers) and feeds the verdict into the next request.

An edit that doesn't apply, doesn't compile, touches another file or repeats a tried train.py is sent back with
the reason and costs no experiment. API errors, timeouts and rate limits are retried with backoff. Ctrl-C stops
it safely at any time; the same command resumes from the ledger. Every exchange is logged in
.autoresearch/agent.jsonl; `autoresearch status` shows what the agent is doing. docs/agent.md says more.
"""

STATE_FILE = "agent.json"
LOG_FILE = "agent.jsonl"
LOCK_FILE = "agent.lock"
EDIT_RETRIES = 3          # replies per experiment whose edit may be sent back before starting afresh
FRESH_ROUNDS = 3          # fresh starts in a row with no usable edit before giving up
MAX_CRASHES = 3           # crashes in a row before asking for something different (and 2x that: stop)
API_RETRIES = 8           # failed API calls in a row before giving up (~20 minutes of backoff)
BACKOFF_FIRST = 2.0       # seconds; doubles per failure ($AUTORESEARCH_AGENT_BACKOFF changes it)
BACKOFF_MAX = 300.0
RETRY_AFTER_MAX = 900.0   # never sleep longer than this on a server's Retry-After
REQUEST_TIMEOUT = 600.0   # a local model on a laptop can take minutes to write a reply
RETRY_STATUS = {408, 409, 425, 429}  # plus every 5xx
CRASH_TAIL_LINES = 40


class Stop(Exception):
    """Why the loop ends, with the exit code."""

    def __init__(self, code, reason):
        super().__init__(reason)
        self.code = code


@dataclass
class Config:
    base_url: str
    model: str
    api_key: str = None
    max_experiments: int = None
    max_tokens: int = None
    max_cost: float = None
    price: tuple = None           # USD per million (input, output) tokens
    max_crashes: int = MAX_CRASHES
    edit_retries: int = EDIT_RETRIES
    api_retries: int = API_RETRIES
    request_timeout: float = REQUEST_TIMEOUT
    temperature: float = None
    tools: bool = False
    noise_runs: int = common.NOISE_RUNS
    workers: int = None           # parallel mode when set
    address: str = None
    run: common.Options = field(default_factory=common.Options)  # seed, budget, timeout, confirm, as for `run`


def say(*lines):
    common.say(*(f"agent: {line}" for line in lines))


def text_hash(text):
    return gitops.hash_bytes(text.encode())  # what gitops.content_hash gives for that file


def read_train(root):
    return gitops.read_train(root).decode()  # the edits work on text; bytes as they are, line endings included


def write_train(root, text):
    gitops.write_train(root, text.encode())


# ---------------------------------------------------------------------------
# the one narrow way into the harness

def run_options(cfg, description, **extra):
    """The options `autoresearch run` would get from the agent's command line, for one experiment."""
    return replace(cfg.run, description=description, **extra)


def run_one(opts):
    """`autoresearch run` in this process: (exit code, the experiment's ledger record or None)."""
    root = gitops.repo_root()
    before = len(ledger.read_ledger(root))
    code = experiment.run_experiment(opts)
    new = [r for r in ledger.read_ledger(root)[before:] if r["kind"] == "run"]
    return code, (new[-1] if new else None)


# ---------------------------------------------------------------------------
# state and log files

class State:
    """agent.json: what the agent is doing, its session counters, a pending edit and the last crash."""

    def __init__(self, root):
        self.path = os.path.join(ledger.state_dir(root), STATE_FILE)
        self.data = read_state(root) or {}

    def get(self, key, default=None):
        return self.data.get(key, default)

    def save(self, **changes):
        self.data.update(changes)
        ledger.write_atomic(self.path, json.dumps(self.data, indent=2, sort_keys=True) + "\n")

    def doing(self, what):
        self.save(doing=what, since=common.now_iso())


def read_state(root):
    return ledger.read_state_file(root, STATE_FILE)


def log_event(root, event, **fields):
    ledger.append_line(os.path.join(ledger.state_dir(root), LOG_FILE),
                       json.dumps({"time": common.now_iso(), "event": event, **fields}, default=str))


class AgentLock:
    """One agent per repository (the harness's own lock is taken by each run inside)."""

    def __init__(self, root):
        self.path = os.path.join(ledger.state_dir(root), LOCK_FILE)

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            info = read_state(os.path.dirname(os.path.dirname(self.path))) or {}
            raise Refusal(f"an agent is already running in this repository (pid {info.get('pid', '?')}); "
                          "stop it (Ctrl-C or kill -INT <pid>) before starting another.") from None
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


# ---------------------------------------------------------------------------
# the model

def retry_after(response):
    """Seconds a 429/503 asks us to wait (Retry-After in seconds or as a date, or retry-after-ms), else None."""
    headers = getattr(response, "headers", None) or {}
    try:
        if headers.get("retry-after-ms"):
            return float(headers["retry-after-ms"]) / 1000
        value = headers.get("retry-after")
        if not value:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class Model:
    """Chat completions with retries: API errors, timeouts and rate limits back off and try again."""

    def __init__(self, cfg, root, state):
        try:
            import openai
        except ImportError:
            raise Refusal("`autoresearch agent` needs the OpenAI client library: run `uv sync --extra agent`.") from None
        self.openai, self.cfg, self.root, self.state = openai, cfg, root, state
        self.backoff = float(os.environ.get("AUTORESEARCH_AGENT_BACKOFF") or BACKOFF_FIRST)
        # our own retries (below), so every failure is logged and Retry-After is honoured up to RETRY_AFTER_MAX
        self.client = openai.OpenAI(base_url=cfg.base_url, api_key=cfg.api_key or "not-needed",
                                    timeout=cfg.request_timeout, max_retries=0)

    def ask(self, messages, exp):
        """-> (reply text or None, tool-call arguments or None, usage dict)."""
        openai, cfg = self.openai, self.cfg
        kwargs = {"model": cfg.model, "messages": messages}
        if cfg.temperature is not None:
            kwargs["temperature"] = cfg.temperature
        if cfg.tools:
            kwargs["tools"] = [context.TOOL]
        for attempt in range(1, cfg.api_retries + 2):
            wait, t0 = None, time.monotonic()
            try:
                resp = self.client.chat.completions.create(**kwargs)
            except openai.APIStatusError as e:
                if e.status_code not in RETRY_STATUS and e.status_code < 500:
                    log_event(self.root, "api_error", exp=exp, status=e.status_code, error=str(e), fatal=True)
                    raise Stop(2, f"the API refused the request (HTTP {e.status_code}: {str(e)[:300]}). "
                                  "Check --base-url, --model and OPENAI_API_KEY.") from None
                why, wait = f"HTTP {e.status_code}", retry_after(e.response)
            except openai.APITimeoutError:
                why = f"no reply within {cfg.request_timeout:g} s"
            except openai.APIConnectionError as e:
                why = f"connection failed ({e.__cause__ or e})"
            else:
                return self._read(resp, exp, time.monotonic() - t0)
            log_event(self.root, "api_error", exp=exp, attempt=attempt, error=why, retry_after=wait)
            if attempt > cfg.api_retries:
                raise Stop(1, f"the API failed {attempt} times in a row (last: {why}); is the server up? "
                              "Start the agent again to resume.")
            wait = min(wait, RETRY_AFTER_MAX) if wait is not None else min(self.backoff * 2 ** (attempt - 1),
                                                                           BACKOFF_MAX)
            say(f"API error: {why}; retry {attempt}/{cfg.api_retries} in {wait:.0f} s")
            self.state.doing(f"waiting {wait:.0f} s to retry the API ({why})")
            time.sleep(wait)

    def _read(self, resp, exp, seconds):
        usage = getattr(resp, "usage", None)
        u = {"prompt_tokens": getattr(usage, "prompt_tokens", None) or 0,
             "completion_tokens": getattr(usage, "completion_tokens", None) or 0,
             "seconds": round(seconds, 2)}
        u["total_tokens"] = getattr(usage, "total_tokens", None) or u["prompt_tokens"] + u["completion_tokens"]
        cost = getattr(usage, "cost", None)  # OpenRouter reports it; otherwise --price
        if cost is None and self.cfg.price:
            cost = (u["prompt_tokens"] * self.cfg.price[0] + u["completion_tokens"] * self.cfg.price[1]) / 1e6
        u["cost"] = cost
        choices = getattr(resp, "choices", None) or []
        if not choices:
            return None, None, u
        msg = choices[0].message
        tool_args = None
        for call in getattr(msg, "tool_calls", None) or []:
            if getattr(call, "function", None) and call.function.name == context.TOOL["function"]["name"]:
                try:
                    tool_args = json.loads(call.function.arguments or "{}")
                except ValueError:
                    tool_args = {"_unparsable": call.function.arguments}
        return msg.content, tool_args, u


# ---------------------------------------------------------------------------
# the loop

class Agent:
    def __init__(self, root, branch, cfg, model, state):
        self.root, self.branch, self.cfg, self.model, self.state = root, branch, cfg, model, state
        self.done = 0  # experiments run (or submitted) by this session

    # --- what the ledger says
    def records(self):
        return gate.branch_records(ledger.read_ledger(self.root), self.branch)

    def in_history(self, commit):
        return gitops.is_ancestor(self.root, commit, "HEAD")

    def next_exp(self):
        return len(gate.experiments(self.records())) + 1

    # --- caps
    def check_caps(self):
        s = self.state.get("session", {})
        if self.cfg.max_tokens and s.get("tokens", 0) >= self.cfg.max_tokens:
            raise Stop(0, f"token cap reached ({s['tokens']} >= --max-tokens {self.cfg.max_tokens})")
        if self.cfg.max_cost is not None:
            if (s.get("cost") or 0) >= self.cfg.max_cost:
                raise Stop(0, f"cost cap reached (${s['cost']:.4f} >= --max-cost {self.cfg.max_cost:g})")

    def count_usage(self, u):
        s = dict(self.state.get("session", {}))
        s["requests"] = s.get("requests", 0) + 1
        s["tokens"] = s.get("tokens", 0) + u["total_tokens"]
        if u["cost"] is not None:
            s["cost"] = (s.get("cost") or 0) + u["cost"]
        elif s["requests"] == 1:
            s["cost"] = None
        self.state.save(session=s)
        if self.cfg.max_cost is not None and s.get("cost") is None:
            raise Stop(2, "--max-cost: the API reports no cost; pass --price IN OUT (USD per million tokens)")

    # --- asking for an edit
    def propose(self, guidance=None, pending=()):
        """Ask until a reply applies cleanly: -> (new train.py text, description)."""
        current = read_train(self.root)
        tried = {r["content_hash"]: r for r in gate.experiments(self.records()) if r["verdict"] != "interrupted"}
        exp = self.next_exp()
        for fresh in range(1, FRESH_ROUNDS + 1):
            base = context.build(self.root, self.branch, self.state.get("last_crash"), pending, guidance)
            follow_up = []
            for attempt in range(1, self.cfg.edit_retries + 1):
                self.check_caps()
                messages = base + follow_up
                self.state.doing(f"asking the model for experiment #{exp} (reply {attempt})")
                say(f"asking {self.cfg.model} for experiment #{exp} ({context.size(messages) / 1000:.1f} k characters)")
                text, tool_args, usage = self.model.ask(messages, exp)
                self.count_usage(usage)
                try:
                    if tool_args is not None:
                        proposal = edits.from_tool_call(tool_args)
                    else:
                        proposal = edits.parse(text)
                    new = edits.apply(current, proposal.blocks)
                    if new == current:
                        raise edits.EditError("the edit changes nothing in train.py")
                    if text_hash(new) in tried:
                        r = tried[text_hash(new)]
                        raise edits.EditError(f"this exact train.py was already run as #{r.get('exp')} "
                                              f"({r['verdict']}: {r['description']!r}); propose something else")
                    if text_hash(new) in {h for h, _ in pending_hashes(self)}:
                        raise edits.EditError("this exact train.py is already queued; propose something else")
                except edits.EditError as e:
                    log_event(self.root, "exchange", exp=exp, attempt=attempt, request_chars=context.size(messages),
                              messages=messages, reply=text, tool_args=tool_args, usage=usage, applied=False,
                              rejected=str(e))
                    say(f"reply {attempt} not applied: {e}")
                    shown = text if tool_args is None else json.dumps(tool_args)
                    follow_up = [{"role": "assistant", "content": shown or "(empty)"},
                                 {"role": "user", "content": f"Your edit was NOT applied and nothing was run: {e}\n"
                                  "Answer again in the required format (DESCRIPTION line, then SEARCH/REPLACE "
                                  "blocks against the train.py shown above)."}]
                    continue
                log_event(self.root, "exchange", exp=exp, attempt=attempt, request_chars=context.size(messages),
                          messages=messages, reply=text, tool_args=tool_args, usage=usage, applied=True,
                          description=proposal.description, notes=proposal.notes)
                say(f"reply {attempt} applied ({usage['seconds']:.0f} s, {usage['prompt_tokens']} + "
                    f"{usage['completion_tokens']} tokens): {proposal.description}"
                    + (f" (+{len(proposal.notes)} note{'s' * (len(proposal.notes) > 1)})" if proposal.notes else ""))
                if proposal.notes:
                    ledger.append_line(os.path.join(ledger.state_dir(self.root), context.NOTES_FILE),
                                       "\n".join(f"- #{exp}: {n}" for n in proposal.notes))
                return new, proposal.description
            say(f"no usable edit in {self.cfg.edit_retries} replies; asking afresh ({fresh}/{FRESH_ROUNDS})")
        raise Stop(1, f"the model gave no usable edit in {FRESH_ROUNDS * self.cfg.edit_retries} replies in a row; "
                      f"read {ledger.STATE_DIR}/{LOG_FILE}, maybe try a stronger model")

    # --- running it
    def run_edit(self, text, description):
        """Write the edit to train.py and run (or submit) it; the pending note lets a restart finish the job."""
        self.state.save(pending={"content_hash": text_hash(text), "description": description})
        write_train(self.root, text)
        if self.cfg.workers:
            from autoresearch import parallel
            self.state.doing(f"submitting {description!r}")
            parallel.submit(run_options(self.cfg, description), self.cfg.address, self.cfg.workers)
            self.state.save(pending=None)
            self.done += 1
            log_event(self.root, "submitted", description=description)
            return
        exp = self.next_exp()
        self.state.doing(f"running experiment #{exp}: {description}")
        code, rec = run_one(run_options(self.cfg, description))
        self.after_run(code, rec)
        self.done += 1

    def after_run(self, code, rec):
        if code in common.EXIT_SIGNAL.values() or (rec and rec["verdict"] == "interrupted"):
            raise Stop(code or 130, "interrupted during an experiment; its edit is kept in train.py and runs "
                                    "again when the agent starts again")
        self.state.save(pending=None)
        if rec is None:
            raise Stop(1, "the harness recorded no result (see the messages above)")
        self.note_verdict(rec)

    def note_verdict(self, rec, tail=None):
        log_event(self.root, "verdict", exp=rec.get("exp"), verdict=rec["verdict"], val_bpb=context._val(rec),
                  reason=rec.get("reason"), description=rec.get("description"), commit=rec.get("commit"))
        if rec["verdict"] == "crash":
            if tail is None:
                log = rec.get("log") or os.path.join(self.root, runner.LOG_FILE)
                try:
                    with open(log, errors="replace") as f:
                        lines = [s for s in f.read().replace("\r", "\n").split("\n") if s.strip()]
                    tail = "\n".join(lines[-CRASH_TAIL_LINES:])
                except OSError:
                    tail = "(log not found)"
            self.state.save(last_crash={"exp": rec.get("exp"), "description": rec.get("description"),
                                        "reason": rec.get("reason"), "tail": tail})

    # --- set-up: resume, baseline, noise
    def resume_pending(self):
        h = gitops.content_hash(self.root)
        pending = self.state.get("pending") or {}
        if not gitops.train_changed(self.root):
            # stopped between the harness's commit and the start of the run: the commit is there, unjudged
            ran = any(r["content_hash"] == h and r["verdict"] != "interrupted"
                      for r in gate.experiments(self.records()))
            if pending.get("content_hash") == h and not ran and not self.cfg.workers:
                say(f"resuming the interrupted experiment {pending['description']!r} (committed, never run)")
                self.run_edit(read_train(self.root), pending["description"])
            elif pending:
                self.state.save(pending=None)
            return
        description = pending.get("description") if pending.get("content_hash") == h else None
        if description is None:
            interrupted = [r for r in gate.experiments(self.records()) if r["verdict"] == "interrupted"]
            if interrupted and interrupted[-1]["content_hash"] == h:
                description = interrupted[-1]["description"]
        if description is None:
            raise Stop(2, "train.py has uncommitted edits the agent did not make: run them yourself "
                          "(`autoresearch run -m ...`) or discard them (`git checkout train.py`), then start again.")
        say(f"resuming the interrupted experiment {description!r}")
        self.run_edit(read_train(self.root), description)

    def ensure_baseline(self):
        if gate.kept(self.records(), self.in_history):
            return
        say("no baseline on this branch yet: running train.py as it is")
        self.state.doing("running the baseline")
        code, rec = run_one(run_options(self.cfg, "baseline", rerun=True))
        self.after_run(code, rec)
        if rec["verdict"] != "keep":
            raise Stop(1, f"the baseline failed ({rec['reason']}). The model can't fix the set-up: look at "
                          f"{runner.LOG_FILE}, fix train.py or the data (uv run prepare.py), then start again.")

    def ensure_noise(self):
        if self.cfg.noise_runs <= 0 or ledger.read_noise(self.root, self.branch) is not None:
            return
        say(f"no noise estimate on this branch yet: running the best train.py {self.cfg.noise_runs} more times")
        self.state.doing("measuring noise")
        code = experiment.run_noise(run_options(self.cfg, "", runs=self.cfg.noise_runs))
        if code in common.EXIT_SIGNAL.values():
            raise Stop(code, "interrupted while measuring noise; it runs again when the agent starts again")
        if code != common.EXIT_OK:
            raise Stop(1, f"a noise run failed; look at {runner.LOG_FILE}, then start again")

    def guidance(self):
        n = gate.crashes_in_row(self.records())
        if n >= 2 * self.cfg.max_crashes:
            raise Stop(1, f"{n} crashes in a row even after asking for something different; read "
                          f"{runner.LOG_FILE} (the set-up may be broken), then start again")
        if n >= self.cfg.max_crashes:
            return (f"The last {n} experiments crashed (see the last crash above); train.py is back at the best "
                    "version. Step back: propose something different and less risky, a small change that surely "
                    "runs.")
        return None

    def loop(self):
        self.resume_pending()
        self.ensure_baseline()
        self.ensure_noise()
        if self.cfg.workers:
            return self.parallel_loop()
        while self.cfg.max_experiments is None or self.done < self.cfg.max_experiments:
            guidance = self.guidance()
            text, description = self.propose(guidance)
            self.run_edit(text, description)
        raise Stop(0, f"{self.done} experiments done (--max-experiments)")

    def parallel_loop(self):
        """Keep every worker busy: top the queue up to one candidate per worker, then wait for a verdict."""
        from autoresearch import parallel
        seen = len(ledger.read_ledger(self.root))
        while True:
            pending = [d for _, d in pending_hashes(self)]
            while len(pending) < self.cfg.workers and (self.cfg.max_experiments is None
                                                       or self.done < self.cfg.max_experiments):
                text, description = self.propose(self.guidance(), pending)
                self.run_edit(text, description)
                pending = [d for _, d in pending_hashes(self)]
            if not pending:
                raise Stop(0, f"{self.done} experiments done (--max-experiments)")
            self.state.doing(f"waiting for verdicts ({len(pending)} queued or running)")
            code = parallel.wait(False, None, self.cfg.address, self.cfg.workers)
            if code != common.EXIT_OK:
                raise Stop(code, "interrupted while waiting; the queued candidates keep running, and the agent "
                                 "picks up their verdicts when it starts again")
            records = ledger.read_ledger(self.root)
            for r in records[seen:]:
                if r.get("branch") == self.branch and r["kind"] == "run":
                    self.note_verdict(r)
            seen = len(records)


def pending_hashes(agent):
    """(content hash, description) of this branch's candidates queued or running in parallel mode."""
    if not agent.cfg.workers:
        return []
    from autoresearch import candidates
    q = candidates.Queue(agent.root)
    return [(c["content_hash"], c["description"]) for c in q.pending(candidates.finished_ids(
        ledger.read_ledger(agent.root))) if c["branch"] == agent.branch]


# ---------------------------------------------------------------------------
# entry point and status

def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def run_agent(cfg):
    root = gitops.repo_root()
    branch = gitops.check_branch(root)
    gitops.check_clean(root, allow_train=True)
    records = gate.branch_records(ledger.read_ledger(root), branch)
    ledger.read_results(root)
    # settings the best kept run was not made with are refused now, not after the model's first reply
    experiment.Judgement(records, None, cfg.run, gitops.history(root), None).check_settings(
        experiment.planned_settings(cfg.run, here=not cfg.workers, root=root), branch)
    if cfg.workers:
        from autoresearch import parallel
        parallel.need_ray()
    with AgentLock(root):
        state = State(root)
        model = Model(cfg, root, state)
        state.save(pid=os.getpid(), status="running", model=cfg.model, base_url=cfg.base_url, branch=branch,
                   started=common.now_iso(), stopped=None, reason=None,
                   session={"requests": 0, "tokens": 0, "cost": 0.0, "experiments": 0})
        log_event(root, "start", model=cfg.model, base_url=cfg.base_url, branch=branch,
                  config={k: v for k, v in asdict(cfg).items() if k != "api_key"})
        say(f"{cfg.model} at {cfg.base_url}, branch {branch}"
            + (f", {cfg.workers} workers" if cfg.workers else "")
            + (f", at most {cfg.max_experiments} experiments" if cfg.max_experiments else ", until stopped")
            + f"; exchanges logged in {ledger.STATE_DIR}/{LOG_FILE}; Ctrl-C stops safely")
        agent = Agent(root, branch, cfg, model, state)
        saved = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            agent.loop()
        except Stop as e:
            code, reason = e.code, str(e)
        except Refusal as e:  # the harness refused a run (another command holds the repository, ...)
            code, reason = common.EXIT_REFUSED, f"the harness refused: {e}"
        except KeyboardInterrupt as e:
            name = str(e) or "SIGINT"
            code = common.EXIT_SIGNAL.get(name, 130)
            reason = f"stopped by {name} between experiments; nothing was lost"
        finally:
            signal.signal(signal.SIGTERM, saved)
        session = dict(state.get("session", {}), experiments=agent.done)
        state.save(status="stopped", stopped=common.now_iso(), reason=reason, doing=None, since=None, session=session)
        log_event(root, "stop", code=code, reason=reason, session=session)
    cost = f", ${session['cost']:.4f}" if session.get("cost") else ""
    say(f"stopped: {reason}",
        f"this session: {agent.done} experiments, {session['requests']} requests, {session['tokens']} tokens{cost}. "
        "Run the same command again to resume; `autoresearch status` shows where the branch stands.")
    return code


def status_lines(root):
    """One or two lines for `autoresearch status`, or none if the agent never ran here."""
    s = read_state(root)
    if not s:
        return []
    alive = False
    if s.get("status") == "running" and s.get("pid"):
        try:
            os.kill(s["pid"], 0)
            alive = True
        except (ProcessLookupError, PermissionError):
            pass
    sess = s.get("session") or {}
    usage = f"{sess.get('requests', 0)} requests, {sess.get('tokens', 0)} tokens" + (
        f", ${sess['cost']:.2f}" if sess.get("cost") else "")
    if alive:
        return [f"agent:           running, pid {s['pid']}, {s.get('model')}; {s.get('doing') or 'starting'} "
                f"(since {s.get('since') or s.get('started')})",
                f"                 this session: {usage}"]
    if s.get("status") == "running":
        return [f"agent:           pid {s.get('pid')} died without stopping cleanly (started {s.get('started')}); "
                "start it again to resume"]
    return [f"agent:           stopped {s.get('stopped')}: {s.get('reason')}",
            f"                 last session: {sess.get('experiments', 0)} experiments, {usage}"]


def add_arguments(p, checked):
    """The agent's own flags; `checked(...)` is the CLI's checked-number type, so a bad value is refused like any
    other setting (the run settings --seed, --budget, --timeout and the parallel ones are added by the CLI)."""
    env = os.environ.get
    count, count0, amount = checked(integer=True), checked(integer=True, low_ok=True), checked(low_ok=True)
    p.add_argument("--base-url", default=env("OPENAI_BASE_URL"),
                   help="the chat-completions endpoint, e.g. https://api.openai.com/v1, https://openrouter.ai/api/v1, "
                        "http://localhost:8080/v1 (mlx_lm.server, llama.cpp), http://localhost:11434/v1 (Ollama) "
                        "(default: $OPENAI_BASE_URL)")
    p.add_argument("--model", default=env("AUTORESEARCH_MODEL"), help="model name (default: $AUTORESEARCH_MODEL)")
    p.add_argument("--max-experiments", type=count, default=None,
                   help="stop after this many experiments proposed by the model (the baseline and noise runs of the "
                        "set-up don't count)")
    p.add_argument("--max-tokens", type=count, default=None, help="stop after this many tokens (this session)")
    p.add_argument("--max-cost", type=amount, default=None,
                   help="stop after this many USD (from the API's usage.cost, else --price)")
    p.add_argument("--price", type=amount, nargs=2, metavar=("IN", "OUT"), default=None,
                   help="USD per million input and output tokens, to count cost when the API doesn't")
    p.add_argument("--max-crashes", type=count, default=MAX_CRASHES,
                   help="crashes in a row before asking for something different (twice as many: stop) "
                        "(default %(default)s)")
    p.add_argument("--edit-retries", type=count, default=EDIT_RETRIES,
                   help="replies per experiment whose edit may be sent back (default %(default)s)")
    p.add_argument("--api-retries", type=count0, default=API_RETRIES,
                   help="API errors, timeouts or rate limits in a row before stopping (default %(default)s)")
    p.add_argument("--request-timeout", type=checked(), default=REQUEST_TIMEOUT,
                   help="seconds to wait for one reply (default %(default)g)")
    p.add_argument("--temperature", type=amount, default=None, help="sampling temperature (default: the server's)")
    p.add_argument("--tools", action="store_true",
                   help="also offer a propose_edit tool (plain-text replies keep working)")
    p.add_argument("--noise-runs", type=count0, default=common.NOISE_RUNS,
                   help="noise runs after the baseline if the branch has no estimate (0: skip) (default %(default)s)")
    p.add_argument("--confirm", type=count0, default=common.CONFIRM_SEEDS,
                   help="extra seeds for a borderline candidate (default %(default)s)")


def from_args(args, run, address=None, workers=None):
    """The agent's Config from its parsed flags, the run options `cli.run_options` checked and the parallel-mode
    settings of `cli.cluster_options` (the same checks and defaults as `run` and `submit`)."""
    if not args.base_url:
        raise Refusal("--base-url is missing: the OpenAI-compatible endpoint, e.g. --base-url http://localhost:8080/v1")
    if not args.model:
        raise Refusal("--model is missing: the model name the endpoint serves, e.g. --model gpt-4.1")
    return Config(base_url=args.base_url, model=args.model, api_key=os.environ.get("OPENAI_API_KEY"),
                  max_experiments=args.max_experiments, max_tokens=args.max_tokens, max_cost=args.max_cost,
                  price=tuple(args.price) if args.price else None, max_crashes=args.max_crashes,
                  edit_retries=args.edit_retries, api_retries=args.api_retries,
                  request_timeout=args.request_timeout, temperature=args.temperature, tools=args.tools,
                  noise_runs=args.noise_runs, workers=workers, address=address,
                  run=replace(run, confirm=args.confirm))
