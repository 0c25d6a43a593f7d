"""Shared pytest set-up for the dermfs test suite.

Log guard: a test fails when any ``dermfs`` / ``dermfs.*`` logger emits a record of
level WARNING or above while the test (including its fixtures) runs, unless the test
is marked ``@pytest.mark.expect_log``. Tests that expect warnings can still inspect
them with ``caplog``.

Records are caught by a handler on the ``dermfs`` logger itself, so they are seen even
if that logger has ``propagate = False``; a *child* logger with ``propagate = False``
escapes the guard. Records emitted in a *different process* (e.g. a filesystem mounted
by a subprocess) are not seen here.
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Iterator

import pytest

pytest_plugins = ["pytester"]

_LOGGER_NAME = "dermfs"
_MARKER = "expect_log"


class _GuardHandler(logging.Handler):
    """Collects WARNING+ records from the dermfs logger hierarchy."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.records: list[logging.LogRecord] = []
        self.reported = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def take_unreported(self) -> list[logging.LogRecord]:
        new = self.records[self.reported :]
        self.reported = len(self.records)
        return new


_guard_key = pytest.StashKey[_GuardHandler]()


def _describe(records: list[logging.LogRecord], when: str) -> str:
    lines = [
        f"dermfs logged {len(records)} record(s) at WARNING or above during {when}; "
        f"mark the test @pytest.mark.{_MARKER} if this is intended:"
    ]
    for rec in records:
        lines.append(f"  {rec.levelname} {rec.name}: {rec.getMessage()}")
    return "\n".join(lines)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{_MARKER}: the test expects dermfs.* loggers to emit WARNING or higher "
        "(disables the log guard)",
    )


@pytest.fixture(autouse=True)
def _dermfs_log_guard(request: pytest.FixtureRequest) -> Iterator[None]:
    """Install the guard handler for the whole test, fixtures included."""
    handler = _GuardHandler()
    logger = logging.getLogger(_LOGGER_NAME)
    logger.addHandler(handler)
    request.node.stash[_guard_key] = handler
    try:
        yield
    finally:
        logger.removeHandler(handler)
    # Records emitted by other fixtures' teardown (this fixture is torn down last).
    if request.node.get_closest_marker(_MARKER) is None:
        late = handler.take_unreported()
        if late:
            pytest.fail(_describe(late, "teardown"), pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    """Turn dermfs warnings from setup and the test body into a test failure."""
    result = yield
    handler = item.stash.get(_guard_key, None)
    if handler is not None and item.get_closest_marker(_MARKER) is None:
        records = handler.take_unreported()
        if records:
            pytest.fail(_describe(records, "the test"), pytrace=False)
    return result
