"""Saga declarations and compensation registration: every mistake is a ConfigurationError at build time.

Pure construction only: no service is started, no transport or store is touched.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest

from choreo import ConfigurationError, Context, Event, Saga, Service, Settings, Subscription
from choreo.schemas import AvroSchema, parse_schema


def _schema(name: str) -> AvroSchema:
    return parse_schema({"type": "record", "name": name, "namespace": "sagatest", "version": 1,
                         "fields": [{"name": "order_id", "type": "string"}]})


class Placed(Event, schema=_schema("Placed")):
    order_id: str


class Shipped(Event, schema=_schema("Shipped")):
    order_id: str


class Notified(Event, schema=_schema("Notified")):
    order_id: str


class Cancelled(Event, schema=_schema("Cancelled")):
    order_id: str


class Declined(Event, schema=_schema("Declined")):
    order_id: str


def _saga(**overrides: Any) -> Saga:
    fields: dict[str, Any] = {
        "name": "checkout",
        "starts_with": Placed,
        "completes_on": [Notified],
        "fails_on": [Cancelled],
        "deadline": timedelta(seconds=30),
    }
    fields.update(overrides)
    return Saga(**fields)


def _names(saga_name: str) -> str:
    """The pattern every Saga error message starts with."""
    return re.escape(f"saga {saga_name!r}")


async def _handler(event: Any, ctx: Context) -> None:
    pass


async def reserve(event: Placed, ctx: Context) -> None:
    pass


# -- Saga -------------------------------------------------------------------------------------------


def test_valid_saga_keeps_its_declaration() -> None:
    saga = _saga(step_deadline=timedelta(seconds=5), description="place -> ship -> notify")
    assert saga.name == "checkout"
    assert saga.starts_with is Placed
    assert saga.completes_on == (Notified,)  # lists are frozen into tuples
    assert saga.fails_on == (Cancelled,)
    assert saga.deadline == timedelta(seconds=30)
    assert saga.step_deadline == timedelta(seconds=5)
    assert saga.description == "place -> ship -> notify"


def test_saga_defaults() -> None:
    saga = Saga("s", starts_with=Placed, completes_on=[Notified])
    assert saga.fails_on == ()
    assert saga.deadline == timedelta(minutes=5)
    assert saga.step_deadline is None
    assert saga.end_events == (Notified,)


def test_saga_is_frozen_and_hashable_and_ignores_description_in_equality() -> None:
    a = _saga(description="one")
    b = _saga(description="two")
    assert a == b and hash(a) == hash(b)
    with pytest.raises(AttributeError):
        a.name = "other"  # type: ignore[misc]  # frozen dataclass: assignment is the thing tested


def test_end_events_are_completions_then_failures() -> None:
    saga = _saga(completes_on=[Notified, Shipped], fails_on=[Cancelled, Declined])
    assert saga.end_events == (Notified, Shipped, Cancelled, Declined)


@pytest.mark.parametrize("name", ["a", "checkout", "check-out_2", "x" * 63])
def test_good_names(name: str) -> None:
    assert _saga(name=name).name == name


@pytest.mark.parametrize("name", ["", "Checkout", "2checkout", "_checkout", "check out", "check.out", "x" * 64])
def test_bad_name(name: str) -> None:
    with pytest.raises(ConfigurationError, match=_names(name) + ".*name must be"):
        _saga(name=name)


def test_name_with_trailing_newline_is_rejected() -> None:
    with pytest.raises(ConfigurationError, match="name must be"):
        _saga(name="checkout\n")


@pytest.mark.parametrize("field", ["starts_with", "completes_on", "fails_on"])
@pytest.mark.parametrize("bad", [str, Placed(order_id="o-1"), "Placed", None])
def test_non_event_types_are_rejected(field: str, bad: Any) -> None:
    value = bad if field == "starts_with" else [bad]
    with pytest.raises(ConfigurationError, match=_names("checkout") + f".*{field} has .*not an Event subclass"):
        _saga(**{field: value})


def test_non_event_among_event_types_is_rejected() -> None:
    with pytest.raises(ConfigurationError, match=_names("checkout") + ".*fails_on has <class 'int'>"):
        _saga(fails_on=[Cancelled, int])


def test_bare_event_class_instead_of_a_list_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match=_names("checkout")):
        _saga(completes_on=Notified)


def test_empty_completes_on() -> None:
    with pytest.raises(ConfigurationError, match=_names("checkout") + ".*completes_on needs at least one"):
        _saga(completes_on=[])


def test_event_both_completing_and_failing() -> None:
    with pytest.raises(ConfigurationError, match=_names("checkout") + ".*Notified cannot both complete and fail"):
        _saga(completes_on=[Notified, Shipped], fails_on=[Cancelled, Notified])


def test_overlap_names_every_shared_event_sorted() -> None:
    with pytest.raises(ConfigurationError, match="Notified, Shipped cannot both complete and fail"):
        _saga(completes_on=[Shipped, Notified], fails_on=[Notified, Shipped])


@pytest.mark.parametrize("end", ["completes_on", "fails_on"])
def test_start_event_cannot_also_end_the_saga(end: str) -> None:
    with pytest.raises(ConfigurationError, match=_names("checkout") + ".*start event cannot also end"):
        _saga(**{end: [Placed]})


@pytest.mark.parametrize("deadline", [timedelta(0), timedelta(seconds=-1)])
def test_non_positive_deadline(deadline: timedelta) -> None:
    with pytest.raises(ConfigurationError, match=_names("checkout") + ".*deadline must be positive"):
        _saga(deadline=deadline)


@pytest.mark.parametrize("step_deadline", [timedelta(seconds=31), timedelta(0), timedelta(seconds=-1)])
def test_bad_step_deadline(step_deadline: timedelta) -> None:
    with pytest.raises(ConfigurationError, match=_names("checkout") + ".*step_deadline must be positive and at most"):
        _saga(step_deadline=step_deadline)


def test_step_deadline_may_equal_the_deadline() -> None:
    assert _saga(step_deadline=timedelta(seconds=30)).step_deadline == timedelta(seconds=30)


# -- compensations ----------------------------------------------------------------------------------


def test_compensate_with_undoes_function_registers_a_compensation() -> None:
    service = Service("inventory", settings=Settings())
    service.on(Placed, emits=[Shipped])(reserve)

    @service.compensate(Cancelled, undoes=reserve, emits=[Declined])
    async def release(event: Cancelled, ctx: Context) -> None:
        pass

    forward, compensation = service.subscriptions
    assert (forward.name, forward.compensation, forward.undoes, forward.compensable) == ("reserve", False, None, True)
    assert compensation.name == "release"
    assert compensation.event_type is Cancelled
    assert compensation.emits == frozenset({Declined})
    assert compensation.compensation is True
    assert compensation.undoes == "reserve"
    assert compensation.compensable is False
    assert compensation.handler is release  # the decorator returns the function unchanged


def test_compensate_with_undoes_name() -> None:
    service = Service("inventory", settings=Settings())
    service.on(Placed, name="reserve-stock")(_handler)
    service.compensate(Cancelled, undoes="reserve-stock", name="release")(_handler)
    assert service.subscriptions[1].undoes == "reserve-stock"


def test_compensate_without_undoes() -> None:
    service = Service("notification", settings=Settings())
    service.compensate(Cancelled, name="notify_cancelled")(_handler)
    (sub,) = service.subscriptions
    assert (sub.compensation, sub.undoes, sub.compensable) == (True, None, False)


def test_forward_step_can_be_declared_not_compensable() -> None:
    service = Service("order", settings=Settings())
    service.on(Placed, compensable=False)(reserve)
    assert service.subscriptions[0].compensable is False


def test_undoes_unknown_handler_is_a_configuration_error_naming_it() -> None:
    service = Service("inventory", settings=Settings())
    service.on(Placed)(reserve)
    with pytest.raises(ConfigurationError, match=r"service inventory: compensation 'release' undoes 'charge', "
                                                 r"which is not a forward handler of this service"):
        service.compensate(Cancelled, undoes="charge", name="release")(_handler)
    assert len(service.subscriptions) == 1


def test_undoes_a_handler_registered_later_is_an_error() -> None:
    service = Service("inventory", settings=Settings())
    with pytest.raises(ConfigurationError, match="undoes 'reserve'.*register the step first"):
        service.compensate(Cancelled, undoes=reserve, name="release")(_handler)


def test_undoes_a_handler_of_another_service_is_an_error() -> None:
    payment = Service("payment", settings=Settings())
    payment.on(Placed, name="charge")(_handler)
    inventory = Service("inventory", settings=Settings())
    with pytest.raises(ConfigurationError, match="service inventory: compensation 'release' undoes 'charge'"):
        inventory.compensate(Cancelled, undoes="charge", name="release")(_handler)


def test_undoes_another_compensation_is_an_error() -> None:
    service = Service("inventory", settings=Settings())
    service.on(Placed)(reserve)
    service.compensate(Cancelled, undoes=reserve, name="release")(_handler)
    with pytest.raises(ConfigurationError, match="undoes 'release', which is not a forward handler"):
        service.compensate(Declined, undoes="release", name="release_again")(_handler)


def test_undoes_function_registered_under_another_name() -> None:
    service = Service("inventory", settings=Settings())
    service.on(Placed, name="reserve-stock")(reserve)
    service.compensate(Cancelled, undoes=reserve, name="release")(_handler)
    assert service.subscriptions[1].undoes == "reserve-stock"


def test_subscription_undoes_needs_compensation() -> None:
    with pytest.raises(ConfigurationError, match="handler 'reserve'.*only a compensation"):
        Subscription.build(Cancelled, reserve, undoes="reserve")


def test_subscription_compensation_is_never_compensable() -> None:
    sub = Subscription.build(Cancelled, _handler, name="release", compensation=True, undoes="reserve",
                             compensable=True)
    assert (sub.compensation, sub.undoes, sub.compensable) == (True, "reserve", False)
    assert Subscription.build(Placed, _handler, name="reserve").compensable is True
