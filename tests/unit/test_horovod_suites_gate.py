"""The gate over Horovod's own suites (scripts/horovod_suites.py), judged on JUnit
reports written here: a problem on either rank, a listed test failing for another
reason or passing, a changed skip count and an exit code that disagrees each fail
the suite."""
import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import horovod_suites  # noqa: E402

EXPECTED = {"passed": 2, "skipped": 1, "failures": {
    "TorchTests::test_listed": {"reason": "the test's own Keras 2 call", "error": r"AttributeError: .*ref"}},
    "races": {"TorchTests::test_timed": {"reason": "the test's own timing", "error": "False is not true"}}}
AS_EXPECTED = {"test_a": "passed", "test_b": "passed", "test_skip": "skipped", "test_timed": "passed",
               "test_listed": ("failed", "AttributeError: 'Variable' object has no attribute 'ref'")}


def report(path, cases: dict) -> None:
    rows = []
    for name, outcome in cases.items():
        kind, message = outcome if isinstance(outcome, tuple) else (outcome, "")
        inner = {"passed": "", "skipped": '<skipped message="no GPU"/>',
                 "failed": f'<failure message="{message}">Traceback ...</failure>'}[kind]
        rows.append(f'<testcase classname="test_torch.TorchTests" name="{name}">{inner}</testcase>')
    path.write_text(f'<testsuites><testsuite name="pytest">{"".join(rows)}</testsuite></testsuites>')


def run(tmp_path, rank0=AS_EXPECTED, rank1=AS_EXPECTED, exits=(1, 1), launcher=0):
    ranks = []
    for rank, cases, code in zip((0, 1), (rank0, rank1), exits):
        tests = None
        if cases is not None:
            report(tmp_path / f"r{rank}.xml", cases)
            tests = horovod_suites.outcomes(tmp_path / f"r{rank}.xml")
        ranks.append({"exit": code, "tests": tests, "log_tail": "Fatal Python error"})
    result = {"suite": "test_torch.py", "seconds": 1.0, "exit": launcher, "ranks": ranks}
    return horovod_suites.judge(result, EXPECTED)["problems"]


def test_a_run_with_only_its_listed_failure_passes(tmp_path):
    assert run(tmp_path) == []


def test_a_failure_on_rank_1_alone_fails_the_suite(tmp_path):
    problems = run(tmp_path, rank1={**AS_EXPECTED, "test_b": ("failed", "AssertionError: 3 != 4")})
    assert problems[0].startswith("rank 1: UNEXPECTED FAILURE TorchTests::test_b: AssertionError: 3 != 4")


def test_a_listed_test_failing_for_another_reason_is_a_new_failure(tmp_path):
    broken = {**AS_EXPECTED, "test_listed": ("failed", "RuntimeError: Horovod has been shut down")}
    problems = run(tmp_path, rank0=broken)
    assert problems == ["rank 0: TorchTests::test_listed failed, but not with /AttributeError: .*ref/ (the "
                        "test's own Keras 2 call): RuntimeError: Horovod has been shut down\nTraceback ..."]


def test_a_listed_test_that_passes_fails_the_suite(tmp_path):
    fixed = {**AS_EXPECTED, "test_listed": "passed"}
    problems = run(tmp_path, rank0=fixed, rank1=fixed, exits=(0, 0))
    assert "rank 0: TorchTests::test_listed is listed as failing but passed now" in problems[0]
    assert "rank 0: 3 passed, expected 2" in problems


def test_a_test_that_skips_now_changes_the_count_and_fails(tmp_path):
    problems = run(tmp_path, rank1={**AS_EXPECTED, "test_b": "skipped"})
    assert problems == ["rank 1: 1 passed, expected 2",
                        "rank 1: 2 skipped, expected 1 (skipped: TorchTests::test_b, TorchTests::test_skip)"]


def test_a_race_may_pass_or_fail_with_its_error_only(tmp_path):
    lost = {**AS_EXPECTED, "test_timed": ("failed", "AssertionError: False is not true")}
    assert run(tmp_path, rank1=lost) == []
    broken = {**AS_EXPECTED, "test_timed": ("failed", "RuntimeError: Gloo connect timeout")}
    assert run(tmp_path, rank1=broken)[0].startswith("rank 1: TorchTests::test_timed failed, but not with")


def test_a_rank_without_a_report_fails_the_suite(tmp_path):
    problems = run(tmp_path, rank1=None, exits=(1, None))
    assert problems[0].startswith("rank 1 wrote no report (pytest exit None); its log ends:\nFatal Python error")


@pytest.mark.parametrize("exits, launcher, expected", [
    ((1, 1), 1, "horovodrun exited 1: a rank died (each rank's shell exits 0)"),
    ((1, 2), 0, "rank 1: pytest exited 2, expected 1 with 1 failures"),
    ((1, 1), "timeout", "horovodrun exited timeout: a rank died (each rank's shell exits 0)"),
])
def test_exit_codes_that_disagree_with_the_reports_fail(tmp_path, exits, launcher, expected):
    assert run(tmp_path, exits=exits, launcher=launcher) == [expected]


def test_the_suites_list_gives_every_entry_a_reason_and_an_error_pattern(tmp_path):
    suites = horovod_suites.expectations()
    assert set(suites) == set(horovod_suites.SUITES)
    assert sum(len(s.get("failures") or {}) for s in suites.values()) > 0
    bad = tmp_path / "known.yaml"
    bad.write_text("suites:\n  test_torch.py:\n    passed: 1\n    skipped: 0\n"
                   "    failures:\n      TorchTests::test_x: just a reason\n")
    with pytest.raises(ValueError, match="test_torch.py.failures.TorchTests::test_x needs a reason and an error"):
        horovod_suites.expectations(bad)
