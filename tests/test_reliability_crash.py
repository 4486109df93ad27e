"""Crashes: a request cache or a run folder left half-written, or locked, by a process that died.

The cache is a diskcache (SQLite in WAL mode plus one file per large value). These tests kill real
writer processes with SIGKILL in the middle of their writes and transactions, damage value files and
the database by hand, leave partial lines at the end of records.jsonl and calls.jsonl, and leave a
run folder locked by a dead process; then they check what the next run does with it.
"""
import os, random, signal, subprocess, time

import pytest

import test_reliability_common as common
from test_reliability_common import PY, check_complete_run, fast_retries, isolate, read_run, run, \
    server, tree_digest, write_config
from scaling_study.cache import ResponseCache


@pytest.fixture(autouse=True)
def _revert(monkeypatch):
    common.apply_revert(monkeypatch)


WRITER = r"""
import sys
from scaling_study.cache import ResponseCache
c, i = ResponseCache(sys.argv[1]), int(sys.argv[2])
while True:
    value = {"i": i, "text": "x" * (40_000 if i % 3 == 0 else 50)}  # every third value is a file
    if c.set(f"k{i}", value): print(i, flush=True)
    i += 1
"""


def test_cache_survives_kill9_during_writes(tmp_path):
    "Kill a writer 8 times mid-stream: every write it reported is intact, the rest absent or whole."
    d, rng, committed, start = tmp_path/"requests", random.Random(1), [], 0
    for _ in range(8):
        p = subprocess.Popen([PY, "-c", WRITER, str(d), str(start)], stdout=subprocess.PIPE,
                             text=True)
        first = p.stdout.readline()  # the writer is under way
        time.sleep(rng.uniform(0.05, 0.4))
        p.send_signal(signal.SIGKILL)
        out, _ = p.communicate()
        done = [int(x) for x in (first + out).split()]
        committed += done
        start = done[-1] + 100  # a fresh key range, so a half-written key is never reported

        t0 = time.monotonic()
        c = ResponseCache(d)
        assert c.set("after-kill", {"ok": True}), "the cache is writable right after the kill"
        assert time.monotonic() - t0 < 5, "a lock of the dead writer was waited for"
        for i in committed:
            v = c.get(f"k{i}")
            assert v == {"i": i, "text": "x" * (40_000 if i % 3 == 0 else 50)}, i
        # keys the writer may have been writing when it died: absent, or whole
        for i in range(done[-1] + 1, done[-1] + 3):
            v = c.get(f"k{i}")
            assert v is None or v["i"] == i and len(v["text"]) in (50, 40_000)
        c.close()
    assert len(committed) > 50
    print(f"8 kills, {len(committed)} reported writes all intact")


def test_write_lock_of_a_killed_process_is_released(tmp_path):
    "A process killed inside an open write transaction: its change is gone and its lock with it."
    d = tmp_path/"requests"
    c = ResponseCache(d)
    c.set("k", {"text": "committed"})
    c.close()
    code = ("import sqlite3, sys, time\n"
            "con = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "con.execute('BEGIN IMMEDIATE')\n"
            "con.execute(\"UPDATE Cache SET value = 'half-written' WHERE key = 'k'\")\n"
            "print('locked', flush=True)\n"
            "time.sleep(600)\n")
    p = subprocess.Popen([PY, "-c", code, str(d/"cache.db")], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    p.send_signal(signal.SIGKILL)
    p.wait()
    t0 = time.monotonic()
    c = ResponseCache(d)
    assert c.get("k") == {"text": "committed"}
    assert c.set("k2", {"text": "new"}) and c.get("k2") == {"text": "new"}
    assert time.monotonic() - t0 < 5
    c.close()


def test_stray_journal_and_wal_files_are_harmless(tmp_path):
    "Leftover -journal and -wal files full of garbage do not lose committed entries."
    d = tmp_path/"requests"
    c = ResponseCache(d)
    for i in range(5): c.set(f"k{i}", {"i": i})
    c.close()
    rng = random.Random(2)
    (d/"cache.db-journal").write_bytes(rng.randbytes(4096))
    (d/"cache.db-wal").write_bytes(rng.randbytes(40_000))
    c = ResponseCache(d)
    assert [c.get(f"k{i}") for i in range(5)] == [{"i": i} for i in range(5)]
    assert c.set("k9", {"i": 9}) and c.get("k9") == {"i": 9}
    c.close()


def _long_answer(kind, body):
    "Answers over 32 kB, which diskcache keeps in a file of their own."
    return "Padding. " * 4_000 + "\n" + common.answer(kind, body)


def test_damaged_value_files_are_bought_again_once(tmp_path, monkeypatch):
    "Truncated, deleted or garbled value files are misses: each is bought once more, nothing else."
    isolate(monkeypatch, tmp_path)
    with server(responder=_long_answer) as srv:
        phase, models = write_config(tmp_path, srv, names=["fk-compat", "fk-claude"], max_turns=1)
        first = run(phase, models)
        check_complete_run(first, ["fk-compat", "fk-claude"], 3, srv)
        vals = sorted((tmp_path/"cache"/"requests").rglob("*.val"))
        assert len(vals) == common.generation_requests(srv)
        vals[0].write_bytes(vals[0].read_bytes()[:5_000])     # cut short
        vals[1].unlink()                                        # gone
        vals[2].write_bytes(b"\xff\xfe" + os.urandom(3_000))    # not text at all
        before = common.generation_requests(srv)
        second = run(phase, models)
        assert second != first
        assert common.generation_requests(srv) - before == 3
        man, _, ledger = read_run(second)
        assert man["status"] == "complete" and man["calls"]["live"] == 3
        assert man["calls"]["cached"] == before - 3


# finding F3 (failed before commit 51a4a89, which fixed it): a damaged cache.db raises
# sqlite3.DatabaseError without naming the file or the fix
def test_damaged_cache_database_gives_a_clear_error(tmp_path, monkeypatch):
    isolate(monkeypatch, tmp_path)
    with server() as srv:
        phase, models = write_config(tmp_path, srv, names=["fk-compat"], max_turns=1)
        run(phase, models)
        db = tmp_path/"cache"/"requests"/"cache.db"
        db.write_bytes(db.read_bytes()[:len(db.read_bytes()) // 3])  # a copy cut short
        runs, before = tree_digest(tmp_path/"runs"), len(srv.log)
        with pytest.raises(Exception) as err:
            run(phase, models)
        assert len(srv.log) == before and tree_digest(tmp_path/"runs") == runs
    msg = str(err.value)
    assert str(db.parent) in msg and ("aside" in msg or "delete" in msg or "remove" in msg), msg


def _run_with_one_failed_item(tmp_path, monkeypatch, srv):
    "A finished session in which one of two items failed, so the next run resumes the folder."
    fast_retries(monkeypatch)
    phase, models = write_config(tmp_path, srv, names=["fk-llama"], datasets={"gsm8k": 2},
                                 limits={"concurrency": 1})
    srv.inject("failed")
    d = run(phase, models)
    assert read_run(d)[0]["items_failed"] == 1
    return phase, models, d


def test_partial_last_lines_are_dropped_on_resume(tmp_path, monkeypatch):
    isolate(monkeypatch, tmp_path)
    with server() as srv:
        phase, models, d = _run_with_one_failed_item(tmp_path, monkeypatch, srv)
        with open(d/"records.jsonl", "a") as f:
            f.write('{"model": "fk-llama", "dataset": "gsm8k", "item_id": "gsm')
        with open(d/"calls.jsonl", "a") as f:
            f.write('{"ts": "2026-12-04T10:00:00+00:00", "model": "fk-l')
        assert run(phase, models) == d
        check_complete_run(d, ["fk-llama"], 2, srv)
    for name in ("records.jsonl", "calls.jsonl"):
        assert (d/name).read_bytes().endswith(b"\n")
        common.read_jsonl(d/name)  # every line parses


def test_damaged_middle_line_stops_before_any_call(tmp_path, monkeypatch):
    isolate(monkeypatch, tmp_path)
    with server() as srv:
        phase, models, d = _run_with_one_failed_item(tmp_path, monkeypatch, srv)
        lines = (d/"records.jsonl").read_text().splitlines(True)
        lines[1] = '{"model": "fk-llama", garbage\n'
        (d/"records.jsonl").write_text("".join(lines))
        runs, before = tree_digest(tmp_path/"runs"), len(srv.log)
        want = r"records\.jsonl, line 2: not valid JSON\. Move the file aside"
        with pytest.raises(ValueError, match=want):
            run(phase, models)
        assert len(srv.log) == before
        assert tree_digest(tmp_path/"runs") == runs


LOCKER = r"""
import sys, time
from pathlib import Path
from scaling_study.runner import _Lock
with _Lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_run_folder_lock_of_a_dead_process_is_released(tmp_path, monkeypatch):
    isolate(monkeypatch, tmp_path)
    with server() as srv:
        phase, models, d = _run_with_one_failed_item(tmp_path, monkeypatch, srv)
        p = subprocess.Popen([PY, "-c", LOCKER, str(d)], stdout=subprocess.PIPE, text=True)
        try:
            assert p.stdout.readline().strip() == "locked"
            # while the holder lives, a second run refuses, naming the folder, and sends nothing
            runs, before = tree_digest(tmp_path/"runs"), len(srv.log)
            with pytest.raises(RuntimeError, match="being written by another process"):
                run(phase, models)
            assert len(srv.log) == before and tree_digest(tmp_path/"runs") == runs
        finally:
            p.send_signal(signal.SIGKILL)
            p.wait()
        # once it is dead (killed while holding the lock), the run resumes the folder
        assert run(phase, models) == d
        check_complete_run(d, ["fk-llama"], 2, srv)


def test_unreadable_manifest_pays_nothing_twice(tmp_path, monkeypatch):
    "A manifest cut short: the next run starts a new folder, and only the failed item is bought."
    isolate(monkeypatch, tmp_path)
    with server() as srv:
        phase, models, d = _run_with_one_failed_item(tmp_path, monkeypatch, srv)
        man = (d/"manifest.json").read_text()
        (d/"manifest.json").write_text(man[:len(man) // 2])
        old, before = tree_digest(d), len(srv.log)
        d2 = run(phase, models)
        assert d2 != d and tree_digest(d) == old
        m2, records2, _ = read_run(d2)
        assert m2["status"] == "complete" and m2["items_failed"] == 0
        failed_item_turns = sum(1 for r in records2 if not r["cached"])
        assert len(srv.log) - before == failed_item_turns == m2["calls"]["live"]
