"""Secrets: a run made with recognisable dummy keys, through faults that make the SDKs raise and a
hostile API that echoes the caller's key back in its 401 errors, must not write the keys anywhere.

The scan covers every file under the run and cache folders (records, manifests, calls.jsonl, the
superseded records, the executed phase notebook of `scaling-study run`, the SQLite bytes of the
request cache and its write-ahead log), what the command printed (its log), the log records of an
in-process run at DEBUG level (httpx and the SDKs included), and every member of the archive
`scaling_study.package.package` writes. It looks for each whole key and for any 12 characters of
the random tag the keys share.
"""
import logging, subprocess, tarfile

import pytest

import test_reliability_common as common
from test_reliability_common import BIN, ROOT, EchoServer, canaries, child_env, isolate, \
    make_root, model_entries, read_run, run, scan, server, write_config


@pytest.fixture(autouse=True)
def _revert(monkeypatch):
    common.apply_revert(monkeypatch)


def _echo_entries(echo) -> dict:
    "One learner per provider, each pointed at the echoing server."
    price = {"input": 1.0, "output": 2.0, "as_of": "2026-12-04", "source": "reliability tests"}
    lim = {"concurrency": 1, "timeout": 2}
    return {"fk-echo": dict(provider="openai-compatible", model="echo", base_url=echo.url + "/v1",
                            price=price, limits=lim),
            "fk-echo-openai": dict(provider="openai", model="echo", base_url=echo.url + "/v1",
                                   price=price, limits=lim),
            "fk-echo-claude": dict(provider="anthropic", model="echo", base_url=echo.url,
                                   price=price, limits=lim),
            "fk-echo-llama": dict(provider="replicate", model="meta/meta-llama-3-8b-instruct",
                                  base_url=echo.url, price=price, limits=lim)}


FAULTS = ["500", "429", "truncated", "malformed", "no_usage", "failed", "hang", "529", "reset"]


def test_no_dummy_key_in_anything_the_product_writes(tmp_path, monkeypatch):
    keys = canaries()
    root = make_root(tmp_path, link_data=True)
    with server() as srv, EchoServer("401+header") as echo:
        entries = {**model_entries(srv), **_echo_entries(echo)}
        phase, models = write_config(tmp_path, srv, names=list(entries), entries=entries,
                                     datasets={"gsm8k": 2}, max_turns=1)
        srv.inject(*FAULTS)
        env = child_env(tmp_path, keys, SCALING_STUDY_ROOT=root, SCALING_STUDY_RUNS=root/"runs",
                        SCALING_STUDY_CACHE=root/"cache")
        cmd = [str(BIN/"scaling-study"), "-v", "run", "--config", str(phase),
               "--models", str(models)]
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        sent = {k for _, k in echo.seen}
    d = next((root/"runs"/"rel").glob("*/manifest.json")).parent
    man, records, ledger = read_run(d)

    # the run happened as intended: the keys went out and the faults hit the SDKs
    assert r.returncode in (0, 3), r.stderr[-3000:]
    assert {keys[v] for v in ("FK_ECHO_API_KEY", "OPENAI_API_KEY", "ANTHROPIC_API_KEY",
                              "REPLICATE_API_TOKEN")} <= sent
    assert srv.pending == [] and (d/"run_phase.ipynb").exists()

    # nothing the run wrote or printed holds a key
    blobs = common.files_under(root/"runs", root/"cache")
    blobs["stdout"], blobs["stderr"] = r.stdout.encode(), r.stderr.encode()
    assert any(p.endswith(".db") for p in blobs)
    assert any(p.endswith("run_phase.ipynb") for p in blobs)
    assert scan(keys, blobs) == []
    # ... although the keys did come back, in the 401 errors now recorded with the key masked
    errors = [r_["error"] for r_ in records if r_["error"]]
    assert any("HTTP 401" in e and "[key]" in e for e in errors), errors
    assert man["calls"]["failed"] >= 4

    # nor does the archive for reviewers, packaged later in a shell without the keys
    monkeypatch.setenv("SCALING_STUDY_ROOT", str(root))
    monkeypatch.setenv("SCALING_STUDY_CACHE", str(root/"cache"))
    for k in keys: monkeypatch.delenv(k, raising=False)
    from scaling_study.package import package
    out, _ = package(tmp_path/"artifact.tar.gz", with_cache=True, root=root)
    with tarfile.open(out) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    assert any("records.jsonl" in n for n in members) and any("cache.db" in n for n in members)
    assert scan(keys, members) == []


def test_keys_echoed_in_provider_errors_are_masked(tmp_path, monkeypatch, caplog):
    """In-process: the echoed keys reach no file, no log record of the product at any level, and no
    record of any logger at INFO or above. (At DEBUG, httpcore and the SDKs print response headers
    verbatim, so a server that names the key in a header puts it there; see RELIABILITY.md.)"""
    caplog.set_level(logging.DEBUG)
    keys = isolate(monkeypatch, tmp_path)
    with EchoServer("401+header") as echo:
        entries = _echo_entries(echo)
        phase, models = write_config(tmp_path, None, names=list(entries), entries=entries,
                                     datasets={"gsm8k": 2}, max_turns=1)
        d = run(phase, models)
    man, records, ledger = read_run(d)
    assert man["items_failed"] == 8 and len(echo.seen) == 8
    assert all("[key]" in r["error"] for r in records)
    blobs = common.files_under(tmp_path/"runs", tmp_path/"cache")
    ours = [r for r in caplog.records if r.name.startswith("scaling_study")]
    assert any("HTTP 401" in r.getMessage() for r in ours)
    blobs["log: scaling_study, all levels"] = "\n".join(r.getMessage() for r in ours).encode()
    blobs["log: all loggers, INFO and above"] = "\n".join(
        r.getMessage() for r in caplog.records if r.levelno >= logging.INFO).encode()
    assert scan(keys, blobs) == []


def test_package_masks_key_shaped_text_without_the_keys_in_the_environment(tmp_path, monkeypatch):
    "A key a model repeated in its answer lands in the records; the archive must still not hold it."
    keys = isolate(monkeypatch, tmp_path)
    root = make_root(tmp_path, link_data=True)
    monkeypatch.setenv("SCALING_STUDY_ROOT", str(root))
    monkeypatch.setenv("SCALING_STUDY_RUNS", str(root/"runs"))
    monkeypatch.setenv("SCALING_STUDY_CACHE", str(root/"cache"))
    leak = {k: v for k, v in keys.items() if k in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY",
                                                    "REPLICATE_API_TOKEN")}
    parrot = lambda kind, body: "My keys are " + " ".join(leak.values()) + "\nFinal answer: 1"
    with server(responder=parrot) as srv:
        phase, models = write_config(tmp_path, srv, names=["fk-compat"], datasets={"gsm8k": 1},
                                     max_turns=1)
        d = run(phase, models)
    assert scan(leak, common.files_under(d)) != [], "the answers with the keys are in the records"
    for k in keys: monkeypatch.delenv(k, raising=False)
    from scaling_study.package import package
    # text files are scrubbed: the archive of the runs holds no key, and the report says so
    out, report = package(tmp_path/"artifact.tar.gz", root=root)
    with tarfile.open(out) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    assert any("records.jsonl" in n for n in members)
    assert scan(leak, members) == []
    assert "key" in set(report["kind"])
    # the cache's SQLite bytes cannot be scrubbed, so packaging it is refused, naming the file
    with pytest.raises(RuntimeError, match=r"Not writing .*cache/requests/cache\.db"):
        package(tmp_path/"with-cache.tar.gz", with_cache=True, root=root)
    assert not (tmp_path/"with-cache.tar.gz").exists()
