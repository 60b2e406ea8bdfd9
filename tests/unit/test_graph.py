"""The flow graph, built from declarations alone: checks, order, drawings and ``choreo graph``.

Every test builds its own small services inline (they are never started, so no transport or store is
involved) and asserts the exact list of problem kinds, then that each message names the path.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from choreo import Context, Event, FlowGraph, Problem, Saga, Service, Settings, Step
from choreo.cli import main
from choreo.schemas import AvroSchema, parse_schema


def _schema(name: str) -> AvroSchema:
    return parse_schema({"type": "record", "name": name, "namespace": "graphtest", "version": 1,
                         "fields": [{"name": "order_id", "type": "string"}]})


class Started(Event, schema=_schema("Started")):
    order_id: str


class X(Event, schema=_schema("X")):
    order_id: str


class Y(Event, schema=_schema("Y")):
    order_id: str


class Z(Event, schema=_schema("Z")):
    order_id: str


class Finished(Event, schema=_schema("Finished")):
    order_id: str


class Failed(Event, schema=_schema("Failed")):
    order_id: str


class Refunded(Event, schema=_schema("Refunded")):
    order_id: str


class Released(Event, schema=_schema("Released")):
    order_id: str


class Cancelled(Event, schema=_schema("Cancelled")):
    order_id: str


class Orphan(Event, schema=_schema("Orphan")):
    order_id: str


async def _handler(event: Any, ctx: Context) -> None:
    pass


class _Services:
    """Services by name, created on first use; ``step``/``compensation`` register one handler each."""

    def __init__(self) -> None:
        self.by_name: dict[str, Service] = {}

    def _get(self, name: str) -> Service:
        if name not in self.by_name:
            self.by_name[name] = Service(name, settings=Settings())
        return self.by_name[name]

    def step(self, step_id: str, consumes: type[Event], emits: Sequence[type[Event]] = (), *,
             compensable: bool = True) -> None:
        service, _, handler = step_id.partition(".")
        self._get(service).on(consumes, emits=emits, name=handler, compensable=compensable)(_handler)

    def compensation(self, step_id: str, consumes: type[Event], emits: Sequence[type[Event]] = (), *,
                     undoes: str | None = None) -> None:
        service, _, handler = step_id.partition(".")
        self._get(service).compensate(consumes, emits=emits, name=handler, undoes=undoes)(_handler)

    def graph(self, *sagas: Saga) -> FlowGraph:
        return FlowGraph.build(self.by_name.values(), sagas)


def _saga(starts_with: type[Event] = Started, completes_on: Sequence[type[Event]] = (Finished,),
          fails_on: Sequence[type[Event]] = (), name: str = "flow", on_timeout: str = "report") -> Saga:
    # "report" keeps these small graphs about one rule each; timeout compensation has its own tests.
    return Saga(name, starts_with=starts_with, completes_on=completes_on, fails_on=fails_on,
                deadline=timedelta(seconds=30), on_timeout=on_timeout)


def _kinds(problems: list[Problem]) -> list[str]:
    return [p.kind for p in problems]


def _reference() -> FlowGraph:
    from services.checkout import checkout, services

    return FlowGraph.build(services, [checkout])


# -- building -----------------------------------------------------------------------------------------


def test_build_makes_one_step_per_handler() -> None:
    s = _Services()
    s.step("a.reserve", Started, [X])
    s.step("a.note", X, compensable=False)
    s.compensation("a.release", Failed, [Released], undoes="reserve")
    graph = s.graph(_saga())
    assert graph.steps == [
        Step("a", "reserve", Started, frozenset({X}), False, None, True),
        Step("a", "note", X, frozenset(), False, None, False),
        Step("a", "release", Failed, frozenset({Released}), True, "reserve", False),
    ]
    assert graph.steps[0].id == "a.reserve"
    assert [p.id for p in graph.producers(X)] == ["a.reserve"]
    assert [c.id for c in graph.consumers(X)] == ["a.note"]
    assert graph.consumers(Orphan) == [] and graph.producers(Orphan) == []


def test_problem_str_is_kind_then_message() -> None:
    assert str(Problem("cycle", "a.x -[X]-> a.x")) == "cycle: a.x -[X]-> a.x"


# -- (1) the reference system ---------------------------------------------------------------------------


def test_reference_checkout_system_has_no_problems() -> None:
    graph = _reference()
    assert graph.check() == []
    assert len(graph.steps) == 13


def test_reference_checkout_without_its_saga_has_dangling_ends() -> None:
    from services.checkout import services

    problems = FlowGraph.build(services).check()
    assert _kinds(problems) == ["unproduced", "unconsumed"]  # in the order of the steps' ids
    assert "OrderPlaced consumed by inventory.reserve_stock" in problems[0].message
    assert "CustomerNotified emitted by notification.notify_shipped" in problems[1].message


# -- (2) cycles ------------------------------------------------------------------------------------------


def test_forward_cycle_is_one_problem_naming_both_steps() -> None:
    s = _Services()
    s.step("a.h", Y, [X])
    s.step("b.h", X, [Y])
    problems = s.graph().check()
    assert _kinds(problems) == ["cycle"]
    assert "a.h -[X]-> b.h -[Y]-> a.h" in problems[0].message


def test_cycle_behind_a_start_names_only_the_loop() -> None:
    s = _Services()
    s.step("a.start", Started, [X])
    s.step("b.one", X, [Y])
    s.step("c.two", Y, [Z])
    s.step("d.three", Z, [X, Finished])
    problems = s.graph(_saga()).check()
    assert _kinds(problems) == ["cycle"]
    assert problems[0].message.endswith("b.one -[Y]-> c.two -[Z]-> d.three -[X]-> b.one")
    assert "a.start" not in problems[0].message


def test_self_loop_is_a_cycle() -> None:
    s = _Services()
    s.step("a.start", Started, [X])
    s.step("a.again", X, [X, Finished])
    problems = s.graph(_saga()).check()
    assert _kinds(problems) == ["cycle"]
    assert "a.again -[X]-> a.again" in problems[0].message


def test_compensation_loop_is_a_cycle() -> None:
    s = _Services()
    s.step("a.reserve", Started, [Finished, Refunded])
    s.compensation("a.release", Refunded, [Released], undoes="reserve")
    s.compensation("b.refund", Released, [Refunded])
    problems = s.graph(_saga()).check()
    assert _kinds(problems) == ["cycle"]
    assert "a.release -[Released]-> b.refund -[Refunded]-> a.release" in problems[0].message


# -- (3) unconsumed --------------------------------------------------------------------------------------


def test_emitted_event_nobody_consumes_is_unconsumed() -> None:
    s = _Services()
    s.step("a.h", Started, [X])
    s.step("b.h", X, [Z])
    problems = s.graph(_saga()).check()
    assert _kinds(problems) == ["unconsumed"]
    assert problems[0].message == "Z emitted by b.h is consumed by no handler and ends no saga"


@pytest.mark.parametrize("end", ["completes_on", "fails_on"])
def test_saga_end_event_needs_no_consumer(end: str) -> None:
    s = _Services()
    s.step("a.h", Started, [X], compensable=False)  # a failure end asks for compensations (see below)
    s.step("b.h", X, [Z])
    saga = Saga("flow", starts_with=Started, on_timeout="report",
                **{"completes_on": [Finished], end: [Z]})  # type: ignore[arg-type]
    assert s.graph(saga).check() == []


def test_compensation_emitting_an_event_nobody_consumes_is_unconsumed() -> None:
    s = _Services()
    s.step("a.reserve", Started, [Finished, Failed])
    s.compensation("a.release", Failed, [Released], undoes="reserve")
    problems = s.graph(_saga()).check()
    assert _kinds(problems) == ["unconsumed"]
    assert "Released emitted by a.release" in problems[0].message


# -- (4) unproduced --------------------------------------------------------------------------------------


def test_consumed_event_nobody_emits_is_unproduced() -> None:
    s = _Services()
    s.step("a.h", Started, [Finished])
    s.step("c.h", Orphan, [Finished])
    problems = s.graph(_saga()).check()
    assert _kinds(problems) == ["unproduced"]
    assert problems[0].message == "Orphan consumed by c.h is emitted by no handler and starts no saga"


def test_saga_start_event_needs_no_producer() -> None:
    s = _Services()
    s.step("a.h", Started, [Finished])
    s.step("c.h", Orphan, [Finished])
    assert s.graph(_saga(), _saga(starts_with=Orphan, name="other")).check() == []


def test_without_a_saga_the_start_is_unproduced_and_the_end_unconsumed() -> None:
    s = _Services()
    s.step("a.h", Started, [Finished])
    problems = s.graph().check()
    assert _kinds(problems) == ["unconsumed", "unproduced"]
    assert "Finished emitted by a.h" in problems[0].message
    assert "Started consumed by a.h" in problems[1].message


# -- (5) missing compensations ---------------------------------------------------------------------------


def _abc(*, b_compensable: bool = True) -> _Services:
    """a.reserve -[X]-> b.charge -[Y]-> c.ship, which emits Finished or the failure event Failed."""
    s = _Services()
    s.step("a.reserve", Started, [X])
    s.step("b.charge", X, [Y], compensable=b_compensable)
    s.step("c.ship", Y, [Finished, Failed])
    return s


def test_failure_after_an_uncompensated_step_is_missing_compensation() -> None:
    s = _abc()
    s.compensation("a.release", Failed, [Cancelled], undoes="reserve")
    problems = s.graph(_saga(fails_on=[Cancelled])).check()
    assert _kinds(problems) == ["missing-compensation"]
    message = problems[0].message
    assert message.startswith("Failed from c.ship leaves b.charge uncompensated")
    assert "(path: b.charge -[Y]-> c.ship -[Failed]->)" in message
    assert "undoes='charge'" in message and "compensable=False" in message


def test_not_compensable_step_needs_no_compensation() -> None:
    s = _abc(b_compensable=False)
    s.compensation("a.release", Failed, [Cancelled], undoes="reserve")
    assert s.graph(_saga(fails_on=[Cancelled])).check() == []


def test_every_uncompensated_earlier_step_is_named_with_its_whole_path() -> None:
    s = _abc()
    s.compensation("c.apologise", Failed, [Cancelled])  # consumes the failure, undoes nothing
    problems = s.graph(_saga(fails_on=[Cancelled])).check()
    assert _kinds(problems) == ["missing-compensation", "missing-compensation"]
    assert "leaves a.reserve uncompensated (path: a.reserve -[X]-> b.charge -[Y]-> c.ship -[Failed]->)" in (
        problems[0].message)
    assert "leaves b.charge uncompensated (path: b.charge -[Y]-> c.ship -[Failed]->)" in problems[1].message


def test_compensation_reached_through_another_compensation_counts() -> None:
    s = _abc()
    s.compensation("b.refund", Failed, [Refunded], undoes="charge")
    s.compensation("a.release", Refunded, [Cancelled], undoes="reserve")
    assert s.graph(_saga(fails_on=[Cancelled])).check() == []


def test_compensation_on_another_failure_path_does_not_count() -> None:
    s = _abc()
    s.step("b.audit", X, [Orphan], compensable=False)  # a second failure event, from another branch
    s.compensation("b.refund", Failed, [Cancelled], undoes="charge")
    s.compensation("a.release", Orphan, [Cancelled], undoes="reserve")
    problems = s.graph(_saga(fails_on=[Cancelled])).check()
    assert _kinds(problems) == ["missing-compensation"]
    assert problems[0].message.startswith("Failed from c.ship leaves a.reserve uncompensated")


def test_saga_failure_event_emitted_by_a_step_needs_compensations_too() -> None:
    s = _Services()
    s.step("a.reserve", Started, [X])
    s.step("b.charge", X, [Finished, Cancelled])
    problems = s.graph(_saga(fails_on=[Cancelled])).check()
    assert _kinds(problems) == ["missing-compensation"]
    assert problems[0].message.startswith(
        "Cancelled from b.charge leaves a.reserve uncompensated (path: a.reserve -[X]-> b.charge -[Cancelled]->)")


def test_the_failing_step_itself_needs_no_compensation() -> None:
    s = _Services()
    s.step("a.reserve", Started, [Finished, Failed])
    s.compensation("b.notify", Failed)
    assert s.graph(_saga()).check() == []


# -- (6) compensations leading forward --------------------------------------------------------------------


def test_compensation_emitting_to_a_forward_step() -> None:
    s = _Services()
    s.step("a.reserve", Started, [X])
    s.step("b.charge", X, [Finished, Failed])
    s.compensation("a.release", Failed, [Released], undoes="reserve")
    s.step("c.rebook", Released, [Finished])
    problems = s.graph(_saga()).check()
    assert _kinds(problems) == ["compensation-leads-forward"]
    assert problems[0].message == "a.release -[Released]-> c.rebook: c.rebook is a forward step"


def test_compensation_leading_forward_through_another_compensation() -> None:
    s = _Services()
    s.step("a.reserve", Started, [X])
    s.step("b.charge", X, [Finished, Failed])
    s.compensation("a.release", Failed, [Released], undoes="reserve")
    s.compensation("c.notify", Released, [Refunded])
    s.step("d.restart", Refunded, [Finished])
    problems = s.graph(_saga()).check()
    assert _kinds(problems) == ["compensation-leads-forward", "compensation-leads-forward"]
    assert problems[0].message == (
        "a.release -[Released]-> c.notify -[Refunded]-> d.restart: d.restart is a forward step")
    assert problems[1].message == "c.notify -[Refunded]-> d.restart: d.restart is a forward step"


# -- check order ----------------------------------------------------------------------------------------


def test_check_lists_cycles_dangling_missing_then_leading_forward() -> None:
    s = _Services()
    s.step("a.loop", Y, [X])
    s.step("b.loop", X, [Y])
    s.step("c.reserve", Started, [Z])
    s.step("d.pay", Z, [Failed, Orphan])
    s.compensation("c.release", Failed, [Released], undoes="reserve")
    s.step("e.rebook", Released, [Finished], compensable=False)
    s.step("f.charge", Z, [Refunded])
    s.step("f.ship", Refunded, [Failed])
    assert _kinds(s.graph(_saga()).check()) == [
        "cycle", "unconsumed", "missing-compensation", "compensation-leads-forward",
    ]


# -- (7) topological order ----------------------------------------------------------------------------------


def _assert_topological(graph: FlowGraph) -> None:
    order = graph.topological_order()
    assert sorted(s.id for s in order) == sorted(s.id for s in graph.steps)
    position = {s.id: i for i, s in enumerate(order)}
    forward = [s for s in order if not s.compensation]
    compensations = [s for s in order if s.compensation]
    assert order == forward + compensations
    for step in order:
        for producer in graph.producers(step.consumes):
            if producer.compensation == step.compensation and producer.id != step.id:
                assert position[producer.id] < position[step.id], f"{producer.id} must come before {step.id}"


def test_topological_order_of_the_reference_system() -> None:
    graph = _reference()
    _assert_topological(graph)
    order = [s.id for s in graph.topological_order()]
    assert order[:5] == ["inventory.reserve_stock", "payment.charge", "order.confirm", "shipping.schedule",
                         "notification.notify_shipped"]
    assert order[-1] == "notification.notify_cancelled"


def test_topological_order_does_not_follow_registration_order() -> None:
    s = _Services()
    s.compensation("a.cancel", Released, [Cancelled])
    s.compensation("a.release", Failed, [Released])
    s.step("a.ship", Y, [Finished, Failed])
    s.step("a.charge", X, [Y])
    s.step("a.join", Z, [Finished])
    s.step("b.audit", X, [Z])
    s.step("a.reserve", Started, [X])
    graph = s.graph(_saga(fails_on=[Cancelled]))
    _assert_topological(graph)
    assert [step.id for step in graph.topological_order()] == [
        "a.reserve", "a.charge", "b.audit", "a.ship", "a.join", "a.release", "a.cancel",
    ]


def test_topological_order_puts_steps_on_a_cycle_last() -> None:
    s = _Services()
    s.step("z.first", Started, [X])
    s.step("b.loop", X, [Y])
    s.step("a.loop", Y, [X])
    s.compensation("c.undo", Failed)
    order = [step.id for step in s.graph().topological_order()]
    assert order == ["z.first", "a.loop", "b.loop", "c.undo"]


# -- (8) drawings ------------------------------------------------------------------------------------------


def _drawn() -> FlowGraph:
    """reserve -[X]-> ship, which fails; release (a compensation) undoes reserve and cancels."""
    s = _Services()
    s.step("a.reserve", Started, [X])
    s.step("b.ship", X, [Finished, Failed])
    s.compensation("a.release", Failed, [Cancelled], undoes="reserve")
    return s.graph(_saga(fails_on=[Cancelled]))


def test_mermaid_flowchart() -> None:
    text = _drawn().to_mermaid()
    assert text.startswith("flowchart LR\n") and text.endswith("\n")
    lines = text.splitlines()
    assert '  a_reserve["a.reserve"]' in lines
    assert '  a_release[["a.release"]]' in lines  # compensations get their own shape
    assert "  in_Started([Started])" in lines
    assert "  in_Started --> a_reserve" in lines
    assert "  a_reserve -->|X| b_ship" in lines
    assert "  b_ship -.->|Failed| a_release" in lines
    assert "  b_ship -->|Finished| out_Finished" in lines
    assert any(line.startswith("  classDef compensation ") for line in lines)
    assert "  class a_release compensation" in lines


def test_mermaid_without_compensations_has_no_class() -> None:
    s = _Services()
    s.step("a.h", Started, [Finished])
    assert "classDef" not in s.graph(_saga()).to_mermaid()


def test_mermaid_of_the_reference_system_draws_every_handler() -> None:
    graph = _reference()
    text = graph.to_mermaid()
    assert text.startswith("flowchart LR\n")
    assert "  shipping_schedule -.->|ShippingUnavailable| payment_refund" in text
    assert "  payment_charge -->|PaymentCaptured| order_confirm" in text
    for step in graph.steps:
        assert f'"{step.id}"' in text


def test_mermaid_node_ids_are_distinct() -> None:
    s = _Services()
    s.step("a_b.c", Started, [X])
    s.step("a.b_c", X, [Finished])
    text = s.graph(_saga()).to_mermaid()
    ids = {line.split("[", 1)[0].strip() for line in text.splitlines() if line.endswith('"]')}
    assert len(ids) == 2


def test_dot_digraph() -> None:
    text = _drawn().to_dot()
    assert text.startswith("digraph choreography {\n") and text.endswith("}\n")
    lines = text.splitlines()
    assert '  "a.reserve" [label="a.reserve"];' in lines
    assert '  "a.release" [label="a.release", style=dashed, color="#c0392b"];' in lines
    assert '  "event:Started" -> "a.reserve";' in lines
    assert '  "a.reserve" -> "b.ship" [label="X"];' in lines
    assert '  "b.ship" -> "a.release" [label="Failed", style=dashed, color="#c0392b"];' in lines
    assert '  "b.ship" -> "event:Finished" [label="Finished"];' in lines
    edges = [line for line in lines if " -> " in line]
    assert [line for line in edges if "dashed" in line] == [
        '  "b.ship" -> "a.release" [label="Failed", style=dashed, color="#c0392b"];'
    ]


def test_dot_edge_from_a_source_event_into_a_compensation_is_dashed() -> None:
    s = _Services()
    s.step("a.h", Started, [Finished])
    s.compensation("b.undo", Failed)
    text = s.graph(_saga(fails_on=[Failed])).to_dot()
    assert '  "event:Failed" -> "b.undo" [style=dashed, color="#c0392b"];' in text.splitlines()
    assert "  in_Failed -.-> b_undo" in s.graph(_saga()).to_mermaid().splitlines()


# -- (9) choreo graph -------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _keep_sys_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """``choreo.cli`` puts the working directory on sys.path; undo that after each test."""
    monkeypatch.setattr(sys, "path", list(sys.path))


@pytest.fixture
def module_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str, str], str]]:
    """Write a Python module into ``tmp_path`` (importable for this test only); returns its name."""
    monkeypatch.syspath_prepend(str(tmp_path))
    written: list[str] = []

    def write(name: str, source: str) -> str:
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        written.append(name)
        return name

    yield write
    for name in written:
        sys.modules.pop(name, None)


BROKEN = """
    from choreo import Event, Service, Settings
    from choreo.schemas import parse_schema


    def _schema(name):
        return parse_schema({"type": "record", "name": name, "namespace": "broken", "version": 1,
                             "fields": [{"name": "order_id", "type": "string"}]})


    class Ping(Event, schema=_schema("Ping")):
        order_id: str


    class Pong(Event, schema=_schema("Pong")):
        order_id: str


    a = Service("a", settings=Settings())
    b = Service("b", settings=Settings())


    @a.on(Pong, emits=[Ping])
    async def serve(event, ctx):
        pass


    @b.on(Ping, emits=[Pong])
    async def answer(event, ctx):
        pass


    system = [a, b]
    answer_is = 42
"""


def test_cli_check_passes_on_the_reference_system(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["graph", "check", "services.checkout:system"]) == 0
    out = capsys.readouterr().out
    assert "graph check passed: 13 handlers in 5 services, 1 saga(s)" in out


def test_cli_check_fails_on_a_cycle_and_prints_it(
    module_in: Callable[[str, str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    module = module_in("choreo_test_graph_broken", BROKEN)
    assert main(["graph", "check", f"{module}:system"]) == 1
    out = capsys.readouterr().out
    assert "error: cycle: the forward flow loops: a.serve -[Ping]-> b.answer -[Pong]-> a.serve" in out
    assert "graph check failed: 1 problem(s)" in out


def test_cli_check_accepts_several_targets(
    module_in: Callable[[str, str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    module = module_in("choreo_test_graph_targets", BROKEN)
    assert main(["graph", "check", f"{module}:a", f"{module}:b"]) == 1
    assert "a.serve -[Ping]-> b.answer -[Pong]-> a.serve" in capsys.readouterr().out


@pytest.mark.parametrize("fmt, start", [("mermaid", "flowchart LR\n"), ("dot", "digraph choreography {\n")])
def test_cli_draws_to_a_file(fmt: str, start: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / f"checkout.{fmt}"
    assert main(["graph", "--format", fmt, "-o", str(output), "services.checkout:system"]) == 0
    assert output.read_text() == (_reference().to_mermaid() if fmt == "mermaid" else _reference().to_dot())
    assert output.read_text().startswith(start)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"wrote {output}" in captured.err


def test_cli_text_is_the_topological_order(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["graph", "services.checkout:system"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("topological order (forward steps, then compensations):\n")
    assert "  1. inventory.reserve_stock" in out
    assert "compensation, undoes payment.charge: ShippingUnavailable -> PaymentRefunded" in out


@pytest.mark.parametrize("attr, kind", [("answer_is", "int"), ("Ping", "ModelMetaclass")])
def test_cli_target_that_is_not_a_service_or_saga(
    attr: str, kind: str, module_in: Callable[[str, str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    module = module_in(f"choreo_test_graph_{attr.lower()}", BROKEN)
    assert main(["graph", "check", f"{module}:{attr}"]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("choreo: error: ")
    assert f"{module}:{attr} is a {kind}, not a Service, a Saga or a list of them" in captured.err
    assert captured.out == ""


@pytest.mark.parametrize("argv, message", [
    (["graph", "check"], "name at least one MODULE:ATTR"),
    (["graph", "check", "services.checkout"], "expected MODULE:ATTRIBUTE"),
    (["graph", "check", "services.checkout:nothing"], "has no attribute 'nothing'"),
    (["graph", "check", "choreo_test_graph_no_such_module:system"], "cannot import"),
])
def test_cli_bad_targets_are_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("choreo: error: ") and message in err
