"""One PNG of the figures in a results file: ``make bench`` draws it after the benches.

    .venv/bin/python -m bench.chart [--results bench/results.json] [--out bench/results.png]

Panels, each drawn only when its section is in the file: step events/s per variant (median bar,
min-max whiskers, the ratio to raw-limit on each bar); step one-hop latency per variant (p50 and p99);
parallel events/s by concurrency (the ratio to concurrency 1 on each bar); saga sagas/s and saga
duration (p50, p99, max). The title names the broker, date and machine from the ``meta`` section the
benches write (bench/common.py ``write_meta``), when it is there. ``--out`` defaults to the results
file with ``.png`` for ``.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on a bench machine or in CI

import matplotlib.pyplot as plt  # noqa: E402 - after the backend is chosen
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.ticker import StrMethodFormatter  # noqa: E402

from bench.results import RESULTS  # noqa: E402

SECTIONS = ("step", "parallel", "saga")
BASELINE = "raw-limit"  # bench/step.py's BASELINE; not imported, so the chart needs no Kafka client
COLORS = {"raw": "#9e9e9e", "choreo": "#e07b39", "faststream": "#4c78a8", "other": "#72b7b2"}
P50_COLOR, P99_COLOR, MAX_COLOR = "#f2c29b", "#e07b39", "#a0522d"


class ResultsError(Exception):
    """The results file cannot be drawn; the message names the file, section and field."""


Spread = tuple[float, float, float]  # median, min, max


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ResultsError(f"{where}: expected a number, got {value!r}")
    return float(value)


def _optional(value: Any, where: str) -> float | None:
    return None if value is None else _number(value, where)


def _spread(value: Any, where: str) -> Spread:
    """A figure given either as one number or as ``{"median", "min", "max"}``."""
    if isinstance(value, Mapping):
        missing = [k for k in ("median", "min", "max") if k not in value]
        if missing:
            raise ResultsError(f"{where}: missing {', '.join(missing)}")
        return (_number(value["median"], f"{where}.median"), _number(value["min"], f"{where}.min"),
                _number(value["max"], f"{where}.max"))
    median = _number(value, where)
    return median, median, median


def _field(entry: Any, key: str, where: str) -> Any:
    if not isinstance(entry, Mapping):
        raise ResultsError(f"{where}: expected an object, got {entry!r}")
    if key not in entry:
        raise ResultsError(f"{where}: missing {key!r}")
    return entry[key]


def load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ResultsError(f"{path}: no such results file (run `make bench` first)") from None
    except json.JSONDecodeError as exc:
        raise ResultsError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ResultsError(f"{path}: expected a JSON object of sections, got {type(data).__name__}")
    if not any(s in data for s in SECTIONS):
        raise ResultsError(f"{path}: none of the sections {', '.join(SECTIONS)}; it has {sorted(data) or 'none'}")
    return data


def _color(variant: str) -> str:
    for prefix in ("raw", "choreo", "faststream"):
        if variant.startswith(prefix):
            return COLORS[prefix]
    return COLORS["other"]


def _whiskers(spreads: Sequence[Spread]) -> list[list[float]] | None:
    # A section holding medians only (parallel's, so far) gets no whiskers rather than flat ones.
    if all(lo == hi for _, lo, hi in spreads):
        return None
    return [[m - lo for m, lo, _ in spreads], [hi - m for m, _, hi in spreads]]


def _headroom(ax: Axes, top: float) -> None:
    # Room above the tallest bar for its two-line label.
    ax.set_ylim(0, top * 1.25 if top > 0 else 1)
    ax.yaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))


def step_throughput(ax: Axes, step: Mapping[str, Any]) -> None:
    variants = list(step)
    spreads = [_spread(_field(step[v], "events_per_s", f"step.{v}"), f"step.{v}.events_per_s") for v in variants]
    base = spreads[variants.index(BASELINE)][0] if BASELINE in variants else None
    xs = range(len(variants))
    ax.bar(xs, [s[0] for s in spreads], yerr=_whiskers(spreads), capsize=4, color=[_color(v) for v in variants])
    for x, (median, _, hi) in zip(xs, spreads):
        ratio = f"\n{median / base:.2f}x" if base else ""  # short: the bars of the slow variants stand close
        ax.annotate(f"{median:,.0f}{ratio}", (x, hi), xytext=(0, 3), textcoords="offset points",
                    ha="center", va="bottom", fontsize=8)
    _headroom(ax, max(s[2] for s in spreads))
    ax.set_xticks(list(xs), variants, rotation=20, ha="right")
    ax.set_ylabel("events/s")
    ax.set_title(f"one saga step: throughput, x {BASELINE}\n(median of rounds, whiskers min-max)")


def step_latency(ax: Axes, step: Mapping[str, Any]) -> None:
    variants = list(step)
    p50 = [_optional(_field(step[v], "p50_ms", f"step.{v}"), f"step.{v}.p50_ms") for v in variants]
    p99 = [_optional(_field(step[v], "p99_ms", f"step.{v}"), f"step.{v}.p99_ms") for v in variants]
    base = p99[variants.index(BASELINE)] if BASELINE in variants else None
    width = 0.38
    xs = list(range(len(variants)))
    ax.bar([x - width / 2 for x in xs], [v or 0 for v in p50], width, color=P50_COLOR, label="p50")
    ax.bar([x + width / 2 for x in xs], [v or 0 for v in p99], width, color=P99_COLOR, label="p99")
    for x, value in zip(xs, p99):
        if value is None:
            ax.annotate("not measured", (x, 0), xytext=(0, 3), textcoords="offset points", ha="center",
                        rotation=90, va="bottom", fontsize=8)
            continue
        ratio = f"\n{value / base:.2f}x" if base else ""
        ax.annotate(f"{value:.1f}{ratio}", (x + width / 2, value), xytext=(0, 3), textcoords="offset points",
                    ha="center", va="bottom", fontsize=8)
    _headroom(ax, max((v for v in p99 if v is not None), default=0.0))
    ax.set_xticks(xs, variants, rotation=20, ha="right")
    ax.set_ylabel("ms")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(f"one saga step: one-hop latency\n(p99 labelled, with its ratio to {BASELINE})")


def parallel_throughput(ax: Axes, parallel: Mapping[str, Any]) -> None:
    try:
        levels = sorted(parallel, key=int)
    except ValueError:
        raise ResultsError(f"parallel: expected concurrency levels as keys, got {sorted(parallel)}") from None
    spreads = [_spread(_field(parallel[c], "events_per_s", f"parallel.{c}"), f"parallel.{c}.events_per_s")
               for c in levels]
    violations = [int(_number(parallel[c].get("order_violations", 0), f"parallel.{c}.order_violations"))
                  for c in levels]
    base = spreads[levels.index("1")][0] if "1" in levels else None
    xs = range(len(levels))
    ax.bar(xs, [s[0] for s in spreads], yerr=_whiskers(spreads), capsize=4, color=COLORS["choreo"])
    for x, (median, _, hi), bad in zip(xs, spreads, violations):
        label = f"{median:,.0f}" + (f"\n{median / base:.1f}x of 1" if base else "")
        ax.annotate(label, (x, hi), xytext=(0, 3), textcoords="offset points", ha="center", va="bottom", fontsize=8)
        if bad:
            ax.annotate(f"{bad} order\nviolations", (x, 0), xytext=(0, 3), textcoords="offset points",
                        ha="center", va="bottom", fontsize=8, color="red")
    _headroom(ax, max(s[2] for s in spreads))
    ax.set_xticks(list(xs), levels)
    ax.set_xlabel("Settings.concurrency")
    ax.set_ylabel("events/s")
    ax.set_title("key-ordered parallel processing\n(handler awaits 10 ms; median of rounds)")


def saga_throughput(ax: Axes, saga: Mapping[str, Any]) -> None:
    median, lo, hi = _spread(_field(saga, "sagas_per_s", "saga"), "saga.sagas_per_s")
    ax.bar([0], [median], yerr=_whiskers([(median, lo, hi)]), capsize=6, width=0.5, color=COLORS["choreo"])
    ax.annotate(f"{median:,.0f}", (0, hi), xytext=(0, 3), textcoords="offset points", ha="center", va="bottom",
                fontsize=9)
    outcomes = saga.get("outcomes")
    if isinstance(outcomes, Mapping) and outcomes:
        total = sum(int(n) for n in outcomes.values())
        text = "\n".join(f"{status}: {int(n) / total:.0%}" for status, n in outcomes.items())
        ax.text(0.98, 0.97, text, transform=ax.transAxes, ha="right", va="top", fontsize=8)
    _headroom(ax, hi)
    ax.set_xlim(-1, 1)
    rounds = saga.get("rounds")
    rounds_text = f", {rounds} round{'s' if rounds != 1 else ''}" if rounds else ""
    ax.set_xticks([0], [f"{saga.get('orders', '?')} orders placed at once{rounds_text}"])
    ax.set_ylabel("sagas/s")
    ax.set_title("checkout saga: throughput\n(5 services + tracker; whiskers min-max)")


def saga_duration(ax: Axes, saga: Mapping[str, Any]) -> None:
    names = ("p50_ms", "p99_ms", "max_ms")
    values = [_optional(saga.get(n), f"saga.{n}") for n in names]
    shown = [(n.removesuffix("_ms"), v, c) for n, v, c in zip(names, values, (P50_COLOR, P99_COLOR, MAX_COLOR))
             if v is not None]
    if not shown:
        raise ResultsError("saga: none of p50_ms, p99_ms, max_ms")
    xs = range(len(shown))
    ax.bar(xs, [v for _, v, _ in shown], color=[c for _, _, c in shown], width=0.6)
    for x, (_, value, _) in zip(xs, shown):
        ax.annotate(f"{value:.0f}", (x, value), xytext=(0, 3), textcoords="offset points", ha="center",
                    va="bottom", fontsize=9)
    _headroom(ax, max(v for _, v, _ in shown))
    ax.set_xticks(list(xs), [n for n, _, _ in shown])
    ax.set_ylabel("ms, OrderPlaced to the saga's end")
    rate = saga.get("rate")
    ax.set_title("checkout saga: duration" + (f"\n(at {rate:g} sagas/s)" if isinstance(rate, (int, float)) else ""))


PANELS: tuple[tuple[str, Callable[[Axes, Mapping[str, Any]], None]], ...] = (
    ("step", step_throughput), ("step", step_latency), ("parallel", parallel_throughput),
    ("saga", saga_throughput), ("saga", saga_duration),
)


def title(data: Mapping[str, Any], path: Path) -> str:
    meta = data.get("meta")
    entries = [e for e in meta.values() if isinstance(e, Mapping)] if isinstance(meta, Mapping) else []

    def unique(key: str, clean: Callable[[str], str] = str) -> str:
        return " / ".join(dict.fromkeys(clean(str(e[key])) for e in entries if key in e))

    # Addresses change every run and say nothing about the figures.
    brokers = unique("broker", lambda b: re.sub(r" at \S+", "", b))
    dates = unique("date", lambda d: d[:10])
    machines = unique("machine")
    head = f"choreo benchmarks: {path.name}" + (f", {brokers}" if brokers else "")
    tail = "; ".join(p for p in (dates, machines) if p)
    return head + (f"\n{tail}" if tail else "")


def draw(data: Mapping[str, Any], path: Path, out: Path) -> list[str]:
    """Write the chart to ``out``; returns the sections that were missing (their panels are skipped)."""
    panels = [(name, fn) for name, fn in PANELS if name in data]
    missing = [s for s in SECTIONS if s not in data]
    for name in dict.fromkeys(n for n, _ in panels):
        if not isinstance(data[name], Mapping) or not data[name]:
            raise ResultsError(f"{path}: section {name!r} is empty or not an object")
    cols = 3 if len(panels) > 4 else 2
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.6 * rows), squeeze=False)
    try:
        flat = [ax for row in axes for ax in row]
        for ax, (name, fn) in zip(flat, panels):
            try:
                fn(ax, data[name])
            except ResultsError as exc:
                raise ResultsError(f"{path}: {exc}") from None
            ax.grid(axis="y", alpha=0.3)
            ax.set_axisbelow(True)
        for ax in flat[len(panels):]:
            ax.set_visible(False)
        fig.suptitle(title(data, path), fontsize=11)
        fig.tight_layout()
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=110)
    finally:
        plt.close(fig)
    return missing


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="results file (default: bench/results.json)")
    parser.add_argument("--out", type=Path, default=None, help="PNG to write (default: the results file's .png)")
    args = parser.parse_args(argv)
    out: Path = args.out or args.results.with_suffix(".png")
    try:
        data = load(args.results)
        missing = draw(data, args.results, out)
    except ResultsError as exc:
        print(f"bench.chart: {exc}", file=sys.stderr)
        return 1
    for name in missing:
        print(f"bench.chart: {args.results} has no {name!r} section: its panels are left out", file=sys.stderr)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
