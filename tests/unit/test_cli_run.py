"""``choreo run``'s process-level choices: the start-up heap leaves the cyclic collector's scans."""

from __future__ import annotations

import subprocess
import sys

from choreo.cli import run as run_command


def test_tune_gc_freezes_the_heap_and_raises_the_young_threshold() -> None:
    # In a child process: the collector's settings are the whole process's, not this test's to change.
    code = (
        "import gc\n"
        "from choreo.cli.run import GC_THRESHOLD, tune_gc\n"
        "before = gc.get_freeze_count()\n"
        "tune_gc()\n"
        "assert gc.get_threshold() == GC_THRESHOLD, gc.get_threshold()\n"
        "assert gc.get_freeze_count() > before + 10_000, gc.get_freeze_count()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_no_gc_tuning_is_an_option_of_run() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    run_command.register(parser.add_subparsers())
    assert parser.parse_args(["run", "m:s"]).gc_tuning is True
    assert parser.parse_args(["run", "m:s", "--no-gc-tuning"]).gc_tuning is False
