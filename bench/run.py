"""Performance benchmarks of scaling_study, each figure printed against a bound measured in the same run.

Run from the repository root:

    .venv/bin/python bench/run.py              # full run, 5-8 minutes on 2 cores
    .venv/bin/python bench/run.py --quick      # smaller sizes, about 3 minutes
    .venv/bin/python bench/run.py --only cache live
    .venv/bin/python bench/run.py --readme     # full run, then its table into bench/README.md

Results go to bench/results/latest.json (full run), latest-quick.json (--quick) or
partial.json (--only; not committed). One run at a time: a second refuses to start, since two
runs would skew each other's figures. Exit code 1 if any judged target is missed.

Sections (all offline; every server is on 127.0.0.1 and started and stopped here):
  cache    one cached call through Client (Request, key, lookup, Call) vs a bare diskcache get
  grid     a phase-3-sized grid (7 learners x 5 datasets x up to 1000 items x 4 turns, 108,304
           calls) warmed either by the real runner against a fake server (--grid-fill runner,
           about 6-8 minutes; the default with --quick, at 100 items a dataset) or straight into the
           cache under the keys the runner computes (default), then replayed by run_phase from
           the warm cache in a child process: wall time, peak RSS, and 0 live calls as the check
  live     calls/s through Client against `python -m scaling_study.fake_server` (latency 0.1 s) vs a
           bare AsyncOpenAI loop on the same server; an rpm-limited run; Inspect AI if installed
  local    tokens/s of the `local` provider vs plain llama-cpp-python on the same GGUF
  scoring  sandboxed HumanEval programs per second, cold and from the verdict cache

Nothing here writes to the project's cache/ or runs/: SCALING_STUDY_CACHE and SCALING_STUDY_RUNS
point at a temporary folder that is removed at the end (unless --keep).
"""
from __future__ import annotations
import argparse, ast, asyncio, json, os, platform, re, resource, shutil, signal, subprocess, sys
import tempfile, threading, time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
PY = sys.executable
INSPECT_PY = Path(os.environ.get("INSPECT_PYTHON", "/tmp/inspect-venv/bin/python"))
GRID_DATASETS = {"gsm8k": 1000, "superglue-boolq": 1000, "superglue-multirc": 1000,
                 "superglue-wic": 1000, "superglue-rte": 1000}
GRID_MODELS = 7
GRID_TURNS = 3  # max_turns as in configs/phases/phase3.yaml: turns 0..3, so up to 4 calls an item


def log(msg: str) -> None: print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# results table

ROWS: list[dict] = []

def row(section, metric, measured, bound="", ratio=None, target="", ok=None, note=""):
    "Record one figure: what was measured, what it is compared with, and whether it meets its target."
    r = dict(section=section, metric=metric, measured=measured, bound=bound,
             ratio=None if ratio is None else round(ratio, 3), target=target, ok=ok, note=note)
    ROWS.append(r)
    mark = {True: "ok", False: "MISS", None: "-"}[ok]
    log(f"{section}: {metric}: {measured} | bound {bound} | ratio {r['ratio']} | {target} {mark}")
    return r

def table(rows) -> str:
    "The rows as a markdown table."
    head = "| section | figure | measured | bound / reference | ratio | target | met |"
    out = [head, "|" + "---|" * 7]
    for r in rows:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}"
        met = {True: "yes", False: "**no**", None: ""}[r["ok"]]
        out.append(f"| {r['section']} | {r['metric']} | {r['measured']} | {r['bound']} | {ratio} | "
                   f"{r['target']} | {met} |")
    return "\n".join(out)

def machine() -> dict:
    "nproc, CPU model, load average and memory, for the README."
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"): cpu = line.split(":", 1)[1].strip(); break
    except OSError: pass
    mem = "?"
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        mem = f"{kb / 2**20:.1f} GiB"
    except (OSError, AttributeError): pass
    return dict(nproc=os.cpu_count(), cpu=cpu, memory=mem, load=[round(x, 2) for x in os.getloadavg()],
                python=platform.python_version(), platform=platform.platform(),
                date=datetime.now(timezone.utc).isoformat(timespec="seconds"))

def git_state() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                "scaling_study"], cwd=ROOT, capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return head + (" (scaling_study/ has uncommitted edits)" if dirty else "")
    except (OSError, subprocess.SubprocessError): return "?"


# ---------------------------------------------------------------------------------------------
# fake servers in their own processes

class Server:
    "A fake server in a child process: the product's own CLI, or this file's `serve` helper."
    def __init__(self, args: list[str], env=None):
        self.err = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a full pipe would block it
        self.proc = subprocess.Popen([PY, *args], cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=self.err, text=True, env=env)
        self.url, self.lines = None, []
        try: self._wait_for_url(deadline=time.monotonic() + 30)
        except BaseException:
            self.proc.kill(); self.proc.wait(); self.err.close()
            raise

    def _wait_for_url(self, deadline: float) -> None:
        import selectors
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while self.url is None:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(timeout=left):
                    raise RuntimeError("fake server did not print its url within 30 s")
                line = self.proc.stdout.readline()
                if not line:
                    self.proc.wait(timeout=10); self.err.seek(0)
                    raise RuntimeError(f"fake server did not start: {self.err.read()[-800:]}")
                self.lines.append(line)
                m = re.match(r"(?:url )?(http://127\.0\.0\.1:\d+)\s*$", line.strip())
                if m: self.url = m.group(1)

    @property
    def openai_base_url(self) -> str: return self.url + "/v1"

    def stop(self) -> str:
        "SIGTERM the server (by its pid) and return what it printed after its url."
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try: out, _ = self.proc.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill(); out, _ = self.proc.communicate()
        else: out, _ = self.proc.communicate()
        self.err.close()
        return out or ""

    def __enter__(self): return self
    def __exit__(self, *a): self.stop()


def _vary(kind: str, body: dict) -> str:
    "An answer that changes every turn and parses for each grid dataset, so no item stops early."
    msgs = body.get("messages") or []
    turn = sum(1 for m in msgs if m.get("role") == "assistant")
    first = next((m.get("content", "") for m in msgs if m.get("role") == "user"), "")
    if "not_entailment" in first: ans = ("entailment", "not_entailment")[turn % 2]
    elif "correct options" in first: ans = ("1", "2", "1, 2", "none")[turn % 4]
    elif "<label> is one of: yes, no" in first: ans = ("yes", "no")[turn % 2]
    else: ans = str(40 + turn)
    return (f"Let me work through this carefully, step by step, checking each part.\n"
            f"Final answer: {ans}\nConfidence: {60 + 10 * turn}%")

def serve_main(argv) -> int:
    "Child process: a FakeServer with a per-turn answer and a configurable rate-limit window."
    ap = argparse.ArgumentParser(prog="bench/run.py serve")
    ap.add_argument("--latency", type=float, default=0.0)
    ap.add_argument("--rpm", type=int, default=None)
    ap.add_argument("--window", type=float, default=60.0)
    ap.add_argument("--vary", action="store_true")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from scaling_study.fake_server import FakeServer
    srv = FakeServer(latency=a.latency, rpm=a.rpm, rpm_window=a.window,
                     responder=_vary if a.vary else None).start()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM): signal.signal(sig, lambda *_: stop.set())
    print(f"url {srv.url}", flush=True)
    while not stop.wait(0.2): pass
    counts = {str(k): v for k, v in srv.counts().items()}
    srv.stop()
    print(json.dumps({"status_counts": counts}), flush=True)
    return 0

def _server_counts(text: str) -> dict:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try: return json.loads(line).get("status_counts", {})
            except ValueError: pass
        m = re.search(r"requests by status: (\{.*\})", line)
        if m:
            try: return {str(k): v for k, v in ast.literal_eval(m.group(1)).items()}
            except (ValueError, SyntaxError): pass
    return {}


# ---------------------------------------------------------------------------------------------
# 1a. cached call vs bare diskcache get

def bench_cache(quick: bool, work: Path) -> None:
    "Per-call time of a cached call through the full path vs a bare get of the same stored value."
    from scaling_study.cache import ResponseCache
    from scaling_study.core import PhaseConfig, model_entry, canonical_json
    from scaling_study.datasets import DATASETS, load
    from scaling_study.loop import CONFIDENCE_ASK, REVIEW, SYSTEM, _request
    from scaling_study.providers import Client, Completion, Usage

    # a phase's shape: GSM8K's 1,319 items x turns 0-3 x 4 learners, every request distinct and
    # asked once, learner by learner; each answer names its learner, item and turn, so later turns
    # carry new text as a real run's do
    models, turns = [f"bench-m{i}" for i in range(1, 5)], 4
    reg = {m: model_entry(m, dict(provider="openai-compatible", model=m,
                                  base_url="http://127.0.0.1:9/v1",
                                  price=dict(input=0.15, output=0.60))) for m in models}
    cfg = PhaseConfig(name="bench", models=models, datasets={"gsm8k": 1319})
    template = "gsm8k-v1|intrinsic-v1|loop-v1"
    items = load("gsm8k", 1319, seed=0)
    calls = []  # (model, messages, answer), in the order the runner asks them
    for name in models:
        for it in items:
            m = [{"role": "system", "content": SYSTEM},
                 {"role": "user", "content": f"{DATASETS['gsm8k'].prompt(it)}\n{CONFIDENCE_ASK}"}]
            for t in range(turns):
                answer = f"{name}, {it['id']}, turn {t}: 6 x 7 = 42.\nFinal answer: 42\nConfidence: 80%"
                calls.append((name, m, answer))
                m = m + [{"role": "assistant", "content": answer}, {"role": "user", "content": REVIEW}]
    n_calls = len(calls)
    cache = ResponseCache(work/"cache-micro")
    keys = []
    for name, m, answer in calls:
        k = _request(reg[name], cfg, m, template).key
        cache.set(k, {**Completion(answer, Usage(100, 0, 0, 20), "stop").to_dict(),
                      "paid_by": "bench", "cost_usd": 0.0001})
        keys.append(k)
    if len(set(keys)) != n_calls: raise RuntimeError("expected every request to be distinct")
    db = cache._db

    def bare() -> float:
        t0 = time.perf_counter()
        for k in keys: db.get(k)
        return (time.perf_counter() - t0) / n_calls

    client = Client(reg, cache)
    async def full_loop():
        t0 = time.perf_counter()
        for i, (name, m, _) in enumerate(calls):
            call = await client.complete(name, _request(reg[name], cfg, m, template))
            rec = dict(model=name, turn=i % turns, response=call.text, cached=call.cached,
                       input_tokens=call.usage.total_input, output_tokens=call.usage.output_tokens,
                       cost_usd=call.cost_usd, would_cost_usd=call.would_cost_usd, request_key=call.key)
            if not rec["cached"]: raise RuntimeError("expected a cache hit")
        return (time.perf_counter() - t0) / n_calls
    def full() -> float: return asyncio.run(full_loop())

    # interleave, best of 3 each: the machine is shared and noisy
    b, f = bare(), full()  # warm-up
    bs, fs = [], []
    for _ in range(3): bs.append(bare()); fs.append(full())
    b, f = min(bs), min(fs)
    row("cache", f"cached call, full path ({n_calls:,} distinct calls)", f"{f*1e6:.1f} us/call",
        f"bare diskcache get {b*1e6:.1f} us", f / b, "<= 3.0x bare get", f / b <= 3.0)

    # where the time goes: the key, the lookup with its JSON decode, and the rest (Call, cost, await)
    def per(fn):
        t0 = time.perf_counter()
        for i in range(n_calls): fn(i)
        return (time.perf_counter() - t0) / n_calls
    reqs = [_request(reg[name], cfg, m, template) for name, m, _ in calls]
    k_now = min(per(lambda i: reqs[i].key) for _ in range(3))
    g = min(per(lambda i: cache.get(keys[i])) for _ in range(3))
    avg_len = sum(len(canonical_json(dict(vars(r)))) for r in reqs) / n_calls
    row("cache", "  of which Request.key", f"{k_now*1e6:.1f} us", f"bare get {b*1e6:.1f} us", k_now / b,
        "", None, f"canonical JSON ({avg_len:.0f} bytes on average, turns 0-3) + sha256")
    row("cache", "  of which ResponseCache.get", f"{g*1e6:.1f} us", f"bare get {b*1e6:.1f} us", g / b,
        "", None, f"the bare get plus json.loads of the stored answer; the remaining "
        f"{(f - k_now - g)*1e6:.1f} us are Request, Completion, Call, cost and the await")
    cache.close()


# ---------------------------------------------------------------------------------------------
# 1b. phase-3-sized grid: fill with the real runner, replay from the warm cache

def _grid_files(work: Path, base_url: str, concurrency: int) -> tuple[Path, Path]:
    import yaml
    models = {f"bench-m{i}": dict(
        provider="openai-compatible", model=f"fake-learner-{i}", base_url=base_url,
        params={"count": None, "source": "unknown"},
        price=dict(input=0.0, cached_input=0.0, cache_write=0.0, output=0.0, as_of="2026-12-04",
                   source="bench: fake server, no charge"),
        limits=dict(concurrency=concurrency)) for i in range(1, GRID_MODELS + 1)}
    phase = dict(name="bench-grid", description="bench/run.py: phase-3-sized grid on a fake server",
                 models=list(models), datasets=dict(GRID_DATASETS), feedback="intrinsic",
                 max_turns=GRID_TURNS, temperature=0.0, max_tokens=1024, budget_usd=0.0, seed=0)
    mp, pp = work/"grid-models.yaml", work/"grid-phase.yaml"
    mp.write_text(yaml.safe_dump(models, sort_keys=False))
    pp.write_text(yaml.safe_dump(phase, sort_keys=False))
    return mp, pp

def phase_main(argv) -> int:
    "Child process: run_phase on the bench grid, then print wall time, peak RSS and the manifest."
    ap = argparse.ArgumentParser(prog="bench/run.py phase")
    ap.add_argument("--config"); ap.add_argument("--models"); ap.add_argument("--limit", type=int)
    ap.add_argument("--profile", help="write a cProfile of run_phase to this file")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    sys.path.insert(0, str(ROOT))
    import logging
    logging.basicConfig(level=logging.WARNING, format="  phase child: %(levelname)s %(name)s: %(message)s")
    from scaling_study.runner import run_phase
    t_import = time.perf_counter() - t0
    t1 = time.perf_counter()
    kw = dict(config=a.config, models=a.models, limit=a.limit, yes=True, progress=False)
    if a.profile:
        import cProfile
        prof = cProfile.Profile()
        run_dir = prof.runcall(run_phase, **kw)
        prof.dump_stats(a.profile)
    else: run_dir = run_phase(**kw)
    wall = time.perf_counter() - t1
    man = json.loads((run_dir/"manifest.json").read_text())
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps(dict(wall_s=wall, import_s=t_import, maxrss_mb=ru.ru_maxrss / 1024,
                          cpu_s=ru.ru_utime + ru.ru_stime, run_dir=str(run_dir), status=man["status"],
                          calls=man["calls"], records=man["records"], items_done=man["items_done"],
                          items_planned=man["items_planned"],
                          records_mb=(run_dir/"records.jsonl").stat().st_size / 2**20)), flush=True)
    return 0

def _run_phase_child(env, mp, pp, limit, profile=None) -> dict:
    cmd = [PY, str(Path(__file__).resolve()), "phase", "--config", str(pp), "--models", str(mp)]
    if limit: cmd += ["--limit", str(limit)]
    if profile: cmd += ["--profile", str(profile)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0: raise RuntimeError(f"phase child failed ({r.returncode}): {r.stderr[-2000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["command_wall_s"] = wall
    warn = [l for l in r.stderr.splitlines() if "WARNING" in l]
    if warn: log(f"phase child warnings ({len(warn)}): {warn[:3]}")
    return out

def _fill_direct(mp: Path, pp: Path, limit, directory: Path) -> int:
    "Store every answer of the grid under the key run_item will compute for it; returns the count."
    from scaling_study.cache import ResponseCache
    from scaling_study.core import load_phase
    from scaling_study.datasets import DATASETS
    from scaling_study.loop import CONFIDENCE_ASK, POLICIES, PROMPT_VERSION, REVIEW, SYSTEM, _request
    from scaling_study.providers import Completion, Usage
    from scaling_study.runner import plan
    cfg, reg = load_phase(config=pp, models=mp)
    if cfg.feedback != "intrinsic": raise ValueError("the direct fill follows the intrinsic policy only")
    pol, pl = POLICIES[cfg.feedback], plan(cfg, limit)
    usage = Usage(input_tokens=100, cached_input_tokens=0, output_tokens=20, reasoning_tokens=0)
    cache, n = ResponseCache(directory), 0
    for ds, v in pl.items():
        spec = DATASETS[ds]
        template = f"{spec.template_version}|{pol.version}|{PROMPT_VERSION}"
        for name in cfg.models:
            with cache._db.transact():  # one sqlite transaction per (dataset, learner)
                for it in v["items"]:
                    msgs = [{"role": "system", "content": SYSTEM},
                            {"role": "user", "content": f"{spec.prompt(it)}\n{CONFIDENCE_ASK}"}]
                    for t in range(cfg.max_turns + 1):
                        text = _vary("openai", {"messages": msgs})
                        key = _request(reg[name], cfg, msgs, template).key
                        cache.set(key, {**Completion(text, usage, "stop").to_dict(),
                                        "paid_by": "bench-direct-fill", "cost_usd": 0.0})
                        n += 1
                        msgs = msgs + [{"role": "assistant", "content": text},
                                       {"role": "user", "content": REVIEW}]
    cache.close()
    return n

def bench_grid(quick: bool, work: Path, fill: str, profile: bool) -> None:
    "Fill a phase-3-sized grid through the real runner, then time its replay from the warm cache."
    limit = 100 if quick else None
    env = dict(os.environ, SCALING_STUDY_RUNS=str(work/"grid-runs"),
               SCALING_STUDY_CACHE=str(work/"grid-cache"), PYTHONPATH=str(ROOT))
    with Server([str(Path(__file__).resolve()), "serve", "--latency", "0", "--vary"]) as srv:
        mp, pp = _grid_files(work, srv.openai_base_url, concurrency=16)

        # fill: the real runner, every call live against the fake server (latency 0), or straight
        # into the cache under the keys the runner computes (checked by the replay: 0 live calls)
        if fill == "auto": fill = "runner" if quick else "direct"
        log(f"grid: filling the cache ({fill}, {'limit 100' if quick else 'full grid'})")
        if fill == "runner":
            filled = _run_phase_child(env, mp, pp, limit)
            row("grid", "fill through run_phase (live, fake server latency 0)",
                f"{filled['calls']['live']:,} calls in {filled['command_wall_s']:.0f} s",
                "", None, "", None,
                f"{filled['calls']['live'] / filled['wall_s']:.0f} calls/s; {filled['items_done']:,} items")
        else:
            t0 = time.perf_counter()
            n = _fill_direct(mp, pp, limit, work/"grid-cache"/"requests")
            dt = time.perf_counter() - t0
            row("grid", "fill straight into ResponseCache (runner's keys)", f"{n:,} entries in {dt:.0f} s",
                "", None, "", None, "keys from loop._request on the intrinsic turn sequence; the "
                "replay below must then make 0 live calls")

        # replay: the same command, everything from the cache
        log("grid: replaying the same command from the warm cache")
        prof_path = work/"grid-replay.prof" if profile else None
        rep = _run_phase_child(env, mp, pp, limit)
        if prof_path:
            _run_phase_child(env, mp, pp, limit, profile=prof_path)
            keep = Path(tempfile.gettempdir())/"scaling-bench-grid-replay.prof"
            shutil.copy(prof_path, keep)
            log(f"cProfile of the replay: {keep} (read it with python -m pstats)")
        n_calls, live = rep["calls"]["cached"] + rep["calls"]["live"], rep["calls"]["live"]
        per_call = rep["wall_s"] / max(1, n_calls)
        tgt_s = 60.0  # for the full grid; quick mode reports without judging (fixed costs dominate)
        row("grid", f"replay wall time, {n_calls:,} calls ({rep['records']:,} records)",
            f"{rep['command_wall_s']:.1f} s (run_phase {rep['wall_s']:.1f} s)",
            f"{per_call*1e6:.0f} us per call in run_phase", None,
            "(full grid: < 60 s)" if quick else "< 60 s, 0 live calls",
            None if quick and not live else rep["command_wall_s"] < tgt_s and not live,
            f"live calls in replay: {rep['calls']['live']}; CPU {rep['cpu_s']:.1f} s (incl. imports)")
        row("grid", "replay peak RSS", f"{rep['maxrss_mb']:.0f} MB", "", None,
            "(full grid: < 1024 MB)" if quick else "< 1024 MB",
            rep["maxrss_mb"] < 1024 if not quick else None,
            f"records.jsonl {rep['records_mb']:.0f} MB"
            + ("; quick size, not the target size" if quick else ""))
        if live: log(f"replay made {live} live calls: the keys were not stable, so it was not a replay")


# ---------------------------------------------------------------------------------------------
# 2. live throughput against the fake server

def _live_request(i: int, base_url: str):
    from scaling_study.cache import Request
    return Request(provider="openai-compatible", model="fake-live", endpoint=base_url,
                   messages=[{"role": "system", "content": "You are a careful problem solver."},
                             {"role": "user", "content": f"Question {i}: what is 6 times 7?"}],
                   max_tokens=64)

async def _workers(conc: int, total: int, one) -> tuple[float, int]:
    "Run `total` calls of `one(i)` with `conc` workers; (wall seconds, completed)."
    counter = iter(range(total))
    done = 0
    async def worker():
        nonlocal done
        for i in counter:
            if await one(i): done += 1
    t0, c0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(conc)))
    _workers.cpu = time.process_time() - c0  # this process's CPU seconds for the batch
    return time.perf_counter() - t0, done

def _bare_rate(base_url: str, conc: int, total: int, offset: int) -> float:
    import openai
    async def main():
        sdk = openai.AsyncOpenAI(api_key="bench", base_url=base_url, max_retries=0)
        async def one(i):
            r = await sdk.chat.completions.create(
                model="fake-live", max_tokens=64, temperature=0.0, seed=0,
                messages=[{"role": "system", "content": "You are a careful problem solver."},
                          {"role": "user", "content": f"Question {offset + i}: what is 6 times 7?"}])
            return bool(r.choices)
        await _workers(conc, min(conc, 16), one)  # warm the connection pool
        wall, done = await _workers(conc, total, one)
        await sdk.close()
        return dict(rate=done / wall, cpu_us=_workers.cpu / max(1, done) * 1e6)
    return asyncio.run(main())

def _client_rate(base_url: str, conc: int, total: int, offset: int, cache_dir: Path|None,
                 rpm: int|None = None) -> dict:
    from scaling_study.cache import ResponseCache
    from scaling_study.core import model_entry
    from scaling_study.providers import Client
    limits = dict(concurrency=conc)
    if rpm: limits["rpm"] = rpm
    entry = model_entry("bench-live", dict(provider="openai-compatible", model="fake-live",
                                           base_url=base_url, limits=limits,
                                           price=dict(input=0.15, output=0.60)))
    cache = ResponseCache(cache_dir) if cache_dir else None
    ledger = []
    client = Client({"bench-live": entry}, cache, ledger=lambda name, call: ledger.append(call))
    async def main():
        async def one(i):
            c = await client.complete("bench-live", _live_request(offset + i, base_url))
            return not c.failed
        if not rpm: await _workers(conc, min(conc, 16), lambda i: one(10_000_000 + offset + i))
        ledger.clear()
        return await _workers(conc, total, one)
    wall, done = asyncio.run(main())
    cpu_us = _workers.cpu / max(1, done) * 1e6
    if cache: cache.close()
    return dict(rate=done / wall, wall=wall, done=done, cpu_us=cpu_us, failed=sum(c.failed for c in ledger),
                e429=sum(1 for c in ledger if c.failed and "429" in (c.error or "")),
                retried=sum(1 for c in ledger if c.attempts > 1))

def _inspect_rate(base_url: str, conc: int, n: int, work: Path) -> dict|None:
    "Inspect AI's rate on the same server, run as its users do; None if it is not installed."
    if not INSPECT_PY.exists(): return None
    task = work/"inspect_task.py"
    task.write_text(
        "from inspect_ai import Task, task\nfrom inspect_ai.dataset import Sample\n"
        "from inspect_ai.solver import generate\nfrom inspect_ai.scorer import match\n\n"
        "@task\ndef bench(n: int = 100):\n"
        "    return Task(dataset=[Sample(input=f'Question {i}: what is 6 times 7?', target='42')\n"
        "                         for i in range(n)], solver=generate(), scorer=match())\n")
    logdir = work/f"inspect-logs-{conc}"
    # openai-api/<service>/<model> is Inspect's provider for OpenAI-compatible servers (Chat
    # Completions); its `openai/` provider now speaks the Responses API, which the fake server lacks
    env = dict(os.environ, BENCH_API_KEY="bench", BENCH_BASE_URL=base_url)
    cmd = [str(INSPECT_PY), "-m", "inspect_ai", "eval", task.name, "--model", "openai-api/bench/fake-live",
           "--max-connections", str(conc), "-T", f"n={n}", "--log-format", "json", "--log-dir", str(logdir),
           "--display", "none", "--max-retries", "0", "--no-log-samples", "--max-tokens", "64",
           "--temperature", "0", "--seed", "0"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    if r.returncode != 0: raise RuntimeError(f"inspect eval failed: {(r.stderr or r.stdout)[-1500:]}")
    logs = sorted(logdir.glob("*.json"))
    if not logs: raise RuntimeError(f"inspect wrote no log in {logdir}")
    d = json.loads(logs[-1].read_text())
    st = d.get("stats", {})
    t_start = datetime.fromisoformat(st["started_at"]); t_end = datetime.fromisoformat(st["completed_at"])
    eval_s = (t_end - t_start).total_seconds()
    done = (d.get("results") or {}).get("completed_samples", n)
    if d.get("status") != "success":
        raise RuntimeError(f"inspect eval ended {d.get('status')}: {(d.get('error') or {}).get('message')}")
    return dict(rate=done / eval_s, eval_s=eval_s, wall=wall, done=done, status=d.get("status"),
                version=d.get("eval", {}).get("packages", {}).get("inspect_ai"))

def _throughput(label: str, base: str, latency: float, quick: bool, work: Path,
                targets: bool) -> tuple[dict, dict]:
    ("Client vs bare AsyncOpenAI at concurrency 8, 32, 128 on the server at `base`; "
     "bare and Client rates by concurrency.")
    totals = {8: 80, 32: 320, 128: 768} if quick else {8: 200, 32: 640, 128: 1280}
    reps = 1 if quick else 3
    offset = int(time.time() * 1000) % 10**9  # distinct prompts, so no call is a cache hit
    bares, prods = {}, {}
    for conc, total in totals.items():
        bare, prod, prod_nc = [], [], []
        for rep in range(reps):  # interleaved, best of `reps`: the machine is shared
            bare.append(_bare_rate(base, conc, total, offset)); offset += total + 100
            prod.append(_client_rate(base, conc, total, offset, work/f"live-cache-{label}-{conc}-{rep}"))
            offset += total + 100
            prod_nc.append(_client_rate(base, conc, total, offset, None))
            offset += total + 100
        bb = max(bare, key=lambda x: x["rate"])
        b = bares[conc] = bb["rate"]
        p, q = max(prod, key=lambda x: x["rate"]), max(prod_nc, key=lambda x: x["rate"])
        cpu_b = min(x["cpu_us"] for x in bare)
        cpu_p, cpu_q = min(x["cpu_us"] for x in prod), min(x["cpu_us"] for x in prod_nc)
        prods[conc] = p["rate"]
        bound = min(conc / latency, b)
        # one repeat (--quick) is too noisy to judge a 90% line: those rows are shown, not judged
        need = targets and conc >= 32 and not quick
        runs = ", ".join(str(round(x["rate"])) for x in bare)
        row("live", f"Client calls/s, conc {conc}, {label} ({total} calls, cache on)",
            f"{p['rate']:.0f}/s", f"min({conc / latency:.0f}/s ideal, bare AsyncOpenAI {b:.0f}/s)",
            p["rate"] / bound, ">= 0.90 of bound" if need else
            ("(judged in a full run)" if targets and conc >= 32 else "(reference)"),
            p["rate"] / bound >= 0.9 if need else None,
            f"failed {p['failed']}; cache off {q['rate']:.0f}/s ({q['rate'] / bound:.2f}); client CPU per "
            f"call {cpu_p:.0f} us (cache off {cpu_q:.0f}) vs bare {cpu_b:.0f} us; "
            f"bare runs {runs}")
    return bares, prods

def bench_live(quick: bool, work: Path) -> None:
    "Calls/s through Client at three concurrencies vs a bare AsyncOpenAI loop; the rpm-limited run."
    latency = 0.1

    # the product's fake server in its own process, as the issue asks
    with Server(["-m", "scaling_study.fake_server", "--port", "0", "--latency", str(latency)]) as srv:
        base = srv.openai_base_url
        bares, prods = _throughput("product fake server", base, latency, quick, work, targets=True)

        # Inspect AI side by side on the same server
        n_insp = 400 if quick else 2000  # its log has whole-second timestamps: about 20 s of run
        for conc in ((32,) if quick else (32, 128)):
            try:
                ir = _inspect_rate(base, conc, n_insp, work)
            except Exception as e:  # reported, not fatal: it is a comparison, not the product
                row("live", f"Inspect AI, max-connections {conc}", "failed", "", None, "", None, str(e)[:300])
                continue
            if ir is None:
                row("live", "Inspect AI", "not run", "", None, "", None,
                    f"{INSPECT_PY} not found; python3 -m venv /tmp/inspect-venv && "
                    "/tmp/inspect-venv/bin/pip install inspect-ai openai")
                break
            bound = min(conc / latency, bares[conc])
            row("live", f"Inspect AI {ir['version']} samples/s, max-connections {conc} "
                f"({ir['done']} samples)",
                f"{ir['rate']:.0f}/s", f"min({conc / latency:.0f}/s, bare {bares[conc]:.0f}/s)",
                ir["rate"] / bound, "Client ahead of it", prods[conc] > ir["rate"],
                f"Client {prods[conc]:.0f}/s = {prods[conc] / ir['rate']:.1f}x; eval {ir['eval_s']:.0f} s "
                f"(log timestamps, 1 s resolution) in a {ir['wall']:.1f} s command")
        log(f"live server counts: {_server_counts(srv.stop())}")

    # rpm-limited: server limit 600/min in a 10 s sliding window (100 per 10 s), so a short run still
    # crosses several windows (the product's CLI fixes the window at 60 s). Two clients: the
    # product at the server's 600/min, and the product configured 3% under it
    rpm, window = 600, 10.0
    seconds = 12 if quick else 20
    n = int(rpm / 60 * seconds)
    ideal = rpm / 60
    for label, client_rpm in (("client at the limit", rpm), ("client set to 582/min", int(rpm * 0.97))):
        with Server([str(Path(__file__).resolve()), "serve", "--latency", str(latency),
                     "--rpm", str(int(rpm * window / 60)), "--window", str(window)]) as srv:
            r = _client_rate(srv.openai_base_url, 32, n, 0, work/f"live-cache-rpm-{client_rpm}",
                             rpm=client_rpm)
            counts = _server_counts(srv.stop())
        headline = client_rpm == rpm
        row("live", f"rpm-limited, {label} (server 600/min, conc 32, {n} calls)",
            f"{r['rate']:.2f}/s", f"server limit {ideal:.2f}/s", r["rate"] / ideal,
            ">= 0.90 of limit, 0 429s in records" if headline else "(reference)",
            r["rate"] / ideal >= 0.9 and r["e429"] == 0 if headline else None,
            f"429s in records {r['e429']}; 429s sent by server {counts.get('429', 0)}; "
            f"calls retried {r['retried']}")


# ---------------------------------------------------------------------------------------------
# 3. local inference

def local_main(argv) -> int:
    "Child process: time generations of smollm2-135m through Client (`product`) or plain llama-cpp-python."
    ap = argparse.ArgumentParser(prog="bench/run.py local")
    ap.add_argument("mode", choices=("product", "plain", "plain-reset"))
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, help="n_threads for both sides (SCALING_STUDY_THREADS)")
    a = ap.parse_args(argv)
    if a.threads: os.environ["SCALING_STUDY_THREADS"] = str(a.threads)
    sys.path.insert(0, str(ROOT))
    from scaling_study.cache import Request
    from scaling_study.core import load_models
    from scaling_study.datasets import DATASETS, load
    from scaling_study.loop import CONFIDENCE_ASK, SYSTEM
    from scaling_study.providers import Client, gguf_path
    entry = load_models()["smollm2-135m"]
    threads = int(os.environ.get("SCALING_STUDY_THREADS", os.cpu_count() or 1))
    prompts = [[{"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"{DATASETS['gsm8k'].prompt(it)}\n{CONFIDENCE_ASK}"}]
               for it in load("gsm8k", a.prompts + 1, seed=1)]
    if a.mode == "product":
        client = Client({entry.name: entry}, cache=None)
        async def run_all():
            out = []
            for msgs in prompts:  # one event loop, one call at a time, as the runner does
                req = Request(provider="local", model=entry.model, messages=msgs, max_tokens=a.max_tokens,
                              temperature=0.0, seed=0)
                t0, c0 = time.perf_counter(), time.process_time()
                call = await client.complete(entry.name, req)
                if call.failed: raise RuntimeError(call.error)
                out.append((time.perf_counter() - t0, call.usage.output_tokens, time.process_time() - c0))
            return out
        res = asyncio.run(run_all())
    else:
        from llama_cpp import Llama
        llm = Llama(model_path=str(gguf_path(entry)), n_ctx=entry.n_ctx or 2048, n_threads=threads,
                    seed=0, verbose=False)
        res = []
        for msgs in prompts:
            t0, c0 = time.perf_counter(), time.process_time()
            out = llm.create_chat_completion(messages=msgs, max_tokens=a.max_tokens, temperature=0.0,
                                             seed=0, top_p=1.0, top_k=0)
            if a.mode == "plain-reset": llm.reset()  # forget the KV cache, as LocalProvider does
            res.append((time.perf_counter() - t0, out["usage"]["completion_tokens"],
                        time.process_time() - c0))
    res = res[1:]  # the first generation also pays for loading the model
    print(json.dumps(dict(seconds=sum(r[0] for r in res), tokens=sum(r[1] for r in res), threads=threads,
                          cpu_s=sum(r[2] for r in res))), flush=True)
    return 0

def _local_pair(rounds: int, prompts: int, max_tokens: int, threads: int, modes) -> dict:
    "Alternate child processes of each mode `rounds` times; tokens/s and CPU per token of each."
    tot = {m: [0.0, 0, 0.0] for m in modes}
    per = {m: [] for m in modes}
    for _ in range(rounds):
        for mode in modes:
            r = subprocess.run([PY, str(Path(__file__).resolve()), "local", mode, "--prompts", str(prompts),
                                "--max-tokens", str(max_tokens), "--threads", str(threads)], cwd=ROOT,
                               capture_output=True, text=True, timeout=900)
            if r.returncode != 0: raise RuntimeError(f"local {mode} child failed: {r.stderr[-1500:]}")
            d = json.loads(r.stdout.strip().splitlines()[-1])
            tot[mode][0] += d["seconds"]; tot[mode][1] += d["tokens"]; tot[mode][2] += d["cpu_s"]
            per[mode].append(d["tokens"] / d["seconds"])
    return {m: dict(rate=t[1] / t[0], tokens=t[1], cpu_ms=t[2] / max(1, t[1]) * 1e3, per=per[m])
            for m, t in tot.items()}

def bench_local(quick: bool, work: Path) -> None:
    "tokens/s of LocalProvider through Client vs plain llama-cpp-python on the same GGUF."
    # Each side in its own process, alternating, so machine drift hits both alike (two llama.cpp
    # contexts in one process, two OpenMP thread teams on 2 cores, distorted a first version).
    # n_threads 1 is the headline: with 2 threads on a shared 2-core machine llama.cpp's spinning
    # OpenMP barriers collapse whenever another process takes a core (80 -> 3 tok/s seen here).
    # `plain-reset` is plain llama-cpp-python calling llm.reset() after each answer, as
    # LocalProvider does: the like-for-like bound that isolates the cost of the reset.
    rounds, prompts, max_tokens = (2, 2, 64) if quick else (5, 2, 96)
    fmt = lambda xs: ", ".join(f"{x:.0f}" for x in xs)
    for threads in (1, os.cpu_count() or 1):
        headline = threads == 1
        n = rounds if headline else 1
        modes = ("product", "plain", "plain-reset") if headline else ("product", "plain")
        r = _local_pair(n, prompts, max_tokens, threads, modes)
        p, b = r["product"], r["plain"]
        note = (f"{p['tokens']} tokens each; per round product {fmt(p['per'])}, plain {fmt(b['per'])}; "
                f"CPU ms/token product {p['cpu_ms']:.1f}, plain {b['cpu_ms']:.1f}")
        row("local", f"smollm2-135m tok/s via Client, n_threads {threads} ({n}x{prompts} prompts, "
            f"max_tokens {max_tokens})", f"{p['rate']:.1f} tok/s",
            f"plain llama-cpp-python {b['rate']:.1f} tok/s",
            p["rate"] / b["rate"], ">= 0.90 of plain" if headline else "(reference)",
            p["rate"] / b["rate"] >= 0.9 if headline else None, note)
        if "plain-reset" in r:
            q = r["plain-reset"]
            row("local", "  same, against plain llama-cpp-python with llm.reset() after each answer",
                f"{p['rate']:.1f} tok/s", f"plain + reset {q['rate']:.1f} tok/s", p["rate"] / q["rate"],
                "(reference)", None, f"per round {fmt(q['per'])}; CPU ms/token {q['cpu_ms']:.1f}; the gap "
                "to plain is the KV-cache reset (no prompt-prefix reuse)")
        if threads == (os.cpu_count() or 1): break


# ---------------------------------------------------------------------------------------------
# 4. sandboxed HumanEval scoring

def bench_scoring(quick: bool, work: Path) -> None:
    "Programs per second through check_humaneval: cold, then from the verdict cache."
    from scaling_study.datasets import load
    from scaling_study import sandbox
    n = 10 if quick else 40
    items = load("humaneval", n, seed=0)
    responses = [f"```python\n{it['prompt']}{it['canonical_solution']}```" for it in items]
    backend = sandbox.sandbox_backend()

    t0 = time.perf_counter()
    cold = [sandbox.check_humaneval(it, r) for it, r in zip(items, responses)]
    t_cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    warm = [sandbox.check_humaneval(it, r) for it, r in zip(items, responses)]
    t_warm = time.perf_counter() - t0
    passed = sum(v.passed for v in cold)

    # reference: starting the same interpreter inside the same sandbox, doing nothing
    m = 10 if quick else 20
    t0 = time.perf_counter()
    for _ in range(m):
        wd = tempfile.mkdtemp(prefix="bench-sbx-")
        cmd = [sandbox._python(), "-I", "-S", "-c", "pass"]
        if backend == "bubblewrap": cmd = sandbox._bwrap_cmd(wd) + cmd
        subprocess.run(cmd, cwd=wd, env=sandbox._child_env("/work" if backend == "bubblewrap" else wd),
                       check=True, capture_output=True)
        shutil.rmtree(wd, ignore_errors=True)
    t_empty = (time.perf_counter() - t0) / m
    row("scoring", f"HumanEval programs/s, cold ({n} canonical solutions, {backend})",
        f"{n / t_cold:.1f}/s", f"empty sandboxed python: {1 / t_empty:.1f}/s", (n / t_cold) * t_empty,
        "(no target)", None, f"{passed}/{n} passed; {t_cold / n * 1000:.0f} ms per program")
    row("scoring", "HumanEval programs/s, verdict cache", f"{n / t_warm:.0f}/s", "", None, "(no target)",
        None, f"{sum(v.cached for v in warm)}/{n} from cache; {t_warm / n * 1e6:.0f} us per program")


# ---------------------------------------------------------------------------------------------

def write_readme(rows, mach, git, elapsed, quick) -> None:
    "Replace the results block of bench/README.md with this run's table."
    p = BENCH/"README.md"
    text = p.read_text() if p.exists() else "<!-- results:start -->\n<!-- results:end -->\n"
    block = (f"<!-- results:start -->\nRun {mach['date']} ({'quick' if quick else 'full'} mode, "
             f"{elapsed:.0f} s), code {git}.\nMachine: {mach['nproc']} cores, {mach['cpu']}, "
             f"{mach['memory']}, load average (1, 5, 15 min) {mach.get('load_at_start')} at the start "
             f"and {mach['load']} at the end, Python {mach['python']}.\n\n"
             f"{table(rows)}\n<!-- results:end -->")
    text = re.sub(r"<!-- results:start -->.*?<!-- results:end -->", lambda _: block, text, flags=re.S)
    p.write_text(text)

SECTIONS = ("cache", "grid", "live", "local", "scoring")

def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]: return serve_main(argv[1:])
    if argv[:1] == ["phase"]: return phase_main(argv[1:])
    if argv[:1] == ["local"]: return local_main(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes (about 2-3 minutes)")
    ap.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    ap.add_argument("--readme", action="store_true",
                    help="write the table into bench/README.md (full runs only)")
    ap.add_argument("--profile", action="store_true",
                    help="also cProfile the grid replay (written to the temp folder, path logged)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--grid-fill", choices=("auto", "runner", "direct"), default="auto",
                    help="how to warm the grid's cache: the real runner against the fake server (about "
                         "6-8 min for the full grid), straight into the cache, or auto (runner when --quick)")
    a = ap.parse_args(argv)
    if a.readme and (a.only or a.quick):
        ap.error("--readme takes the table of a full run (no --only, no --quick): the README's "
                 "table and text describe all sections at full size")

    # one run at a time: two would share the two cores and skew each other's figures
    import fcntl
    (BENCH/"results").mkdir(exist_ok=True)
    lock = open(BENCH/"results"/".lock", "a+")
    try: fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        print(f"another bench run is in progress ({lock.read().strip() or 'pid unknown'}); "
              "wait for it to finish, since two runs skew each other's figures", file=sys.stderr)
        return 2
    lock.truncate(0); lock.write(f"pid {os.getpid()}, started {time.strftime('%H:%M:%S')}\n"); lock.flush()
    # SIGTERM (kill, timeout) unwinds like Ctrl-C, so fake servers and the temp folder are cleaned up
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    work = Path(tempfile.mkdtemp(prefix="scaling-bench-"))
    os.environ["SCALING_STUDY_CACHE"] = str(work/"cache")
    os.environ["SCALING_STUDY_RUNS"] = str(work/"runs")
    sys.path.insert(0, str(ROOT))
    import logging
    logging.basicConfig(level=logging.WARNING, format="  %(levelname)s %(name)s: %(message)s")
    mach0 = machine()
    log(f"work folder {work}; load average at start {mach0['load']}")
    t0 = time.perf_counter()
    fns = dict(cache=lambda: bench_cache(a.quick, work),
               grid=lambda: bench_grid(a.quick, work, a.grid_fill, a.profile),
               live=lambda: bench_live(a.quick, work), local=lambda: bench_local(a.quick, work),
               scoring=lambda: bench_scoring(a.quick, work))
    try:
        for s in a.only or SECTIONS:
            t = time.perf_counter()
            try: fns[s]()
            except Exception as e:
                import traceback; traceback.print_exc()
                row(s, "section failed", type(e).__name__, "", None, "", False, str(e)[:300])
            log(f"section {s} took {time.perf_counter() - t:.0f} s")
    finally:
        if not a.keep: shutil.rmtree(work, ignore_errors=True)
        else: log(f"kept {work}")
    elapsed = time.perf_counter() - t0
    mach, git = machine(), git_state()
    mach["load_at_start"] = mach0["load"]
    print(f"\nscaling_study bench, {mach['date']}, {'quick' if a.quick else 'full'} mode, {elapsed:.0f} s; "
          f"code {git}\nmachine: {mach['nproc']} cores, {mach['cpu']}, "
          f"load {mach0['load']} -> {mach['load']}\n")
    print(table(ROWS))
    for r in ROWS:  # no absolute paths of this machine in files that may be committed
        for k in ("note", "measured", "bound"): r[k] = str(r[k]).replace(str(ROOT), ".")
    out = BENCH/"results"
    name = "partial.json" if a.only else "latest-quick.json" if a.quick else "latest.json"
    (out/name).write_text(
        json.dumps(dict(machine=mach, git=git, elapsed_s=elapsed, quick=a.quick, rows=ROWS), indent=2))
    log(f"results written to {(out/name).relative_to(ROOT)}")
    if a.readme: write_readme(ROWS, mach, git, elapsed, a.quick)
    return 0 if all(r["ok"] is not False for r in ROWS) else 1

if __name__ == "__main__":
    sys.exit(main())
