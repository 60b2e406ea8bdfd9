"""The choreography graph: handlers as nodes, events as edges, built from declarations alone.

An edge ``a -[E]-> b`` means handler ``a`` may emit ``E`` and handler ``b`` consumes it. Forward steps
(``service.on``) and compensations (``service.compensate``) are kept apart, so the graph can be
checked before anything runs:

* ``cycle``: the forward flow, or the compensation flow, loops (``a -[E]-> b -[F]-> a``);
* ``unconsumed``: an emitted event that no handler consumes and that ends no saga;
* ``unproduced``: a consumed event that no handler emits and that starts no saga;
* ``missing-compensation``: a failure event after which a completed, compensable step has no
  compensation reachable on the failure path; a saga timeout (``SagaTimedOut``) counts as a failure
  after any step, unless the saga is declared ``on_timeout="report"``;
* ``compensation-leads-forward``: a compensation whose events reach a forward step.

A *failure event* is one that a compensation consumes, or that a saga declares in ``fails_on``.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from choreo.events import Event
from choreo.saga import CompensationFailed, Saga, SagaTimedOut
from choreo.service import Service


@dataclass(frozen=True)
class Step:
    """One handler in the graph."""

    service: str
    handler: str
    consumes: type[Event]
    emits: frozenset[type[Event]]
    compensation: bool
    undoes: str | None
    compensable: bool

    @property
    def id(self) -> str:
        return f"{self.service}.{self.handler}"


@dataclass(frozen=True)
class Problem:
    """One finding of ``FlowGraph.check``; ``message`` names the path."""

    kind: str
    message: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


def _edge(a: Step, event: type[Event], b: Step) -> str:
    return f"{a.id} -[{event.__name__}]-> {b.id}"


class FlowGraph:
    """The graph of every handler of ``services``, with the ``sagas`` that start and end flows."""

    def __init__(self, steps: Sequence[Step], sagas: Sequence[Saga] = ()) -> None:
        self.steps = list(steps)
        self.sagas = list(sagas)
        self._consumers: dict[type[Event], list[Step]] = {}
        self._producers: dict[type[Event], list[Step]] = {}
        for step in self.steps:
            self._consumers.setdefault(step.consumes, []).append(step)
            for event in step.emits:
                self._producers.setdefault(event, []).append(step)
        # SagaTimedOut comes from the saga tracker and CompensationFailed from choreo itself, not from
        # a declared handler.
        implicit: set[type[Event]] = {SagaTimedOut, CompensationFailed}
        self._starts: set[type[Event]] = {s.starts_with for s in self.sagas} | implicit
        self._ends = {e for s in self.sagas for e in s.end_events}
        self._failures = {s.consumes for s in self.steps if s.compensation} | {
            e for s in self.sagas for e in s.fails_on
        }

    @classmethod
    def build(cls, services: Iterable[Service], sagas: Iterable[Saga] = ()) -> FlowGraph:
        steps = [
            Step(service.name, sub.name, sub.event_type, sub.emits, sub.compensation, sub.undoes, sub.compensable)
            for service in services
            for sub in service.subscriptions
        ]
        return cls(steps, list(sagas))

    def consumers(self, event: type[Event]) -> list[Step]:
        return list(self._consumers.get(event, []))

    def producers(self, event: type[Event]) -> list[Step]:
        return list(self._producers.get(event, []))

    def _next(self, step: Step, compensation: bool) -> list[tuple[type[Event], Step]]:
        return [
            (event, nxt)
            for event in sorted(step.emits, key=lambda e: e.__name__)
            for nxt in self._consumers.get(event, [])
            if nxt.compensation == compensation
        ]

    # -- checks -----------------------------------------------------------------------------------

    def check(self) -> list[Problem]:
        """Every problem found, in a stable order; an empty list means the graph is sound."""
        return [
            *self._cycles(),
            *self._dangling(),
            *self._missing_compensations(),
            *self._timeouts_uncompensated(),
            *self._compensations_leading_forward(),
        ]

    def _cycles(self) -> list[Problem]:
        return [*self._cycles_of(False), *self._cycles_of(True)]

    def _cycles_of(self, compensation: bool) -> list[Problem]:
        flow = "compensation flow" if compensation else "forward flow"
        problems: list[Problem] = []
        state: dict[str, int] = {}  # 1 on the DFS stack, 2 finished
        path: list[tuple[Step, type[Event] | None]] = []
        seen_cycles: set[frozenset[str]] = set()

        def visit(step: Step, via: type[Event] | None) -> None:
            state[step.id] = 1
            path.append((step, via))
            for event, nxt in self._next(step, compensation):
                if state.get(nxt.id) == 1:
                    start = next(i for i, (s, _) in enumerate(path) if s.id == nxt.id)
                    loop = path[start:]
                    key = frozenset(s.id for s, _ in loop)
                    if key not in seen_cycles:
                        seen_cycles.add(key)
                        text = loop[0][0].id + "".join(f" -[{e.__name__}]-> {s.id}" for s, e in loop[1:] if e)
                        problems.append(Problem("cycle", f"the {flow} loops: {text} -[{event.__name__}]-> {nxt.id}"))
                elif nxt.id not in state:
                    visit(nxt, event)
            path.pop()
            state[step.id] = 2

        for step in sorted((s for s in self.steps if s.compensation == compensation), key=lambda s: s.id):
            if step.id not in state:
                visit(step, None)
        return problems

    def _dangling(self) -> list[Problem]:
        problems: list[Problem] = []
        for step in sorted(self.steps, key=lambda s: s.id):
            for event in sorted(step.emits, key=lambda e: e.__name__):
                if not self._consumers.get(event) and event not in self._ends:
                    problems.append(Problem(
                        "unconsumed", f"{event.__name__} emitted by {step.id} is consumed by no handler and ends no saga"
                    ))
            if not self._producers.get(step.consumes) and step.consumes not in self._starts:
                problems.append(Problem(
                    "unproduced",
                    f"{step.consumes.__name__} consumed by {step.id} is emitted by no handler and starts no saga",
                ))
        return problems

    def _ancestors(self, step: Step) -> list[tuple[Step, str]]:
        """Forward steps that run before ``step`` in some flow, each with the path from it to ``step``."""
        found: dict[str, tuple[Step, str]] = {}
        queue: deque[tuple[Step, str]] = deque([(step, step.id)])
        while queue:
            current, trail = queue.popleft()
            for prev in self._producers.get(current.consumes, []):
                if prev.compensation or prev.id in found or prev.id == step.id:
                    continue
                path = f"{prev.id} -[{current.consumes.__name__}]-> {trail}"
                found[prev.id] = (prev, path)
                queue.append((prev, path))
        return sorted(found.values(), key=lambda item: item[0].id)

    def _compensations_from(self, event: type[Event]) -> list[Step]:
        """Compensations that a failure ``event`` triggers, directly or through other compensations."""
        reached: dict[str, Step] = {}
        queue: deque[type[Event]] = deque([event])
        while queue:
            current = queue.popleft()
            for step in self._consumers.get(current, []):
                if step.compensation and step.id not in reached:
                    reached[step.id] = step
                    queue.extend(step.emits)
        return list(reached.values())

    def _missing_compensations(self) -> list[Problem]:
        problems: list[Problem] = []
        for step in sorted((s for s in self.steps if not s.compensation), key=lambda s: s.id):
            for failure in sorted(step.emits & self._failures, key=lambda e: e.__name__):
                undone = {(c.service, c.undoes) for c in self._compensations_from(failure) if c.undoes}
                for earlier, path in self._ancestors(step):
                    if not earlier.compensable or (earlier.service, earlier.handler) in undone:
                        continue
                    problems.append(Problem(
                        "missing-compensation",
                        f"{failure.__name__} from {step.id} leaves {earlier.id} uncompensated "
                        f"(path: {path} -[{failure.__name__}]->); declare "
                        f"@service.compensate(..., undoes={earlier.handler!r}) reachable from {failure.__name__}, "
                        f"or compensable=False on the step",
                    ))
        return problems

    def _timeouts_uncompensated(self) -> list[Problem]:
        """A saga can time out after any step: SagaTimedOut must lead to a compensation of each."""
        problems: list[Problem] = []
        undone = {(c.service, c.undoes) for c in self._compensations_from(SagaTimedOut) if c.undoes}
        for saga in (s for s in self.sagas if s.on_timeout == "compensate"):
            seen: dict[str, Step] = {}
            queue = [saga.starts_with]
            while queue:
                for step in self._consumers.get(queue.pop(), []):
                    if not step.compensation and step.id not in seen:
                        seen[step.id] = step
                        queue.extend(step.emits)
            for step in sorted(seen.values(), key=lambda s: s.id):
                if step.compensable and (step.service, step.handler) not in undone:
                    problems.append(Problem(
                        "missing-compensation",
                        f"saga {saga.name}: a timeout (SagaTimedOut) after {step.id} leaves it uncompensated; "
                        f"declare @service.compensate(..., undoes={step.handler!r}) reachable from SagaTimedOut",
                    ))
        return problems

    def _compensations_leading_forward(self) -> list[Problem]:
        problems: list[Problem] = []
        for comp in sorted((s for s in self.steps if s.compensation), key=lambda s: s.id):
            queue: deque[tuple[Step, str]] = deque([(comp, comp.id)])
            seen = {comp.id}
            while queue:
                current, trail = queue.popleft()
                for event in sorted(current.emits, key=lambda e: e.__name__):
                    for nxt in self._consumers.get(event, []):
                        path = f"{trail} -[{event.__name__}]-> {nxt.id}"
                        if not nxt.compensation:
                            problems.append(Problem(
                                "compensation-leads-forward", f"{path}: {nxt.id} is a forward step"
                            ))
                        elif nxt.id not in seen:
                            seen.add(nxt.id)
                            queue.append((nxt, path))
        return problems

    # -- order and drawings ------------------------------------------------------------------------

    def topological_order(self) -> list[Step]:
        """Forward steps in an order where each comes after every step it depends on, then the
        compensations in the same way. Steps on a cycle (see ``check``) come last, by name."""
        ordered: list[Step] = []
        for compensation in (False, True):
            nodes = sorted((s for s in self.steps if s.compensation == compensation), key=lambda s: s.id)
            indegree = {s.id: 0 for s in nodes}
            by_id = {s.id: s for s in nodes}
            for s in nodes:
                for event in s.emits:
                    for nxt in self._consumers.get(event, []):
                        if nxt.id in indegree and nxt.id != s.id:
                            indegree[nxt.id] += 1
            ready = deque(s for s in nodes if indegree[s.id] == 0)
            done: set[str] = set()
            while ready:
                s = ready.popleft()
                ordered.append(s)
                done.add(s.id)
                for event in sorted(s.emits, key=lambda e: e.__name__):
                    for nxt in self._consumers.get(event, []):
                        if nxt.id in indegree and nxt.id not in done and nxt.id != s.id:
                            indegree[nxt.id] -= 1
                            if indegree[nxt.id] == 0:
                                ready.append(by_id[nxt.id])
            ordered.extend(s for s in nodes if s.id not in done)
        return ordered

    def _events(self) -> tuple[list[type[Event]], list[type[Event]]]:
        sources = sorted({s.consumes for s in self.steps if not self._producers.get(s.consumes)}, key=lambda e: e.__name__)
        sinks = sorted({e for s in self.steps for e in s.emits if not self._consumers.get(e)}, key=lambda e: e.__name__)
        return sources, sinks

    def to_mermaid(self) -> str:
        """A Mermaid flowchart: forward edges solid, compensation edges dotted, compensations styled."""
        sources, sinks = self._events()
        # Readable node ids, made unique: "a_b.c" and "a.b_c" must not become one node.
        used = {f"in_{e.__name__}" for e in sources} | {f"out_{e.__name__}" for e in sinks}
        ids: dict[str, str] = {}
        for step in self.topological_order():
            base = name = re.sub(r"[^A-Za-z0-9_]", "_", step.id)
            n = 2
            while name in used:
                name, n = f"{base}_{n}", n + 1
            used.add(name)
            ids[step.id] = name

        def _ident(text: str) -> str:
            return ids.get(text, text)

        lines = ["flowchart LR"]
        for event in sources:
            lines.append(f"  in_{_ident(event.__name__)}([{event.__name__}])")
        for step in self.topological_order():
            shape = f'[["{step.id}"]]' if step.compensation else f'["{step.id}"]'
            lines.append(f"  {_ident(step.id)}{shape}")
        for event in sinks:
            lines.append(f"  out_{_ident(event.__name__)}([{event.__name__}])")
        for event in sources:
            for step in self._consumers.get(event, []):
                arrow = "-.->" if step.compensation else "-->"
                lines.append(f"  in_{_ident(event.__name__)} {arrow} {_ident(step.id)}")
        for step in self.topological_order():
            for event in sorted(step.emits, key=lambda e: e.__name__):
                targets = self._consumers.get(event, [])
                for nxt in targets:
                    arrow = "-.->" if nxt.compensation else "-->"
                    lines.append(f"  {_ident(step.id)} {arrow}|{event.__name__}| {_ident(nxt.id)}")
                if not targets:
                    lines.append(f"  {_ident(step.id)} -->|{event.__name__}| out_{_ident(event.__name__)}")
        comps = [_ident(s.id) for s in self.steps if s.compensation]
        if comps:
            lines.append("  classDef compensation fill:#fde2e2,stroke:#c0392b,stroke-dasharray: 4 2")
            lines.append(f"  class {','.join(comps)} compensation")
        return "\n".join(lines) + "\n"

    def to_dot(self) -> str:
        """A Graphviz digraph: compensations are dashed red boxes on dashed red edges."""
        lines = ["digraph choreography {", "  rankdir=LR;", '  node [shape=box, fontname="Helvetica"];']
        sources, sinks = self._events()
        for event in [*sources, *sinks]:
            lines.append(f'  "event:{event.__name__}" [shape=ellipse, label="{event.__name__}"];')
        for step in self.topological_order():
            style = ', style=dashed, color="#c0392b"' if step.compensation else ""
            lines.append(f'  "{step.id}" [label="{step.id}"{style}];')
        for event in sources:
            for step in self._consumers.get(event, []):
                lines.append(f'  "event:{event.__name__}" -> "{step.id}"{_dot_edge(step)};')
        for step in self.topological_order():
            for event in sorted(step.emits, key=lambda e: e.__name__):
                targets = self._consumers.get(event, [])
                for nxt in targets:
                    lines.append(f'  "{step.id}" -> "{nxt.id}" [label="{event.__name__}"{_dot_edge(nxt, inner=True)}];')
                if not targets:
                    lines.append(f'  "{step.id}" -> "event:{event.__name__}" [label="{event.__name__}"];')
        lines.append("}")
        return "\n".join(lines) + "\n"


def _dot_edge(target: Step, *, inner: bool = False) -> str:
    if not target.compensation:
        return ""
    style = 'style=dashed, color="#c0392b"'
    return f", {style}" if inner else f" [{style}]"
