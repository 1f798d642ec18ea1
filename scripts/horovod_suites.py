#!/usr/bin/env python3
"""Horovod's own test suites (upstream `test/parallel`) against the installed build.

    scripts/horovod_suites.py [--suites DIR] [--out DIR] [SUITE ...]

Each suite runs under `horovodrun -np 2 -H localhost:2 --gloo`, every rank in
pytest; rank 0's JUnit report gives each test's outcome. Outcomes are compared
with tests/horovod_known_failures.yaml (test id -> the reason it fails): a
failure not listed fails the run (exit 1), and a listed test that passes is
reported, so the list only shrinks. A suite whose ranks die before the report
is written counts as failed.

The suites are read where they are, never copied: --suites, else
$HVDTRAIN_HOROVOD_SUITES, else a `shared/upstream/horovod-test` folder beside
the checkout or one of its parents. They import `mock` and `parameterized`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
KNOWN = ROOT / "tests" / "horovod_known_failures.yaml"
SUITES = ("test_torch.py", "test_tensorflow.py", "test_tensorflow2_keras.py", "test_tensorflow_process_sets.py",
          "test_process_sets_static.py", "test_timeline.py")


def find_suites(given: str | None = None) -> Path | None:
    candidates = [given, os.environ.get("HVDTRAIN_HOROVOD_SUITES")]
    candidates += [str(parent / "shared" / "upstream" / "horovod-test") for parent in ROOT.parents]
    for candidate in candidates:
        if candidate and (Path(candidate) / "parallel" / "test_torch.py").is_file():
            return Path(candidate)
    return None


def known_failures() -> dict[str, str]:
    return yaml.safe_load(KNOWN.read_text()) or {}


def outcomes(report: Path) -> dict[str, str]:
    """test id (suite::Class::test) -> passed | failed | skipped, from a JUnit report."""
    found = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        module, _, cls = case.get("classname", "").rpartition(".")
        test_id = f"{module or cls}.py::{cls}::{case.get('name')}" if module else f"{cls}::{case.get('name')}"
        kinds = {child.tag for child in case}
        found[test_id] = "failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds else "passed"
    return found


def run_suite(suites: Path, suite: str, out: Path, timeout: int = 1800) -> dict:
    horovodrun = shutil.which("horovodrun", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    reports = [out / f"{suite}.rank{r}.xml" for r in (0, 1)]
    for report in reports:
        report.unlink(missing_ok=True)
    # pytest in every rank; each rank writes its own report and log
    script = (f"exec {sys.executable} -m pytest -q -p no:cacheprovider -rfE {suite} "
              f"--junitxml={out}/{suite}.rank$HOROVOD_RANK.xml > {out}/{suite}.rank$HOROVOD_RANK.log 2>&1")
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    began = time.monotonic()
    try:
        proc = subprocess.run([horovodrun, "-np", "2", "-H", "localhost:2", "--gloo", "sh", "-c", script],
                              cwd=suites / "parallel", env=env, capture_output=True, text=True, timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        code = "timeout"
    result = {"suite": suite, "seconds": round(time.monotonic() - began, 1), "exit": code}
    if not reports[0].is_file():
        log = out / f"{suite}.rank0.log"
        tail = log.read_text()[-1500:] if log.is_file() else ""
        return {**result, "aborted": True, "tests": {}, "log_tail": tail}
    return {**result, "aborted": False, "tests": outcomes(reports[0])}


def judge(result: dict, known: dict[str, str]) -> dict:
    suite = result["suite"]
    tests = result["tests"]
    failed = sorted(t for t, o in tests.items() if o == "failed")
    counts = {o: sum(1 for v in tests.values() if v == o) for o in ("passed", "failed", "skipped")}
    mine = {t: r for t, r in known.items() if t.startswith(f"{suite}::")}
    return {**result, "counts": counts, "unexpected": [t for t in failed if t not in mine],
            "known": [t for t in failed if t in mine], "now_passing": sorted(t for t in mine if tests.get(t) == "passed")}


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
    known, results, bad = known_failures(), [], False
    for suite in args.suites:
        result = judge(run_suite(where, suite, out), known)
        results.append(result)
        c = result["counts"]
        state = "ABORTED" if result["aborted"] else f"{c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped"
        print(f"{suite}: {state} ({result['seconds']:.0f} s); {len(result['known'])} known failures", flush=True)
        for test in result["unexpected"]:
            print(f"  UNEXPECTED FAILURE {test}")
        for test in result["now_passing"]:
            print(f"  now passes (remove it from {KNOWN.name}): {test}")
        if result["aborted"]:
            print("  the ranks ended before the report was written; rank 0's log ends:\n" + result["log_tail"])
        bad |= result["aborted"] or bool(result["unexpected"])
    (out / "summary.json").write_text(json.dumps(results, indent=2))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
