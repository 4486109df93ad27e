"""Shared set-up for the reliability suite (tests/test_reliability_*.py); it holds no tests itself.

The learners are entries of a temporary `--models` file that point the `openai-compatible`,
`openai`, `anthropic` and `replicate` adapters at `scaling_study.fake_server.FakeServer` on
127.0.0.1. Runs, cache and (where a test needs one) the whole project root live in pytest's
temporary folder, so the suite never touches `runs/` or `cache/` of the checkout and never sends
anything off this machine.

Guards can be switched off to show that a test catches the bug it is there for:
`RELIABILITY_REVERT=NAME pytest tests/test_reliability_*.py` applies the revert NAME from `REVERTS`
(see RELIABILITY.md for what each one makes fail).
"""
import hashlib, importlib, json, os, re, shutil, sys, threading, types
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from uuid import uuid4

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
BIN = Path(sys.executable).parent
KEY_VARS = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "REPLICATE_API_TOKEN", "FK_COMPAT_API_KEY",
            "FK_ECHO_API_KEY")

# the learners: provider, model id at the fake server, and a price row (USD per million tokens);
# prices are large so that a wrong token count moves the total by whole cents
MODELS = {
    "fk-compat": ("openai-compatible", "fk-compat-model",
                  dict(input=900.0, cached_input=90.0, output=1700.0)),
    "fk-openai": ("openai", "fk-openai-model",
                  dict(input=1100.0, cached_input=550.0, output=2300.0)),
    "fk-claude": ("anthropic", "fk-claude-model",
                  dict(input=1300.0, cached_input=130.0, cache_write=1625.0, output=3100.0)),
    "fk-llama": ("replicate", "meta/meta-llama-3-8b-instruct", dict(input=700.0, output=1900.0)),
}
ALL = tuple(MODELS)


def canaries() -> dict:
    "Recognisable dummy keys, new for every call; the random part is what the leak scans look for."
    tag = uuid4().hex
    return {"OPENAI_API_KEY": f"sk-test-CANARY-{tag}-openai",
            "ANTHROPIC_API_KEY": f"sk-ant-test-CANARY-{tag}-anthropic",
            "REPLICATE_API_TOKEN": f"r8_CANARY{tag}replicate",
            "FK_COMPAT_API_KEY": f"compat-CANARY-{tag}-compat",
            "FK_ECHO_API_KEY": f"sk-test-CANARY-{tag}-echo"}


def isolate(monkeypatch, tmp: Path, keys: dict | None = None) -> dict:
    "Point runs and cache at `tmp`, drop any real keys and proxies, set dummy `keys`; return them."
    keys = canaries() if keys is None else keys
    for var in (*KEY_VARS, "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                "all_proxy", "SCALING_STUDY_ROOT", "SCALING_STUDY_SANDBOX"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("SCALING_STUDY_RUNS", str(tmp/"runs"))
    monkeypatch.setenv("SCALING_STUDY_CACHE", str(tmp/"cache"))
    for k, v in keys.items(): monkeypatch.setenv(k, v)
    return keys


def child_env(tmp: Path, keys: dict, **more) -> dict:
    "The environment of a child process: this one's, minus real keys and proxies, plus `keys`."
    env = {k: v for k, v in os.environ.items() if k not in KEY_VARS and "PROXY" not in k.upper()}
    env.update(NO_PROXY="127.0.0.1,localhost", SCALING_STUDY_RUNS=str(tmp/"runs"),
               SCALING_STUDY_CACHE=str(tmp/"cache"), PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT/'tests'}",
               **keys)
    env.update({k: str(v) for k, v in more.items()})
    return env


# --- what the fake server answers --------------------------------------------------------------
def answer(kind, body) -> str:
    "A deterministic answer that differs by prompt and turn, so items take different paths."
    n = len(json.dumps(body)) % 7
    return f"Some working.\nFinal answer: {n}\nConfidence: {50 + n}%"


def usage(kind, body) -> dict:
    "Token counts that vary per request, with cached and cache-write tokens, so cost is a real sum."
    n = len(json.dumps(body))
    return dict(input_tokens=200 + n % 997, cached_tokens=n % 50, cache_write_tokens=n % 7,
                output_tokens=5 + n % 13)


def server(**kw):
    "A FakeServer with the suite's answers and usage (started by `with`)."
    from scaling_study.fake_server import FakeServer
    return FakeServer(**{"responder": answer, "usage": usage, **kw})


# --- configuration files -------------------------------------------------------------------------
def model_entries(srv, names=ALL, limits: dict | None = None, base_url: str | None = None) -> dict:
    out = {}
    for name in names:
        provider, mid, price = MODELS[name]
        urls = {"anthropic": srv.anthropic_base_url, "replicate": srv.replicate_base_url}
        url = base_url or urls.get(provider, srv.openai_base_url)
        price = {**price, "as_of": "2026-12-04", "source": "reliability test prices"}
        out[name] = dict(provider=provider, model=mid, base_url=url, price=price,
                         limits={"concurrency": 2, "timeout": 1.5, "connect_timeout": 1.0,
                                 **(limits or {})})
    return out


def write_config(tmp: Path, srv, names=ALL, datasets=None, limits=None, entries=None, **phase):
    "Write phase.yaml and models.yaml into `tmp`; return their paths."
    entries = entries if entries is not None else model_entries(srv, names, limits)
    (tmp/"models.yaml").write_text(yaml.safe_dump(entries))
    cfg = dict(name="rel", models=list(names), datasets=datasets or {"gsm8k": 3}, max_turns=2,
               max_tokens=64, budget_usd=1.0e6)
    cfg.update(phase)
    (tmp/"phase.yaml").write_text(yaml.safe_dump(cfg))
    return tmp/"phase.yaml", tmp/"models.yaml"


def run(phase: Path, models: Path, **kw) -> Path:
    "`run_phase` on the two files, looked up at call time so that a revert can replace it."
    from scaling_study import runner
    return runner.run_phase(config=phase, models=models, progress=False, **kw)


def read_jsonl(p: Path) -> list:
    return [json.loads(l) for l in p.read_text().splitlines() if l.strip()] if p.exists() else []


def read_run(d: Path):
    "(manifest, records, ledger) of the run folder `d`."
    man = json.loads((d/"manifest.json").read_text())
    return man, read_jsonl(d/"records.jsonl"), read_jsonl(d/"calls.jsonl")


def fast_retries(monkeypatch, **kw):
    "Make the runner's client retry after ~10 ms instead of seconds (Retry-After still applies)."
    from scaling_study import runner
    from scaling_study.providers import Client
    fast = partial(Client, **{"backoff": 0.01, "max_backoff": 0.05, **kw})
    monkeypatch.setattr(runner, "Client", fast)


# --- what the fake server says was spent ---------------------------------------------------------
def _call_cost(kind, u, price) -> float:
    "Dollars for one response's wire usage `u`, re-derived here from each API's token rules."
    if kind == "openai":  # prompt_tokens includes the cached ones
        n = ((u["input_tokens"] - u["cached_tokens"]) * price["input"]
             + u["cached_tokens"] * price["cached_input"])
    elif kind == "anthropic":  # input_tokens excludes cache reads and writes
        n = (u["input_tokens"] * price["input"] + u["cached_tokens"] * price["cached_input"]
             + u["cache_write_tokens"] * price["cache_write"])
    else: n = u["input_tokens"] * price["input"]  # Replicate reports input and output counts only
    return (n + u["output_tokens"] * price["output"]) / 1e6


def _is_generation(e) -> bool:
    "Whether the logged request `e` asked for an answer (Replicate polls and cancels excluded)."
    return e["method"] == "POST" and (e["path"] in ("/v1/chat/completions", "/v1/messages")
                                      or e["path"].endswith("/predictions"))


def server_spend(srv) -> tuple[float, int, int]:
    "(dollars, answers with usage, answers without usage) over every answer the server gave."
    by_id = {mid: price for _, mid, price in MODELS.values()}
    usd, priced, unpriced = 0.0, 0, 0
    for e in list(srv.log):
        if e["status"] != 200 or not _is_generation(e): continue
        if e["usage"] is None:
            unpriced += e["fault"] == "no_usage"
            continue
        usd += _call_cost(e["kind"], e["usage"], by_id[e["model"]])
        priced += 1
    return usd, priced, unpriced


def generation_requests(srv) -> int:
    "How many requests asked the server for an answer."
    return sum(1 for e in list(srv.log) if _is_generation(e))


def check_complete_run(d: Path, names, n_items: int, srv=None, sessions_spend: float | None = None):
    "Assert the invariants of a finished run: all items once, nothing lost or doubled, cost exact."
    man, records, ledger = read_run(d)
    # a clear final status: every planned item done, none failed
    assert man["status"] == "complete", man["status"]
    assert man["finished_at"]
    planned = len(names) * n_items
    assert (man["items_planned"], man["items_done"], man["items_failed"]) == (planned, planned, 0)
    # one record per (learner, item, turn); turns of each item are 0..k with no gap
    keys = [(r["model"], r["dataset"], r["item_id"], r["turn"]) for r in records]
    assert len(keys) == len(set(keys)), "a (model, item, turn) is recorded twice"
    per_item = {}
    for m, ds, i, t in keys: per_item.setdefault((m, ds, i), []).append(t)
    assert len(per_item) == len(names) * n_items
    assert all(sorted(ts) == list(range(len(ts))) for ts in per_item.values())
    assert not any(r["failed"] for r in records)
    # nothing paid twice; spend is the ledger's sum and the records' sum
    live = [c for c in ledger if not c["failed"]]
    paid_keys = [c["key"] for c in live]
    assert len(paid_keys) == len(set(paid_keys)), "a request was paid for twice"
    known = [c["cost_usd"] for c in live if c["cost_usd"] is not None]
    assert man["cost_usd"]["spent"] == pytest.approx(sum(known), abs=1e-9)
    assert man["cost_usd"]["unpriced_calls"] == sum(c["cost_usd"] is None for c in live)
    if srv is not None:
        usd, priced, unpriced = server_spend(srv)
        # every answer the server gave is in the ledger once; missing usage is unknown, never 0
        assert len(live) == priced + unpriced, (len(live), priced, unpriced)
        assert man["cost_usd"]["unpriced_calls"] == unpriced
        assert sum(r["cost_usd"] is None for r in records if not r["cached"]) == unpriced
        assert not any(c["cost_usd"] == 0 for c in live), "a paid call is recorded as free"
        want = usd if sessions_spend is None else sessions_spend
        assert round(man["cost_usd"]["spent"], 2) == round(want, 2)  # to the cent ...
        assert man["cost_usd"]["spent"] == pytest.approx(want, abs=1e-9)  # ... and far below it
    return man, records, ledger


# --- project roots and file snapshots -----------------------------------------------------------
def make_root(tmp: Path, datasets=("gsm8k",), link_data: bool = False) -> Path:
    "A throwaway project root: configs, the phase notebook and the data of `datasets`."
    root = tmp/"root"
    shutil.copytree(ROOT/"configs", root/"configs")
    (root/"nbs"/"phases").mkdir(parents=True)
    shutil.copy(ROOT/"nbs"/"phases"/"run_phase.ipynb", root/"nbs"/"phases"/"run_phase.ipynb")
    (root/"data").mkdir()
    for ds in datasets:
        src = ROOT/"data"/ds
        if link_data: (root/"data"/ds).symlink_to(src)
        else: shutil.copytree(src, root/"data"/ds)
    return root


def tree_digest(d: Path) -> dict:
    "Relative path -> sha256 of every file under `d` (empty if `d` does not exist)."
    if not d.exists(): return {}
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


# --- a hostile provider: echoes the caller's key in its error messages ---------------------------
class EchoServer:
    """Answers every POST with 401 and the caller's own key in the error text (mode '401+header':
    and in a `www-authenticate` header too), as some APIs do with a rejected key."""
    def __init__(self, mode: str = "401"):
        self.mode, self.seen = mode, []

    def __enter__(self):
        outer = self
        class H(BaseHTTPRequestHandler):
            def log_message(self, *a): pass
            def do_POST(self):
                n = int(self.headers.get("content-length") or 0)
                self.rfile.read(n)
                key = (self.headers.get("authorization") or "").removeprefix("Bearer ").strip() \
                    or self.headers.get("x-api-key") or ""
                outer.seen.append((self.path, key))
                if "/messages" in self.path:
                    body = {"type": "error", "error": {"type": "authentication_error",
                                                       "message": f"invalid x-api-key {key}"}}
                elif "/predictions" in self.path:
                    body = {"title": "Unauthenticated", "detail": f"Invalid token {key}",
                            "status": 401}
                else:
                    msg = f"Incorrect API key provided: {key}. Find your API key in your account."
                    body = {"error": {"message": msg,
                                      "type": "invalid_request_error", "param": None,
                                      "code": "invalid_api_key"}}
                data = json.dumps(body).encode()
                self.send_response(401)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                if outer.mode == "401+header":  # some servers also name the key in a header
                    self.send_header("www-authenticate", f"Bearer realm=api, key={key}")
                self.end_headers()
                self.wfile.write(data)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *a):
        self.httpd.shutdown()
        self.httpd.server_close()


def scan(keys: dict, blobs: dict) -> list:
    "(where, what) for every dummy key of `keys`, or 12 characters of the random tag they share."
    tag = next(iter(keys.values())).split("CANARY", 1)[1].strip("-_")[:32]
    needles = {v: v.encode() for v in keys.values()}
    needles.update({f"tag[{i}:{i + 12}]": tag[i:i + 12].encode() for i in range(len(tag) - 11)})
    return [(where, what) for where, data in blobs.items()
            for what, b in needles.items() if b in data]


def files_under(*dirs) -> dict:
    "Path -> bytes of every file under `dirs`."
    out = {}
    for d in dirs:
        d = Path(d)
        if d.is_file(): out[str(d)] = d.read_bytes()
        elif d.exists():
            out.update({str(p): p.read_bytes() for p in d.rglob("*") if p.is_file()})
    return out


# --- reverting a guard, to show that a test catches the bug the guard prevents --------------------
def scratch_copy(modname: str, pattern: str, new: str):
    "A scratch copy of module `modname`, the one match of the regex `pattern` replaced by `new`."
    mod = importlib.import_module(modname)
    src = Path(mod.__file__).read_text()
    found = re.findall(pattern, src, flags=re.S)
    if len(found) != 1:
        raise RuntimeError(f"revert: {pattern!r} matches {len(found)} times in {mod.__file__}; "
                           "update REVERTS.")
    copy = types.ModuleType(modname)
    copy.__file__, copy.__package__ = mod.__file__, modname.rpartition(".")[0]
    exec(compile(re.sub(pattern, new, src, flags=re.S), mod.__file__, "exec"), copy.__dict__)
    return copy


def _no_retries(mp):
    from scaling_study.providers import Client
    init = Client.__init__
    def no_retry_init(self, *a, **kw):
        init(self, *a, **kw)
        self.max_retries = 0
    mp.setattr(Client, "__init__", no_retry_init)
def _ignore_retry_after(mp):
    from scaling_study import remote
    mp.setattr(remote, "retry_after", lambda headers: None)
def _usage_missing_is_zero(mp):
    from scaling_study import remote
    from scaling_study.providers import Usage
    mp.setattr(remote, "no_usage", lambda entry: Usage())
def _long_timeouts(mp):
    from scaling_study import remote
    mp.setattr(remote, "timeouts", lambda entry: (30.0, 30.0))
def _strict_jsonl(mp):
    from scaling_study import runner
    def strict(p):
        if not p.exists(): return []
        return [json.loads(l) for l in p.read_bytes().splitlines() if l.strip()]
    mp.setattr(runner, "_read_jsonl_tolerant", strict)
def _cache_trusts_entries(mp):
    from scaling_study.cache import ResponseCache
    def trusting_get(self, key):
        raw = self._db.get(key)
        return None if raw is None else json.loads(raw)
    mp.setattr(ResponseCache, "get", trusting_get)
def _no_scrub(mp):
    from scaling_study import remote
    mp.setattr(remote, "scrub", lambda text, secret=None, limit=300: str(text))
def _no_package_scrub(mp):
    from scaling_study import package
    mp.setattr(package, "scrub_text", lambda text, values: (text, {}))
def _no_budget_check(mp):
    from scaling_study import runner
    copy = scratch_copy("scaling_study.runner", r"if budget is not None and \(.*?\):\n",
                        "if False:\n")
    mp.setattr(runner, "run_phase", copy.run_phase)
def _no_suggestions(mp):
    from scaling_study import core
    mp.setattr(core, "_suggest", lambda bad, allowed: "")
def _inherit_env(mp):
    from scaling_study import sandbox
    mp.setattr(sandbox, "_child_env",
               lambda home: dict(os.environ, HOME=home, PATH="/usr/bin:/bin"))

REVERTS = {
    "retries": ("the client gives up after the first failed attempt", _no_retries),
    "retry_after": ("Retry-After is ignored", _ignore_retry_after),
    "usage_zero": ("a response without usage is priced as 0 tokens", _usage_missing_is_zero),
    "timeouts": ("requests wait 30 s instead of the entry's timeout", _long_timeouts),
    "strict_jsonl": ("records.jsonl and calls.jsonl are read without dropping a partial last line",
                     _strict_jsonl),
    "cache_trust": ("cache entries are parsed with no fallback for damaged values",
                    _cache_trusts_entries),
    "scrub": ("provider error messages are kept as the SDK wrote them", _no_scrub),
    "package_scrub": ("the archive's text files are copied without masking keys",
                      _no_package_scrub),
    "budget_check": ("run_phase accepts a negative budget", _no_budget_check),
    "suggestions": ("config errors do not suggest the close match", _no_suggestions),
    "sandbox_env": ("the sandboxed program inherits the parent's environment", _inherit_env),
}


def apply_revert(mp) -> str | None:
    "Apply the revert named in $RELIABILITY_REVERT (if any) through the monkeypatch `mp`."
    name = os.environ.get("RELIABILITY_REVERT", "").strip()
    if not name: return None
    if name not in REVERTS:
        raise ValueError(f"RELIABILITY_REVERT={name!r}; known: {sorted(REVERTS)}")
    REVERTS[name][1](mp)
    return name


class _MP:
    "pytest's monkeypatch, as far as a child process needs it (the child never undoes a revert)."
    def setattr(self, obj, name, value): setattr(obj, name, value)


def apply_revert_in_child() -> str | None:
    "The same, in a child process started by a test (it never undoes the change; the child ends)."
    return apply_revert(_MP())
