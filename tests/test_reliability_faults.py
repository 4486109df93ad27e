"""Provider faults during whole phase runs: nothing lost, nothing doubled, cost exact, clear status.

Each test runs `run_phase` on GSM8K items against `FakeServer`, with four learners that reach it
through the real adapters and SDKs (openai-compatible, openai, anthropic, replicate), and injects
faults into the server's queue; each queued fault is taken by the next request, whichever learner
sends it. The accounting is checked against the server's own log: the dollars of every answer it
gave (from the usage it sent, priced here by each API's token rules), the answers it gave without
usage (their cost must be None, never 0), and the requests that never got an answer.
"""
import time
from collections import Counter

import pytest

import test_reliability_common as common
from test_reliability_common import ALL, check_complete_run, fast_retries, isolate, read_run, run, \
    server, write_config


@pytest.fixture(autouse=True)
def _revert(monkeypatch):
    common.apply_revert(monkeypatch)


# fault sets that retries must absorb; each set has at most 6 retryable faults (the client's
# max_retries), so even if one call drew all of them it would still succeed
FAULTS = {
    "429 with Retry-After": ["429"] * 3,
    "429 without Retry-After": ["429-noretry"] * 4,
    "500 storm": ["500"] * 6,
    "529 storm": ["529"] * 6,
    "503 and resets": ["503", "reset", "503", "reset"],
    "hung connections": ["hang"] * 2,
    "slower than the timeout": ["slow:4"],
    "truncated JSON": ["truncated"] * 3,
    "malformed JSON": ["malformed"] * 3,
    "missing usage": ["no_usage"] * 4,
    "answer cut by the token limit": ["length"] * 2,
    "everything at once": ["429", "500", "529", "hang", "truncated", "malformed"],
}


@pytest.mark.parametrize("faults", FAULTS.values(), ids=FAULTS.keys())
def test_phase_run_absorbs_faults(tmp_path, monkeypatch, faults):
    isolate(monkeypatch, tmp_path)
    fast_retries(monkeypatch)
    with server() as srv:
        phase, models = write_config(tmp_path, srv)
        srv.inject(*faults)
        t0 = time.monotonic()
        d = run(phase, models)
        took = time.monotonic() - t0
        assert srv.pending == [], "every injected fault was met by a request"
        man, records, ledger = check_complete_run(d, ALL, 3, srv)

    # every request the server saw is one attempt in the ledger: none unaccounted for
    assert sum(c["attempts"] for c in ledger) == common.generation_requests(srv)
    # a hung request is abandoned by the client; a Replicate prediction still running is cancelled
    cancels = [e for e in srv.log if e["path"].endswith("/cancel")]
    for e in srv.log:
        if e["fault"] not in ("hang", "slow:4"): continue
        if e["kind"] == "replicate" and e["status"] == 200:
            assert any(c["time"] > e["time"] for c in cancels), "a slow prediction kept running"
        else:  # abandoned by the client at its 1.5 s timeout, not answered late
            assert e["status"] is None, "a hung request was answered"
            assert e["duration"] < 1.5 + 1.0, f"the client waited {e['duration']:.1f} s"
    assert took < 30, f"a hung connection held the run for {took:.0f} s"
    # missing usage gives cost None (and an unknown total), never 0
    n_unpriced = sum(f == "no_usage" for f in faults)
    assert man["cost_usd"]["unpriced_calls"] == n_unpriced
    assert (man["cost_usd"]["uncached"] is None) == (n_unpriced > 0)
    # a cut answer is kept and flagged, not retried (Replicate says only how many tokens came back,
    # and the fake's cut answers there report fewer than max_tokens, so they are not flagged)
    cut = sum(e["fault"] == "length" and e["kind"] != "replicate" for e in srv.log)
    assert sum(r["truncated"] for r in records) == cut


def test_retry_after_is_honoured(tmp_path, monkeypatch):
    "A 429 with `Retry-After: 1` is retried no sooner than 1 s later, even with a 10 ms backoff."
    isolate(monkeypatch, tmp_path)
    fast_retries(monkeypatch)
    with server() as srv:
        phase, models = write_config(tmp_path, srv, names=["fk-compat"], datasets={"gsm8k": 1},
                                     limits={"concurrency": 1}, max_turns=1)
        srv.inject("429", "429")
        d = run(phase, models)
        log = list(srv.log)
    check_complete_run(d, ["fk-compat"], 1, srv)
    assert [e["status"] for e in log[:3]] == [429, 429, 200]
    gaps = [b["time"] - a["time"] for a, b in zip(log, log[1:3])]
    assert min(gaps) >= 0.95, gaps


def test_server_rate_limit_storm(tmp_path, monkeypatch):
    "A server admitting 8 requests per second answers the rest 429 + Retry-After; all items finish."
    isolate(monkeypatch, tmp_path)
    fast_retries(monkeypatch, max_retries=30)
    with server(rpm=8, rpm_window=1.0) as srv:
        phase, models = write_config(tmp_path, srv, limits={"concurrency": 3})
        d = run(phase, models)
        assert Counter(e["status"] for e in srv.log)[429] > 0, "the storm happened"
        check_complete_run(d, ALL, 3, srv)


@pytest.mark.parametrize("learner,faults", [("fk-compat", ["500"] * 7), ("fk-claude", ["529"] * 7),
                                            ("fk-llama", ["failed"])],
                         ids=["500 x7 (retries exhausted)", "529 x7 (retries exhausted)",
                              "replicate prediction failed"])
def test_failed_call_is_recorded_failed_then_retried(tmp_path, monkeypatch, learner, faults):
    isolate(monkeypatch, tmp_path)
    fast_retries(monkeypatch)
    with server() as srv:
        phase, models = write_config(tmp_path, srv, names=[learner], datasets={"gsm8k": 2},
                                     limits={"concurrency": 1})
        srv.inject(*faults)
        d = run(phase, models)

        # the first session: one item failed at its first turn, recorded as failed (not wrong)
        man, records, ledger = read_run(d)
        failed = [r for r in records if r["failed"]]
        assert len(failed) == 1
        f = failed[0]
        assert (f["turn"], f["correct"], f["reason"], f["extracted"]) == (0, None, "failed", None)
        assert f["error"] and f["cost_usd"] == 0
        assert man["items_failed"] == 1 and man["items_done"] == 1 and man["status"] == "failed"
        bad = [c for c in ledger if c["failed"]]
        assert len(bad) == 1 and bad[0]["attempts"] == len(faults)
        assert man["calls"]["failed"] == 1

        # the same command again resumes the same folder and retries only that item
        before = common.generation_requests(srv)
        d2 = run(phase, models)
        assert d2 == d
        man2, records2, ledger2 = check_complete_run(d, [learner], 2, srv)
        assert man2["sessions"] == 2
        done_before = {r["item_id"] for r in records if not r["failed"]}
        retried = {r["item_id"] for r in records2} - done_before
        assert retried == {f["item_id"]}
        assert common.generation_requests(srv) - before == sum(
            1 for r in records2 if r["item_id"] == f["item_id"])
        superseded = common.read_jsonl(d/"records.superseded.jsonl")
        assert [(r["item_id"], r["failed"]) for r in superseded] == [(f["item_id"], True)]


# finding F1 (failed before commit 51a4a89, which fixed it): a run whose items failed says status
# 'complete' (and `scaling-study run` exits 0)
def test_failed_items_do_not_read_as_complete(tmp_path, monkeypatch):
    "Every call rejected (as with a revoked key): the manifest must not call the run complete."
    isolate(monkeypatch, tmp_path)
    fast_retries(monkeypatch)
    with server() as srv:
        phase, models = write_config(tmp_path, srv, names=["fk-llama"], datasets={"gsm8k": 2},
                                     limits={"concurrency": 1})
        srv.inject("failed", "failed")
        d = run(phase, models)
    man, records, _ = read_run(d)
    assert man["items_failed"] == 2 and man["items_done"] == 0
    assert man["status"] != "complete", "2 of 2 items failed, yet the status says complete"


# finding F2 (failed before commit 51a4a89, which fixed it): a call whose usage is missing is
# settled as $0 against the budget, so the cap does not hold
def test_budget_holds_when_usage_is_missing(tmp_path, monkeypatch):
    "A server that never reports usage must not let a run spend past its budget: the run must stop."
    isolate(monkeypatch, tmp_path)
    fast_retries(monkeypatch)
    with server() as srv:
        phase, models = write_config(tmp_path, srv, names=["fk-compat"], datasets={"gsm8k": 5},
                                     limits={"concurrency": 1}, budget_usd=3.0)
        # with usage reported, the budget stops this run after a few of its 15 calls
        d = run(phase, models, yes=True)
        with_usage = common.generation_requests(srv)
        assert read_run(d)[0]["status"] == "stopped_budget" and with_usage < 15
    isolate(monkeypatch, tmp_path/"second")
    with server() as srv:
        phase, models = write_config(tmp_path, srv, names=["fk-compat"], datasets={"gsm8k": 5},
                                     limits={"concurrency": 1}, budget_usd=3.0)
        srv.inject(*["no_usage"] * 50)
        d = run(phase, models, yes=True)
        man, sent = read_run(d)[0], common.generation_requests(srv)
    # every call of unknown cost must be charged at least its worst-case reservation
    assert man["status"] == "stopped_budget", f"{sent} calls of unknown cost, none charged"
    assert sent < 15


# --- faults of our own making (findings N1-N3 in RELIABILITY.md) ---------------------------------
# finding N1 (failed before commit a22e5f1, which fixed it): an answer holding a lone surrogate
# (half an emoji) cannot be written as UTF-8: the run crashes after paying, and every rerun pays
# again
def test_answer_with_a_lone_surrogate_is_kept_and_paid_once(tmp_path, monkeypatch):
    isolate(monkeypatch, tmp_path)
    half_emoji = lambda kind, body: common.answer(kind, body) + " \ud83d"
    with server(responder=half_emoji) as srv:
        phase, models = write_config(tmp_path, srv, names=["fk-compat"], datasets={"gsm8k": 2},
                                     max_turns=1)
        d = run(phase, models)
        check_complete_run(d, ["fk-compat"], 2, srv)
        before = len(srv.log)
        run(phase, models)  # a second run is served from the cache
        assert len(srv.log) == before


# finding N2 (failed before commit a22e5f1, which fixed it): usage with more cached than prompt
# tokens gives a negative cost, so spend goes down and the budget grows
def test_inconsistent_usage_never_gives_a_negative_cost(tmp_path, monkeypatch):
    isolate(monkeypatch, tmp_path)
    odd = dict(input_tokens=100, cached_tokens=5000, output_tokens=10)  # cached > prompt tokens
    with server(usage=odd) as srv:
        phase, models = write_config(tmp_path, srv, names=["fk-compat"], datasets={"gsm8k": 2},
                                     max_turns=1)
        d = run(phase, models)
    man, records, ledger = read_run(d)
    costs = [c["cost_usd"] for c in ledger]
    assert all(c is None or c >= 0 for c in costs), costs
    assert man["cost_usd"]["spent"] >= 0


# finding N3 (failed before commit a22e5f1, which fixed it): Retry-After is obeyed however long it
# is (here 100000 s), so one header stalls the run for a day
def test_huge_retry_after_does_not_stall_a_call(tmp_path, monkeypatch):
    import asyncio
    from scaling_study.cache import Request
    from scaling_study.core import model_entry
    from scaling_study.providers import Client, run_sync
    isolate(monkeypatch, tmp_path)
    with server(rpm=1, rpm_window=100_000.0) as srv:
        e = model_entry("fk-compat", common.model_entries(srv, ["fk-compat"])["fk-compat"])
        client = Client({"fk-compat": e}, None)
        def ask(n): return Request(e.provider, e.model, [{"role": "user", "content": f"q{n}"}],
                                   max_tokens=8)

        async def two_calls():
            first = await client.complete("fk-compat", ask(1))  # the one request admitted
            t0 = time.monotonic()
            try: second = await asyncio.wait_for(client.complete("fk-compat", ask(2)), 10)
            except TimeoutError: second = None  # still waiting for the server's Retry-After
            return first, second, time.monotonic() - t0
        first, second, took = run_sync(two_calls())
    assert not first.failed
    assert second is not None and second.failed and took < 10, took
