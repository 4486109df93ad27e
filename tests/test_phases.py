"""Phases against a local OpenAI-compatible endpoint: nested samples reuse cached calls, and the budget holds.

The learners of phase1 and phase2 are pointed at the package's fake server through a `--models`
override, exactly as a user would point them at a vLLM or llama.cpp server. Runs go to a temporary
folder with their own cache.
"""
import json, os
from pathlib import Path

import pytest
import yaml

from scaling_study.core import ConfigError
from scaling_study.fake_server import FakeServer
from scaling_study.runner import run_phase

PRICE = dict(input=2.0, cached_input=1.0, output=8.0, as_of="2026-12-04", source="test prices")


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALING_STUDY_RUNS", str(tmp_path/"runs"))
    monkeypatch.setenv("SCALING_STUDY_CACHE", str(tmp_path/"cache"))
    return tmp_path


def _override(tmp, url, names):
    m = {n: dict(provider="openai-compatible", model=n, base_url=url, price=PRICE, limits=dict(concurrency=8))
         for n in names}
    p = tmp/"models.yaml"; p.write_text(yaml.safe_dump(m))
    return p


def _manifest(d): return json.loads((Path(d)/"manifest.json").read_text())
def _records(d): return [json.loads(l) for l in (Path(d)/"records.jsonl").read_text().splitlines()]


def test_phase2_reuses_phase1(env):
    with FakeServer(usage=dict(input_tokens=300, output_tokens=50)) as srv:
        over = _override(env, srv.openai_base_url, ["gpt-4o-mini", "claude-haiku", "gpt-4o", "claude-sonnet"])
        d1 = run_phase("phase1", models=over, limit=10, progress=False)
        sent1 = len(srv.log)
        d2 = run_phase("phase2", models=over, limit=20, progress=False)
        sent2 = len(srv.log) - sent1
    m1, m2 = _manifest(d1), _manifest(d2)
    r1, r2 = _records(d1), _records(d2)
    assert m1["status"] == m2["status"] == "complete"
    assert m1["calls"]["live"] == len(r1) == sent1
    # phase2's first 10 GSM8K items of the two phase1 learners are phase1's items, served from the cache
    shared = [r for r in r2 if r["model"] in ("gpt-4o-mini", "claude-haiku") and r["dataset"] == "gsm8k"]
    first10 = {r["item_id"] for r in r1}
    reused = [r for r in shared if r["item_id"] in first10]
    assert len(reused) == len(r1) and all(r["cached"] for r in reused)
    assert m2["calls"]["cached"] == len(reused) and m2["calls"]["live"] == sent2 == len(r2) - len(reused)
    # spend is exact: every live call at 300 input and 50 output tokens
    per_call = (300 * PRICE["input"] + 50 * PRICE["output"]) / 1e6
    assert m2["cost_usd"]["spent"] == pytest.approx(sent2 * per_call, abs=1e-9)
    assert m2["cost_usd"]["uncached"] == pytest.approx(len(r2) * per_call, abs=1e-9)


def test_budget_below_estimate_spends_nothing(env):
    with FakeServer() as srv:
        over = _override(env, srv.openai_base_url, ["gpt-4o-mini", "claude-haiku"])
        with pytest.raises(ConfigError, match="exceeds the budget"):
            run_phase("phase1", models=over, limit=50, budget=0.01, progress=False)
        assert len(srv.log) == 0


def test_budget_reached_mid_run_stops_cleanly(env):
    budget = 0.05
    with FakeServer(usage=dict(input_tokens=1000, output_tokens=500), latency=0.01) as srv:
        over = _override(env, srv.openai_base_url, ["gpt-4o-mini", "claude-haiku"])
        d = run_phase("phase1", models=over, limit=100, budget=budget, yes=True, progress=False)
        answered = sum(1 for e in srv.log if e["status"] == 200)
    m = _manifest(d)
    per_call = (1000 * PRICE["input"] + 500 * PRICE["output"]) / 1e6
    assert m["status"] == "stopped_budget"
    assert m["cost_usd"]["spent"] <= budget + 1e-12          # the guard reserves before it sends
    assert m["cost_usd"]["spent"] == pytest.approx(answered * per_call, abs=1e-9)
    assert budget - m["cost_usd"]["spent"] < 16 * per_call    # it stopped near the cap, not early
    recs = _records(d)
    assert len({(r["model"], r["item_id"], r["turn"]) for r in recs}) == len(recs)
