"""Bad input: each must stop the run with an error that names the problem and the fix, before any
request reaches a provider, and leave what an earlier run recorded exactly as it was.

Every case first makes a real run folder (one learner, one item), then breaks one thing and runs
again. The fake server must see no request from the second attempt, and the earlier folder must be
byte for byte the same.
"""
import json, math, shutil, subprocess

import pytest
import yaml

import test_reliability_common as common
from test_reliability_common import BIN, ROOT, child_env, isolate, make_root, run, server, \
    tree_digest, write_config
from scaling_study import datasets
from scaling_study.core import ConfigError


@pytest.fixture(autouse=True)
def _revert(monkeypatch):
    common.apply_revert(monkeypatch)


class Case:
    "A prepared project: a finished run folder, valid config files and a live fake server."
    def __init__(self, tmp, monkeypatch, srv):
        self.tmp, self.mp, self.srv = tmp, monkeypatch, srv
        self.keys = isolate(monkeypatch, tmp)
        self.root = make_root(tmp)
        monkeypatch.setenv("SCALING_STUDY_ROOT", str(self.root))
        self.phase, self.models = write_config(tmp, srv, names=["fk-compat", "fk-claude"],
                                               datasets={"gsm8k": 1}, max_turns=1)
        self.first = run(self.phase, self.models)
        assert json.loads((self.first/"manifest.json").read_text())["status"] == "complete"
        self.before, self.requests = tree_digest(tmp/"runs"), len(srv.log)
        monkeypatch.setattr(datasets, "_LOADED", {})  # a new process would read the data again

    def edit(self, phase=None, entry=None, text=None):
        "Change the phase file (`phase` dict merged in), or fk-compat's entry, or replace a file."
        if phase is not None:
            cfg = {**yaml.safe_load(self.phase.read_text()), **phase}
            self.phase.write_text(yaml.safe_dump(cfg))
        if entry is not None:
            ms = yaml.safe_load(self.models.read_text())
            entry(ms["fk-compat"])
            self.models.write_text(yaml.safe_dump(ms))

    def check_untouched(self):
        assert len(self.srv.log) == self.requests, "a request was sent"
        now = tree_digest(self.tmp/"runs")
        kept = {k: v for k, v in now.items() if k in self.before}
        assert kept == self.before, "a recorded file changed"


@pytest.fixture
def case(tmp_path, monkeypatch):
    with server() as srv:
        yield Case(tmp_path, monkeypatch, srv)


def _gsm8k(c): return c.root/"data"/"gsm8k"/"test.jsonl"

def _break_line(c, i=7, text='{"question": "Natalia sold clips to 48 of her friends in April, and'):
    lines = _gsm8k(c).read_text().splitlines(True)
    lines[i - 1] = text + "\n"
    _gsm8k(c).write_text("".join(lines))


def _set(d, path, value):
    *head, last = path
    for k in head: d = d.setdefault(k, {})
    d[last] = value


BAD = {
    # name: (how to break it, run_phase keyword arguments, error type, texts the message must hold)
    "unknown model": (lambda c: c.edit(phase={"models": ["fk-compt", "fk-claude"]}), {},
                      ConfigError, ["unknown model 'fk-compt'", "Did you mean 'fk-compat'?",
                                    "--models"]),
    "typo in a phase key": (lambda c: c.edit(phase={"max_turn": 2}), {}, ConfigError,
                            ["unknown key 'max_turn'", "Did you mean 'max_turns'?"]),
    "typo in a model key": (lambda c: c.edit(entry=lambda e: e.update(base_ulr=e["base_url"])), {},
                            ConfigError, ["fk-compat has unknown key 'base_ulr'",
                                          "Did you mean 'base_url'?"]),
    "typo in a price key": (lambda c: c.edit(entry=lambda e: _set(e, ["price", "ouptut"], 1.0)), {},
                            ConfigError, ["fk-compat.price has unknown key 'ouptut'",
                                          "Did you mean 'output'?"]),
    "typo in a provider": (lambda c: c.edit(entry=lambda e: e.update(provider="anthropc")), {},
                           ConfigError, ["fk-compat.provider is 'anthropc'",
                                         "Did you mean 'anthropic'?"]),
    "typo in a dataset": (lambda c: c.edit(phase={"datasets": {"gsm8K": 1}}), {}, ConfigError,
                          ["unknown dataset 'gsm8K'", "Did you mean 'gsm8k'?"]),
    "typo in the policy": (lambda c: c.edit(phase={"feedback": "intrinsc"}), {}, ConfigError,
                           ["feedback is 'intrinsc'", "Did you mean 'intrinsic'?"]),
    "negative budget in the phase": (lambda c: c.edit(phase={"budget_usd": -5}), {}, ConfigError,
                                     ["budget_usd is -5", ">= 0"]),
    "negative budget argument": (lambda c: None, {"budget": -1}, ConfigError,
                                 ["--budget is -1", ">= 0"]),
    "limit of zero": (lambda c: None, {"limit": 0}, ConfigError, ["--limit is 0", ">= 1"]),
    "estimate over the budget": (lambda c: c.edit(phase={"budget_usd": 0.01}), {}, ConfigError,
                                 ["exceeds the budget of $0.01", "--limit", "--yes"]),
    "a model without a price": (lambda c: c.edit(entry=lambda e: _set(e, ["price", "input"], None)),
                                {}, ConfigError, ["No price is known for ['fk-compat']", "--yes"]),
    "missing data folder": (lambda c: shutil.rmtree(_gsm8k(c).parent), {}, FileNotFoundError,
                            ["Dataset 'gsm8k' is not present", "data/gsm8k/test.jsonl",
                             "git checkout -- data/"]),
    "malformed dataset line": (_break_line, {}, ValueError,
                               ["test.jsonl, line 7: not valid JSON",
                                "git checkout -- data/"]),
    "phase file is not YAML": (lambda c: c.phase.write_text("name: rel\nmodels: [fk-compat\n"), {},
                               ConfigError, ["phase.yaml' is not valid YAML"]),
    "models file missing": (lambda c: c.models.unlink(), {}, ConfigError,
                            ["models.yaml' does not exist"]),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_input_stops_before_any_request(case, name):
    brk, kw, exc, texts = BAD[name]
    brk(case)
    with pytest.raises(exc) as err:
        run(case.phase, case.models, **kw)
    for t in texts: assert t in str(err.value), (t, str(err.value))
    case.check_untouched()
    assert tree_digest(case.tmp/"runs") == case.before, "a run folder was created"


def test_missing_api_key_is_named_before_any_request(case):
    case.mp.delenv("ANTHROPIC_API_KEY")
    case.edit(phase={"datasets": {"gsm8k": 2}})  # new items: calls are needed
    want = "no API key. Set the environment variable ANTHROPIC_API_KEY"
    with pytest.raises(Exception, match=want):
        run(case.phase, case.models)
    case.check_untouched()


def test_cli_rejects_a_negative_budget_and_limit(case):
    env = child_env(case.tmp, case.keys, SCALING_STUDY_ROOT=case.root)
    cmd = [str(BIN/"scaling-study"), "run", "--config", str(case.phase),
           "--models", str(case.models)]
    for args, want in ((["--budget", "-1"], "error: --budget is -1.0; give a finite number of dollars"),
                       (["--limit", "0"], "error: --limit is 0; give a whole number of items")):
        r = subprocess.run(cmd + args, cwd=ROOT, env=env, capture_output=True, text=True)
        assert r.returncode == 2 and want in r.stderr, r.stderr[-2000:]
    case.check_untouched()
    assert tree_digest(case.tmp/"runs") == case.before


def test_papermill_parameter_of_the_wrong_type(case):
    "`papermill nbs/phases/run_phase.ipynb OUT -p limit ten` names the parameter and its type."
    env = child_env(case.tmp, case.keys, SCALING_STUDY_ROOT=case.root)
    out = case.tmp/"out.ipynb"
    cmd = [str(BIN/"papermill"), "nbs/phases/run_phase.ipynb", str(out), "-p", "phase", "",
           "-p", "config", str(case.phase), "-p", "models", str(case.models), "-p", "limit", "ten"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    want = "papermill parameter limit is 'ten' (str); it must be a whole number >= 0, e.g. -p limit"
    assert want in r.stderr or want in out.read_text(), r.stderr[-2000:]
    case.check_untouched()
    assert tree_digest(case.tmp/"runs") == case.before


# --- bad input found by this suite (findings F5-F8 in RELIABILITY.md) -----------------------------
# finding F5 (failed before commit 51a4a89, which fixed it): keys under `limits` are not checked, so
# a typo is silently ignored (here: the 1.5 s timeout becomes 60 s)
def test_typo_in_a_limits_key(case):
    case.edit(entry=lambda e: e["limits"].update(timout=e["limits"].pop("timeout")))
    with pytest.raises(ConfigError, match=r"unknown key 'timout'.*Did you mean 'timeout'"):
        run(case.phase, case.models)
    case.check_untouched()


# finding F5 (failed before commit 51a4a89, which fixed it): limits.concurrency 0 is accepted and
# the run then waits forever on a zero-sized semaphore
def test_zero_concurrency_is_rejected(case):
    from scaling_study.core import load_phase
    case.edit(entry=lambda e: e["limits"].update(concurrency=0))
    # checked at load time: a run would hang, which is the bug
    with pytest.raises(ConfigError, match="concurrency"):
        load_phase(config=case.phase, models=case.models)


# finding F6 (failed before commit 51a4a89, which fixed it): a budget of NaN passes every check and
# turns the budget guard off
@pytest.mark.parametrize("where", ["phase file", "run_phase argument", "command line"])
def test_nan_budget_is_rejected(case, where):
    if where == "phase file":
        case.edit(phase={"budget_usd": math.nan, "datasets": {"gsm8k": 2}})
        with pytest.raises(ConfigError, match="budget"): run(case.phase, case.models)
    elif where == "run_phase argument":
        case.edit(phase={"datasets": {"gsm8k": 2}})
        with pytest.raises(ConfigError, match="budget"):
            run(case.phase, case.models, budget=math.nan)
    else:
        case.edit(phase={"datasets": {"gsm8k": 2}, "budget_usd": 0.01})
        env = child_env(case.tmp, case.keys, SCALING_STUDY_ROOT=case.root)
        cmd = [str(BIN/"scaling-study"), "run", "--config", str(case.phase), "--models",
               str(case.models), "--budget", "nan"]
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode != 0 and "--budget is nan" in r.stderr, r.stderr[-1500:]
    case.check_untouched()


# finding F7 (failed before commit 51a4a89, which fixed it): a data line that is JSON but lacks a
# field raises a bare KeyError/TypeError naming neither file nor fix
@pytest.mark.parametrize("line", ['{"question": "What is 2 + 2?"}', "[1, 2]"],
                         ids=["no answer", "a list"])
def test_dataset_line_with_wrong_fields(case, line):
    _break_line(case, 7, line)
    with pytest.raises(ValueError, match=r"test\.jsonl.*git checkout -- data/"):
        run(case.phase, case.models)
    case.check_untouched()


# finding F7 (failed before commit 51a4a89, which fixed it): an empty or shortened data file runs
# silently on fewer or other items ('complete' with 0 items)
@pytest.mark.parametrize("keep", [0, 600], ids=["empty file", "cut at a line end"])
def test_incomplete_dataset_file(case, keep):
    lines = _gsm8k(case).read_text().splitlines(True)
    _gsm8k(case).write_text("".join(lines[:keep]))
    with pytest.raises(ValueError, match=r"gsm8k.*1319"):
        run(case.phase, case.models)
    case.check_untouched()


# finding F8 (failed before commit 51a4a89, which fixed it): `scaling-study run` reports only
# 'PapermillExecutionError' when a key is missing, not which key
def test_cli_names_a_missing_api_key(case):
    env = child_env(case.tmp, {k: v for k, v in case.keys.items() if k != "ANTHROPIC_API_KEY"},
                    SCALING_STUDY_ROOT=case.root)
    case.edit(phase={"datasets": {"gsm8k": 2}})
    cmd = [str(BIN/"scaling-study"), "run", "--config", str(case.phase),
           "--models", str(case.models)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    case.check_untouched()
    assert "ANTHROPIC_API_KEY" in r.stderr, r.stderr[-1500:]


# --- input of our own making (findings N4-N6 in RELIABILITY.md) ----------------------------------
# finding N4 (failed before commit a22e5f1, which fixed it): a learner listed twice runs every item
# twice at once and pays for some requests twice
def test_learner_listed_twice_is_rejected(case):
    case.edit(phase={"models": ["fk-compat", "fk-claude", "fk-compat"], "datasets": {"gsm8k": 2}})
    with pytest.raises(ConfigError, match="fk-compat"):
        run(case.phase, case.models)
    case.check_untouched()


# finding N5 (failed before commit a22e5f1, which fixed it): the phase name is used as a folder name
# unchecked, so `name: ../x` (or an absolute path) writes outside runs/
def test_phase_name_cannot_leave_the_runs_folder(case):
    case.edit(phase={"name": "../outside", "datasets": {"gsm8k": 2}})
    try:
        with pytest.raises(ConfigError, match="name"):
            run(case.phase, case.models)
    finally:
        escaped = (case.tmp/"outside").exists()
        shutil.rmtree(case.tmp/"outside", ignore_errors=True)
    assert not escaped
    case.check_untouched()


# finding N6 (failed before commit a22e5f1, which fixed it): a --models file that is not valid YAML
# raises a bare yaml error about '<unicode string>', not naming the file
def test_models_file_that_is_not_yaml(case):
    case.models.write_text("fk-compat: {provider: openai-compatible\n")
    with pytest.raises(ConfigError, match="models.yaml"):
        run(case.phase, case.models)
    case.check_untouched()
