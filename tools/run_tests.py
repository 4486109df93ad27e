"""Run the project's tests and end with one line `N passed, N failed`.

Each library notebook in nbs/ is one test, run the way `nbdev-test` runs it (every code cell, cells
flagged with a `tst_flags` directive skipped). The phase and analysis notebooks are then smoke-run
with papermill on a tiny sample, and the pytest files in tests/ (things a notebook cell cannot host)
run last. Usage: python tools/run_tests.py [--flags slow] [NOTEBOOK ...]
"""
import argparse, os, subprocess, sys, tempfile, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _one(path, flags):
    "Test one notebook in its own process (a crash in one cannot take the others down)."
    t0 = time.time()
    code = ("import sys; from nbdev.config import get_config; from nbdev.test import test_nb; "
            "flags = sys.argv[2].split(); skip = [f for f in get_config().tst_flags.split() if f not in flags]; "
            "ok, _ = test_nb(sys.argv[1], skip_flags=skip, force_flags=flags); sys.exit(0 if ok else 1)")
    r = subprocess.run([sys.executable, "-c", code, path, " ".join(flags)], cwd=ROOT, capture_output=True, text=True)
    if r.returncode: print(r.stdout[-3000:], r.stderr[-3000:], file=sys.stderr)
    return str(Path(path).relative_to(ROOT)), r.returncode == 0, time.time() - t0


def notebooks(names):
    if names: return [str((ROOT/n).resolve()) for n in names]
    return sorted(str(p) for p in (ROOT/"nbs").glob("*.ipynb") if not p.name.startswith(("_", ".")))


def papermill_smoke(results):
    "Run the phase notebook on one item per learner, then the analysis notebook, in a scratch runs folder."
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as d:
        env["SCALING_STUDY_RUNS"] = d
        cases = [("papermill nbs/phases/run_phase.ipynb (local, 1 item)",
                  ["papermill", "nbs/phases/run_phase.ipynb", f"{d}/run.ipynb", "-p", "phase", "local",
                   "-p", "limit", "1", "-y", "overrides: {max_turns: 1, max_tokens: 64}"]),
                 ("papermill nbs/analysis/analyze.ipynb (that run)",
                  ["papermill", "nbs/analysis/analyze.ipynb", f"{d}/analyze.ipynb", "-y", "phases: [local]",
                   "-p", "figures_dir", f"{d}/figures", "-p", "tables_dir", f"{d}/tables"])]
        for name, cmd in cases:
            t0 = time.time()
            r = subprocess.run([str(Path(sys.executable).parent/cmd[0]), *cmd[1:]], cwd=ROOT, env=env,
                               capture_output=True, text=True)
            if r.returncode: print(r.stderr[-3000:], file=sys.stderr)
            results.append((name, r.returncode == 0, time.time() - t0))


def docs_checks(results):
    "The docs sources build (nbdev-proc-nbs; Quarto itself is not installable here) and every notebook opens."
    t0 = time.time()
    r = subprocess.run([str(Path(sys.executable).parent/"nbdev-proc-nbs")], cwd=ROOT, capture_output=True, text=True)
    bad = r.returncode != 0 or "Found cells containing imports" in r.stderr
    if bad: print(r.stderr[-3000:], file=sys.stderr)
    results.append(("docs: nbdev-proc-nbs builds the docs sources", not bad, time.time() - t0))
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    t0 = time.time()
    spec = KernelSpecManager().get_kernel_spec("python3")
    ok = Path(spec.argv[0]).resolve().parent == Path(sys.executable).resolve().parent or \
         spec.argv[0] in ("python", "python3", sys.executable)
    problems = []
    for nb in sorted(ROOT.glob("nbs/**/*.ipynb")):
        if ".ipynb_checkpoints" in nb.parts: continue
        try:
            n = nbformat.read(nb, as_version=4); nbformat.validate(n)
            if n.metadata.get("kernelspec", {}).get("name") != "python3": problems.append(f"{nb.name}: kernel")
        except Exception as e: problems.append(f"{nb.name}: {e}")
    if problems or not ok: print("notebooks that would not open with the project kernel:", problems, spec.argv, file=sys.stderr)
    results.append(("docs: every notebook opens with the project's python3 kernel", ok and not problems, time.time() - t0))


def pytest_files(results):
    if not any((ROOT/"tests").glob("test_*.py")): return
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=ROOT,
                       capture_output=True, text=True)
    print(r.stdout[-4000:], r.stderr[-2000:], file=sys.stderr)
    import re
    p = sum(int(x) for x in re.findall(r"(\d+) passed", r.stdout))
    f = sum(int(x) for x in re.findall(r"(\d+) (?:failed|error)", r.stdout))
    if r.returncode not in (0, 5) and f == 0: f = 1
    results += [("pytest", True, 0)] * p + [("pytest", False, 0)] * f


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--flags", default="", help="also run cells with these directives, e.g. slow")
    ap.add_argument("--no-smoke", action="store_true")
    ap.add_argument("notebooks", nargs="*")
    a = ap.parse_args()
    os.chdir(ROOT)
    flags = a.flags.split()
    results = []
    with ThreadPoolExecutor(max_workers=2) as ex:
        for name, ok, secs in ex.map(_one, notebooks(a.notebooks), [flags] * len(notebooks(a.notebooks))):
            print(f"{'PASS' if ok else 'FAIL'} {name} ({secs:.0f}s)", flush=True)
            results.append((name, ok, secs))
    if not a.notebooks and not a.no_smoke:
        n = len(results)
        papermill_smoke(results)
        docs_checks(results)
        pytest_files(results)
        for name, ok, secs in results[n:]:
            if name != "pytest": print(f"{'PASS' if ok else 'FAIL'} {name} ({secs:.0f}s)", flush=True)
    passed = sum(ok for _, ok, _ in results)
    print(f"{passed} passed, {len(results) - passed} failed")
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
