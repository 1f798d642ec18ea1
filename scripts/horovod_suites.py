#!/usr/bin/env python3
"""Horovod's own test suites (upstream `test/parallel`) against the installed build.

    scripts/horovod_suites.py [--suites-dir DIR] [--out DIR] [SUITE ...]

Each suite runs under `horovodrun -np 2 -H localhost:2 --gloo`, every rank in
pytest with a JUnit report and an exit code of its own. A suite passes only
where all of these hold, on every rank:
- every failure is listed in tests/horovod_known_failures.yaml with its reason,
  and its message matches the entry's `error` pattern (a listed test that fails
  for another reason is a new failure);
- every listed test fails (one that passes, or no longer runs, fails the run:
  the list only shrinks); a test listed as a race (one that depends on timing by
  its own design) may pass or fail with its stated error, and is in no count;
- the counts of passed and skipped tests are the expected ones (a regression
  that makes tests skip, or not be collected, is seen);
- each rank's pytest exits as those outcomes say (0 with no failure, 1 with
  failures; anything else, or a missing report, is an abort), and horovodrun
  exits 0 (each rank's shell records pytest's exit and ends with 0, so a
  non-zero exit means a rank died).

The suites are read where they are, never copied: --suites-dir, else
$HVDTRAIN_HOROVOD_SUITES, else a `shared/upstream/horovod-test` folder beside
the checkout or one of its parents. They import `mock` and `parameterized`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
KNOWN = ROOT / "tests" / "horovod_known_failures.yaml"
# SUITE@keras2: the suite with TF_USE_LEGACY_KERAS=1, tf.keras being the tf-keras package
# (Keras 2), as Horovod's Keras 2 users run it; without it, TensorFlow 2.21's Keras 3.
SUITES = ("test_torch.py", "test_tensorflow.py", "test_tensorflow2_keras.py", "test_tensorflow_process_sets.py",
          "test_process_sets_static.py", "test_timeline.py", "test_tensorflow.py@keras2",
          "test_tensorflow2_keras.py@keras2")
MODES = {"": {}, "keras2": {"TF_USE_LEGACY_KERAS": "1"}}
RANKS = (0, 1)


def find_suites(given: str | None = None) -> Path | None:
    candidates = [given, os.environ.get("HVDTRAIN_HOROVOD_SUITES")]
    candidates += [str(parent / "shared" / "upstream" / "horovod-test") for parent in ROOT.parents]
    for candidate in candidates:
        if candidate and (Path(candidate) / "parallel" / "test_torch.py").is_file():
            return Path(candidate)
    return None


def expectations(path: Path = KNOWN) -> dict[str, dict]:
    """suite -> {passed, skipped, failures: {test id: {reason, error}}, races: {...}}, each
    entry checked. `races` are tests that race by their own design (a timing assumption
    in the test): each may pass or fail with its stated error, and is in no count."""
    suites = (yaml.safe_load(path.read_text()) or {}).get("suites", {})
    for suite, expected in suites.items():
        for key in ("passed", "skipped"):
            if not isinstance(expected.get(key), int):
                raise ValueError(f"{path.name}: {suite}.{key} must be a count")
        for kind in ("failures", "races"):
            for test, entry in (expected.get(kind) or {}).items():
                if not (isinstance(entry, dict) and entry.get("reason") and entry.get("error")):
                    raise ValueError(f"{path.name}: {suite}.{kind}.{test} needs a reason and an error pattern")
                re.compile(entry["error"])
    return suites


def outcomes(report: Path) -> dict[str, tuple[str, str]]:
    """test id (Class::test) -> (passed | failed | skipped, the failure's message and text)."""
    found = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        cls = case.get("classname", "").rpartition(".")[2]
        test_id = f"{cls}::{case.get('name')}"
        failures = [child for child in case if child.tag in ("failure", "error")]
        if failures:
            found[test_id] = ("failed", "\n".join(f"{c.get('message', '')}\n{c.text or ''}" for c in failures))
        else:
            found[test_id] = ("skipped" if any(c.tag == "skipped" for c in case) else "passed", "")
    return found


def run_suite(suites: Path, suite: str, out: Path, timeout: int = 1800) -> dict:
    horovodrun = shutil.which("horovodrun", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    files = {kind: [out / f"{suite}.rank{r}.{kind}" for r in RANKS] for kind in ("xml", "log", "exit")}
    for path in sum(files.values(), []):
        path.unlink(missing_ok=True)
    # pytest in every rank; each rank writes its own report, log and exit code, and its
    # shell ends with 0 (horovodrun would end the other rank as soon as one exits non-zero,
    # before that rank had written its own): horovodrun's non-zero exit means a rank died
    base = f"{out}/{suite}.rank$HOROVOD_RANK"
    test_file, _, mode = suite.partition("@")
    script = (f"{sys.executable} -m pytest -q -p no:cacheprovider -rfE {test_file} --junitxml={base}.xml "
              f"> {base}.log 2>&1; echo $? > {base}.exit")
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1", **MODES[mode]}
    began = time.monotonic()
    try:
        proc = subprocess.run([horovodrun, "-np", str(len(RANKS)), "-H", f"localhost:{len(RANKS)}", "--gloo",
                               "sh", "-c", script],
                              cwd=suites / "parallel", env=env, capture_output=True, text=True, timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        code = "timeout"
    ranks = []
    for report, log, exit_file in zip(files["xml"], files["log"], files["exit"]):
        ranks.append({"exit": int(exit_file.read_text()) if exit_file.is_file() else None,
                      "tests": outcomes(report) if report.is_file() else None,
                      "log_tail": log_end(log)})
    return {"suite": suite, "seconds": round(time.monotonic() - began, 1), "exit": code, "ranks": ranks}


def log_end(log: Path) -> str:
    """A rank's log from a fatal error on (where it says what happened), else its end."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    fatal = text.find("Fatal Python error")
    return text[fatal:fatal + 1500] if fatal >= 0 else text[-1500:]


def judge(result: dict, expected: dict | None) -> dict:
    """What is wrong with one suite's run (a list of sentences, empty when it passed), and
    each rank's counts (the tests listed as races left out)."""
    suite, problems = result["suite"], []
    listed, races = (expected or {}).get("failures") or {}, (expected or {}).get("races") or {}
    counts = [None if ran["tests"] is None else
              {o: sum(1 for t, (outcome, _) in ran["tests"].items() if outcome == o and t not in races)
               for o in ("passed", "failed", "skipped")} for ran in result["ranks"]]
    if expected is None:
        return {**result, "counts": counts, "problems": [f"{suite} has no entry in {KNOWN.name}"]}
    for rank, ran, count in zip(RANKS, result["ranks"], counts):
        if count is None:
            problems.append(f"rank {rank} wrote no report (pytest exit {ran['exit']}); its log ends:\n"
                            + ran["log_tail"])
            continue
        for test, (outcome, message) in sorted(ran["tests"].items()):
            entry = listed.get(test) or races.get(test)
            if outcome != "failed" or (entry and re.search(entry["error"], message)):
                continue
            if entry is None:
                problems.append(f"rank {rank}: UNEXPECTED FAILURE {test}: {message.strip()[:300]}")
            else:
                problems.append(f"rank {rank}: {test} failed, but not with /{entry['error']}/ "
                                f"({entry['reason']}): {message.strip()[:300]}")
        for test in sorted(listed):
            outcome = ran["tests"].get(test, ("not run", ""))[0]
            if outcome != "failed":
                problems.append(f"rank {rank}: {test} is listed as failing but {outcome} now: remove it "
                                f"from {KNOWN.name}")
        for key in ("passed", "skipped"):
            if count[key] != expected[key]:
                which = sorted(t for t, (o, _) in ran["tests"].items() if o == key and t not in races) \
                    if key == "skipped" else []
                problems.append(f"rank {rank}: {count[key]} {key}, expected {expected[key]}"
                                + (f" (skipped: {', '.join(which)})" if which else ""))
        failed = sum(1 for outcome, _ in ran["tests"].values() if outcome == "failed")
        if ran["exit"] != (1 if failed else 0):
            problems.append(f"rank {rank}: pytest exited {ran['exit']}, expected {1 if failed else 0} "
                            f"with {failed} failures")
    if result["exit"] != 0:
        problems.append(f"horovodrun exited {result['exit']}: a rank died (each rank's shell exits 0)")
    return {**result, "counts": counts, "problems": problems}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suites", nargs="*", default=list(SUITES), help="suite files (default: all)")
    parser.add_argument("--suites-dir", help="Horovod's test folder (the one holding parallel/)")
    parser.add_argument("--out", default="horovod-suites", help="reports and summary.json (default ./horovod-suites)")
    args = parser.parse_args()
    where = find_suites(args.suites_dir)
    if where is None:
        print("Horovod's suites not found: give --suites-dir or HVDTRAIN_HOROVOD_SUITES", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    expected, results = expectations(), []
    for suite in args.suites:
        result = judge(run_suite(where, suite, out), expected.get(suite))
        results.append(result)
        shown = "; ".join(f"rank {r}: {c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped"
                          if c else f"rank {r}: no report" for r, c in zip(RANKS, result["counts"]))
        print(f"{suite}: {shown} ({result['seconds']:.0f} s, horovodrun exit {result['exit']}): "
              f"{'FAILED' if result['problems'] else 'as expected'}", flush=True)
        for problem in result["problems"]:
            print(f"  {problem}")
    (out / "summary.json").write_text(json.dumps(results, indent=2))
    return 1 if any(r["problems"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
