"""Kill a run with SIGKILL at random moments, run it again, and check nothing was lost or paid twice.

This lives in pytest rather than a notebook because it starts and kills processes in a loop, which
a notebook cell cannot host cleanly. The learners are served by the package's fake OpenAI-compatible
server on loopback, with a small latency so that calls are in flight when the kill lands.
"""
import json, os, random, signal, subprocess, sys, time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from scaling_study.fake_server import FakeServer

ROOT = Path(__file__).resolve().parents[1]
KILLS = int(os.environ.get("SCALING_STUDY_KILLS", 20))


def _setup(tmp, url):
    models = {n: dict(provider="openai-compatible", model=n, base_url=url,
                      price=dict(input=1.0, output=2.0, as_of="2026-12-04", source="test prices"),
                      limits=dict(concurrency=4)) for n in ("fake-a", "fake-b")}
    (tmp/"models.yaml").write_text(yaml.safe_dump(models))
    phase = dict(name="killtest", models=["fake-a", "fake-b"], datasets={"gsm8k": 25}, max_turns=2,
                 max_tokens=64, budget_usd=100.0)
    (tmp/"phase.yaml").write_text(yaml.safe_dump(phase))
    env = dict(os.environ, SCALING_STUDY_RUNS=str(tmp/"runs"), SCALING_STUDY_CACHE=str(tmp/"cache"),
               OPENAI_API_KEY="sk-test-dummy-key-for-kill-loop")
    code = ("from scaling_study.runner import run_phase; "
            f"run_phase(config={str(tmp/'phase.yaml')!r}, models={str(tmp/'models.yaml')!r}, progress=False)")
    return env, [sys.executable, "-c", code]


def _answer(kind, body):
    # a deterministic answer that differs by prompt and turn, so items take different paths
    n = len(json.dumps(body)) % 7
    return f"Some working.\nFinal answer: {n}\nConfidence: {50 + n}%"


def test_kill9_loop_then_resume(tmp_path):
    rng = random.Random(0)
    with FakeServer(latency=0.2, responder=_answer) as srv:
        env, cmd = _setup(tmp_path, srv.openai_base_url)
        killed = 0
        for _ in range(KILLS):
            p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(1.0, 3.0))
            if p.poll() is None:
                p.send_signal(signal.SIGKILL); killed += 1
            p.wait()
        final = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert final.returncode == 0, final.stderr[-2000:]
        answered = sum(1 for e in srv.log if e["status"] == 200)

    # the first run folder is the one every session resumed; if it was completed during the kill
    # loop, later sessions started new runs answered wholly from the cache
    runs = sorted((tmp_path/"runs"/"killtest").glob("*/manifest.json"))
    man = json.loads(runs[0].read_text())
    d = runs[0].parent
    for later in runs[1:]:
        m = json.loads(later.read_text())
        assert m["calls"]["live"] == 0, "a later run paid for a request the first run had answered"
    records = [json.loads(l) for l in (d/"records.jsonl").read_text().splitlines()]
    ledger = [json.loads(l) for l in (d/"calls.jsonl").read_text().splitlines()]

    # complete: every (learner, item) is done, once per turn
    assert man["status"] == "complete" and man["items_done"] == 50 and man["items_failed"] == 0
    keys = Counter((r["model"], r["item_id"], r["turn"]) for r in records)
    assert max(keys.values()) == 1
    assert {(m, i) for m, i, _ in keys} == {(r["model"], r["item_id"]) for r in records}
    assert len({(m, i) for m, i, _ in keys}) == 50

    # nothing paid twice: each answered request is in the ledger once, and spend is their sum
    paid = Counter(c["key"] for c in ledger if not c["failed"])
    assert max(paid.values()) == 1
    assert abs(man["cost_usd"]["spent"] - sum(c["cost_usd"] for c in ledger if not c["failed"])) < 1e-12
    # the server answered at least what was paid; the excess is calls in flight when a kill landed
    assert answered >= len(paid)
    print(f"kills={killed} paid_calls={len(paid)} server_answers={answered} "
          f"in_flight_lost={answered - len(paid)} sessions={man['sessions']}")
