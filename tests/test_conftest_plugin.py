"""Self-test of the dermfs log guard defined in tests/conftest.py."""

from __future__ import annotations

from pathlib import Path

import pytest

CONFTEST = Path(__file__).with_name("conftest.py")

INNER_TESTS = """
import logging

import pytest

log = logging.getLogger("dermfs.sample")


def test_info_is_fine():
    log.info("just information")


def test_warning_fails():
    log.warning("disk %s is getting full", "sda")


def test_error_from_root_dermfs_logger_fails():
    logging.getLogger("dermfs").error("bad thing")


def test_other_logger_is_ignored():
    logging.getLogger("somelib").warning("not ours")
    logging.getLogger("dermfsx").warning("prefix but not a child")


@pytest.mark.expect_log
def test_marked_may_warn(caplog):
    log.warning("expected warning")
    assert "expected warning" in caplog.text


@pytest.fixture
def noisy_teardown():
    yield
    log.warning("warned during teardown")


def test_teardown_warning_is_caught(noisy_teardown):
    pass


@pytest.fixture
def noisy_setup():
    log.warning("warned during setup")


def test_setup_warning_is_caught(noisy_setup):
    pass

"""


def test_log_guard(pytester: pytest.Pytester) -> None:
    # A subprocess, so the inner tests' dermfs warnings do not trip this test's own guard.
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(test_inner=INNER_TESTS)
    inner_result = pytester.runpytest_subprocess("-v", "-p", "no:cacheprovider", "--strict-markers")

    inner_result.assert_outcomes(passed=4, failed=3, errors=1)
    inner_result.stdout.fnmatch_lines_random(
        [
            "*test_info_is_fine PASSED*",
            "*test_warning_fails FAILED*",
            "*test_error_from_root_dermfs_logger_fails FAILED*",
            "*test_other_logger_is_ignored PASSED*",
            "*test_marked_may_warn PASSED*",
            "*test_teardown_warning_is_caught ERROR*",
            "*test_setup_warning_is_caught FAILED*",
        ]
    )
    inner_result.stdout.fnmatch_lines_random(
        [
            "*WARNING dermfs.sample: disk sda is getting full*",
            "*ERROR dermfs: bad thing*",
            "*WARNING dermfs.sample: warned during teardown*",
            "*@pytest.mark.expect_log*",
        ]
    )
    assert "not ours" not in inner_result.stdout.str()
    assert "prefix but not a child" not in inner_result.stdout.str()
