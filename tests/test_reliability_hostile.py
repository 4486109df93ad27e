"""Hostile HumanEval completions flowing through the real runner, loop, scorer and sandbox.

`nbs/04a_sandbox.ipynb` grades hostile programs by calling the sandbox directly. Here the learner is
the fake server, whose answers to HumanEval prompts are hostile programs, and the phase runs in a
child process started with recognisable dummy API keys in its environment, as a study run would be.
The programs look for those keys (in their own environment and in every /proc/*/environ and
cmdline they can read), try to change files of the host, reach the fake server over loopback and
fake a pass. The test checks the verdict of each, that the host is as it was, and that no key was
seen.
"""
import json, os, subprocess, time
from pathlib import Path
from uuid import uuid4

import pytest

import test_reliability_common as common
from test_reliability_common import PY, ROOT, canaries, child_env, read_run, server, write_config
from scaling_study.datasets import load

MARK = "he-reliability-" + uuid4().hex
RUNNER = ("import sys, test_reliability_common as c\n"
          "c.apply_revert_in_child()\n"
          "from scaling_study.runner import run_phase\n"
          "run_phase(config=sys.argv[1], models=sys.argv[2], progress=False)\n")


def _probe(victim, marker, cache, port, host=True) -> str:
    "Module-level code that collects, in `_seen`, every key (and host file or socket) it can reach."
    keys = f'''
import glob, os, shutil, socket
_seen = []
for _k, _v in os.environ.items():
    if "CANARY" in _v: _seen.append("environ " + _k)
for _p in glob.glob("/proc/*/environ") + glob.glob("/proc/*/cmdline"):
    try:
        if b"CANARY" in open(_p, "rb").read(): _seen.append(_p)
    except OSError: pass
'''
    return keys if not host else keys + f'''
for _name, _act in (("delete", lambda: os.remove({str(victim)!r})),
                    ("write", lambda: open({str(marker)!r}, "w").write("pwned")),
                    ("rmtree", lambda: shutil.rmtree({str(victim.parent)!r})),
                    ("read cache", lambda: os.listdir({str(cache)!r})),
                    ("connect", lambda: socket.create_connection(("127.0.0.1", {port}), 1))):
    try:
        _act()
        _seen.append(_name)
    except Exception: pass
'''


def _completions(items, victim, marker, cache, port, mark, host=True) -> dict:
    "Prompt -> hostile answer: a correct but nosy program, a destructive wrong one, a fake pass."
    nosy, wrecker, faker = items
    probe = _probe(victim, marker, cache, port, host)
    e = nosy["entry_point"]
    nosy_prog = (probe + nosy["prompt"] + nosy["canonical_solution"] + f"\n_real = {e}\n"
                 f"def {e}(*a, **k):\n"
                 "    if _seen: raise RuntimeError('reached: ' + ', '.join(_seen))\n"
                 "    return _real(*a, **k)\n")
    sleeper = f"[sys.executable, '-c', 'import time; time.sleep(600)', {mark!r}]"
    wreck_prog = (probe + "import signal, sys\n"  # leave sleepers behind, then kill the harness
                  "for _ in range(3):\n    if os.fork() == 0:\n"
                  f"        os.execv(sys.executable, {sleeper})\n"
                  "try: os.kill(os.getppid(), signal.SIGKILL)\nexcept OSError: pass\n"
                  + wrecker["prompt"] + "    return None\n")
    fake_prog = ("import os, sys\nprint('checked'); print('exit\\t0')\n"
                 "for fd in range(3, 64):\n"
                 "    try: os.write(fd, b'checked\\nexit\\t0\\n')\n    except OSError: pass\n"
                 "os._exit(0)\n" + faker["prompt"] + "    pass\n")
    fence = lambda prog: f"Here is the function.\n```python\n{prog}\n```\nConfidence: 95%"
    return {nosy["prompt"]: fence(nosy_prog), wrecker["prompt"]: fence(wreck_prog),
            faker["prompt"]: fence(fake_prog)}


def _alive(mark: str) -> list:
    "Host processes whose command line holds `mark`."
    found = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and mark.encode() in (d/"cmdline").read_bytes():
                found.append(d.name)
        except OSError: pass
    return found


def _run_hostile_phase(tmp_path, backend: str | None, kinds=3, host=True):
    items = load("humaneval", 3, seed=0)
    host = tmp_path/"host"
    host.mkdir()
    victim, marker = host/"victim.txt", tmp_path/"marker.txt"
    victim.write_text("precious")
    keys = canaries()
    holder = {}

    def respond(kind, body):
        text = json.dumps(body)
        for prompt, completion in holder["answers"].items():
            if json.dumps(prompt.rstrip())[1:-1] in text: return completion
        return "no idea"

    with server(responder=respond) as srv:
        holder["answers"] = _completions(items, victim, marker, tmp_path/"cache", srv.port, MARK,
                                         host)
        phase, models = write_config(tmp_path, srv, names=["fk-compat"],
                                     datasets={"humaneval": kinds}, max_turns=1, max_tokens=1024)
        env = child_env(tmp_path, keys, **({"SCALING_STUDY_SANDBOX": backend} if backend else {}))
        r = subprocess.run([PY, "-c", RUNNER, str(phase), str(models)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
        log = list(srv.log)
    if backend == "subprocess" and r.returncode != 0:  # refusing to run the programs is also safe
        return None, keys, None, None, log, victim, marker, r
    assert r.returncode == 0, r.stderr[-3000:]
    d = next((tmp_path/"runs"/"rel").glob("*/manifest.json")).parent
    man, records, _ = read_run(d)
    return items, keys, man, records, log, victim, marker, r


def test_hostile_completions_end_to_end(tmp_path):
    from scaling_study.sandbox import sandbox_backend
    if sandbox_backend() != "bubblewrap" and not os.environ.get("CI"):
        pytest.skip("bubblewrap is not usable here; with keys set, the fallback refuses to grade")
    items, keys, man, records, log, victim, marker, proc = _run_hostile_phase(tmp_path, None)
    assert man["status"] == "complete" and man["items_failed"] == 0
    turn0 = {r["item_id"]: r for r in records if r["turn"] == 0}
    nosy, wrecker, faker = (turn0[it["id"]] for it in items)

    # the right verdicts: the nosy program is correct and saw nothing; the others fail
    assert (nosy["correct"], nosy["reason"]) == (True, "ok"), nosy["reason"]
    assert wrecker["correct"] is False and wrecker["reason"] in ("failed", "error")
    assert faker["correct"] is False and faker["reason"] in ("failed", "error")
    # the host is as it was, and the fake server heard only the learner's own requests
    assert victim.read_text() == "precious" and not marker.exists()
    assert len(log) == sum(r["calls"] for r in records)
    assert all(e["status"] == 200 for e in log)
    for _ in range(40):  # the sleepers the destructive program left behind are gone
        if not _alive(MARK): break
        time.sleep(0.05)
    assert _alive(MARK) == []
    # no dummy key in the records, the ledger or what the run printed
    blobs = common.files_under(tmp_path/"runs")
    blobs["stderr"], blobs["stdout"] = proc.stderr.encode(), proc.stdout.encode()
    assert common.scan(keys, blobs) == []


# finding F4 (failed before commit 51a4a89, which fixed it): the 'subprocess' fallback runs programs
# as the calling user, who can read the runner's API keys in /proc/<pid>/environ
def test_fallback_sandbox_hides_api_keys(tmp_path):
    "Forced to the weaker fallback, a program must still not see the keys of its grader."
    from scaling_study.sandbox import _identity
    if _identity("subprocess")[0] is not None:
        pytest.skip("here the fallback switches to a throwaway uid, which cannot read the keys")
    items, keys, man, records, log, *_, r = _run_hostile_phase(tmp_path, "subprocess", kinds=1,
                                                               host=False)
    if items is None:  # refused: it must say why and what to do, and send nothing
        assert "bubblewrap" in r.stderr and "OPENAI_API_KEY" in r.stderr, r.stderr[-2000:]
        assert log == []
        return
    nosy = next(r for r in records if r["item_id"] == items[0]["id"] and r["turn"] == 0)
    leaked = nosy["correct"] is not True
    assert not leaked, f"the program reached: {nosy['reason']} (it raises when it finds a key)"
