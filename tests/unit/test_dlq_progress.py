"""The progress display of ``choreo dlq replay``: one line redrawn on a terminal, a line per tenth elsewhere."""

from __future__ import annotations

import io

from choreo.cli.dlq import Progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _run(stream: io.StringIO, total: int, *, step_s: float = 0.05, enabled: bool = True) -> Progress:
    clock = _Clock()
    progress = Progress(total, stream, verb="replayed", enabled=enabled, clock=clock)
    for done in range(1, total + 1):
        clock.now += step_s
        progress.line(f"record {done}")
        progress.update(done)
    progress.close()
    return progress


def test_without_a_terminal_a_plain_line_each_tenth() -> None:
    out = io.StringIO()
    _run(out, 50)
    lines = [line for line in out.getvalue().splitlines() if not line.startswith("record")]
    assert lines[0] == "replayed 5/50 (10%) 20/s, eta 2s"
    assert lines[-1] == "replayed 50/50 (100%) 20/s"
    assert len(lines) == 10
    assert out.getvalue().count("record ") == 50
    assert "\r" not in out.getvalue()


def test_small_totals_get_a_line_per_record_and_zero_gets_none() -> None:
    out = io.StringIO()
    _run(out, 3)
    assert [line for line in out.getvalue().splitlines() if line.startswith("replayed")] == [
        "replayed 1/3 (33%) 20/s, eta 0s", "replayed 2/3 (66%) 20/s, eta 0s", "replayed 3/3 (100%) 20/s"]
    empty = io.StringIO()
    Progress(0, empty, verb="replayed").close()
    assert empty.getvalue() == ""


def test_on_a_terminal_one_line_redrawn_in_place_with_records_above_it() -> None:
    out = _Terminal()
    _run(out, 40)
    text = out.getvalue()
    assert text.endswith("\r\033[Kreplayed 40/40 (100%) 20/s\n")
    # Every record line first clears the progress line, which is drawn again below it.
    assert text.count("\r\033[Krecord ") == 39  # the first record comes before any progress line
    shown = [part.split("\n")[0] for part in text.split("\r\033[K") if part.startswith("replayed")]
    assert shown[0].startswith("replayed 1/40 (2%)") and shown[-1] == "replayed 40/40 (100%) 20/s"
    assert text.count("\n") == 41  # 40 records and the final line


def test_disabled_progress_writes_only_the_lines_given() -> None:
    for stream in (io.StringIO(), _Terminal()):
        _run(stream, 10, enabled=False)
        assert stream.getvalue() == "".join(f"record {i}\n" for i in range(1, 11))
