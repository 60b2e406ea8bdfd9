"""``choreo dlq list | show | replay | purge``: inspect and recover dead-lettered events.

Topics are named as on the broker, with the settings' ``topic_prefix`` (``CHOREO_TOPIC_PREFIX``);
``list`` without topics looks at every ``*.dlq`` topic under that prefix. ``replay`` shows its
progress on stderr (one line redrawn in place on a terminal, a line per tenth otherwise) unless
``--quiet``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from choreo.deadletter import DLQ_SUFFIX, DeadLetter, DLQHeader, summarize
from choreo.errors import ConfigurationError
from choreo.settings import Settings


def register(commands: Any) -> None:
    p = commands.add_parser("dlq", help="inspect, replay or purge dead-letter topics")
    sub = p.add_subparsers(dest="dlq_command", required=True, metavar="SUBCOMMAND")

    def filters(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--since", metavar="ISO-TIME", help="only records that failed at or after this time")
        parser.add_argument("--saga", metavar="ID", help="only records of this saga (correlation id)")
        parser.add_argument("--key", help="only records with this Kafka key")

    ls = sub.add_parser("list", help="dead letters counted by topic and error type")
    ls.add_argument("topics", nargs="*", metavar="DLQ_TOPIC")
    ls.add_argument("--records", action="store_true", help="also print one line per record")
    filters(ls)
    show = sub.add_parser("show", help="one dead letter, decoded")
    show.add_argument("topic", metavar="DLQ_TOPIC")
    show.add_argument("partition", type=int)
    show.add_argument("offset", type=int)
    replay = sub.add_parser("replay", help="publish dead letters again, keeping their event ids")
    replay.add_argument("topic", metavar="DLQ_TOPIC")
    replay.add_argument("--to", metavar="TOPIC", help="publish to this topic instead of the original one")
    replay.add_argument("--dry-run", action="store_true", help="say what would be replayed, publish nothing")
    replay.add_argument("--rate", type=float, default=100.0, help="records per second at most (default 100)")
    replay.add_argument("--quiet", "-q", action="store_true",
                        help="no progress and no line per record on stderr, only the summary")
    filters(replay)
    purge = sub.add_parser("purge", help="delete every record of a dead-letter topic (Kafka DeleteRecords)")
    purge.add_argument("topic", metavar="DLQ_TOPIC")
    purge.add_argument("--yes", action="store_true", help="required: purging cannot be undone")
    for parser in (ls, show, replay, purge):
        parser.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    return asyncio.run(_command(args))


async def _command(args: argparse.Namespace) -> int:
    from choreo.transport.kafka import KafkaTransport

    settings = Settings.from_env()
    transport = KafkaTransport(settings, client_id="choreo-dlq")
    try:
        await transport.connect()
        return await _run(args, settings, transport)
    finally:
        await transport.close()


def _check_topic(topic: str) -> None:
    if not topic.endswith(DLQ_SUFFIX):
        raise ConfigurationError(f"{topic!r} is not a dead-letter topic (its name ends in {DLQ_SUFFIX!r})")


async def _letters(transport: Any, topic: str, args: argparse.Namespace) -> list[DeadLetter]:
    letters = [DeadLetter(r) for r in await transport.read_all(topic)]
    return [x for x in letters if x.matches(since=getattr(args, "since", None), saga_id=getattr(args, "saga", None),
                                            key=getattr(args, "key", None))]


async def _run(args: argparse.Namespace, settings: Settings, transport: Any) -> int:
    if args.dlq_command == "list":
        topics = args.topics or sorted(
            t for t in await transport.list_topics() if t.startswith(settings.topic_prefix) and t.endswith(DLQ_SUFFIX)
        )
        letters: list[DeadLetter] = []
        for topic in topics:
            _check_topic(topic)
            letters += await _letters(transport, topic, args)
        print(f"{'original topic':50} {'error type':28} count")
        for (topic, error_type), count in summarize(letters).items():
            print(f"{topic:50} {error_type:28} {count}")
        if args.records:
            for x in letters:
                r = x.record
                print(f"  {r.topic} {r.partition} {r.offset}  {x.failed_at}  {x.error_type}: "
                      f"{x.header(DLQHeader.ERROR) or ''}  saga={x.saga_id}  replays={x.replays}")
        print(f"{len(letters)} dead letter(s) in {len(topics)} topic(s)")
        return 0
    _check_topic(args.topic)
    if args.dlq_command == "show":
        found = [x for x in await _letters(transport, args.topic, args)
                 if x.record.partition == args.partition and x.record.offset == args.offset]
        if not found:
            print(f"no record at {args.topic} [{args.partition}] offset {args.offset}")
            return 1
        _show(found[0], transport)
        return 0
    if args.dlq_command == "replay":
        return await _replay(args, transport)
    if not args.yes:
        raise ConfigurationError("purge deletes every record of the topic for good: add --yes")
    records = await transport.read_all(args.topic)
    ends: dict[int, int] = {}
    for r in records:
        ends[r.partition] = max(ends.get(r.partition, 0), r.offset + 1)
    if ends:
        await transport.delete_records(args.topic, ends)
    print(f"purged {len(records)} record(s) from {args.topic}")
    return 0


def _show(letter: DeadLetter, transport: Any) -> None:
    from choreo.schemas import Codec, SchemaSet

    r = letter.record
    print(f"{r.topic} [{r.partition}] offset {r.offset}, key {r.key!r}")
    for name in DLQHeader.ALL:
        if name != DLQHeader.TRACEBACK:
            print(f"  {name.removeprefix('choreo-dlq-'):14} {letter.header(name)}")
    print("original headers:")
    for key, value in r.headers:
        if not key.startswith("choreo-dlq-"):
            print(f"  {key:24} {value.decode(errors='replace') if value is not None else None}")
    value = r.value or b""
    schema = transport.lookup_schema(int.from_bytes(value[2:10], "little")) if len(value) >= 10 else None
    if schema is None:
        print(f"value: {len(value)} bytes, not decodable with a known schema: {value[:64]!r}")
    else:
        try:
            print(f"value ({schema.full_name} v{schema.version}): {Codec(schema, SchemaSet([schema])).decode(value)}")
        except Exception as exc:  # a poison record may be anything; showing it must not fail
            print(f"value: {len(value)} bytes that do not decode ({exc}): {value[:64]!r}")
    print("traceback:")
    print(letter.header(DLQHeader.TRACEBACK) or "-")


async def _replay(args: argparse.Namespace, transport: Any) -> int:
    letters = await _letters(transport, args.topic, args)
    if args.rate <= 0:
        raise ConfigurationError("--rate must be positive")
    if args.dry_run:
        for letter in letters:
            print(f"would replay {_describe(letter, letter.replay(args.to).topic)}")
        print(f"would replay {len(letters)} record(s) from {args.topic}")
        return 0
    progress = Progress(len(letters), sys.stderr, verb="replayed", enabled=not args.quiet)
    started = time.monotonic()
    try:
        for i, letter in enumerate(letters, 1):
            record = letter.replay(args.to)
            await asyncio.sleep(max(0.0, started + (i - 1) / args.rate - time.monotonic()))
            await transport.send([record])
            if not args.quiet:
                progress.line(f"replayed {_describe(letter, record.topic)}")
            progress.update(i)
    finally:
        progress.close()
    print(f"replayed {len(letters)} record(s) from {args.topic}")
    return 0


def _describe(letter: DeadLetter, to_topic: str) -> str:
    r = letter.record
    return f"{r.topic} [{r.partition}] offset {r.offset} -> {to_topic} (event {letter.header('choreo-event-id')})"


class Progress:
    """Progress of a long run on ``stream`` (stderr): ``replayed 120/500 (24%) 40/s, eta 10s``.

    On a terminal it is one line, redrawn in place at most every ``interval`` seconds (and at the
    end); other lines written through ``line()`` appear above it. Elsewhere (a pipe, a CI log) it is a
    plain line each time another tenth of the work is done, and at the end.
    """

    def __init__(self, total: int, stream: TextIO, *, verb: str, enabled: bool = True, interval: float = 0.1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.stream, self.verb, self.enabled = total, stream, verb, enabled and total > 0
        self.interval, self._clock = interval, clock
        try:
            self.tty = stream.isatty()
        except (AttributeError, ValueError):  # a closed or unusual stream: plain lines
            self.tty = False
        self._started = clock()
        self._text = ""
        self._drawn = False  # a progress line is on the terminal, without its newline
        self._last_draw = float("-inf")
        self._next_tenth = 1  # non-TTY: the next tenth of the total that gets a line

    def text(self, done: int) -> str:
        elapsed = max(self._clock() - self._started, 1e-9)
        rate = done / elapsed
        text = f"{self.verb} {done}/{self.total} ({done * 100 // self.total}%) {rate:.0f}/s"
        if 0 < done < self.total and rate > 0:
            text += f", eta {(self.total - done) / rate:.0f}s"
        return text

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        if self.tty:
            now = self._clock()
            if done >= self.total or now - self._last_draw >= self.interval:
                self._text = self.text(done)
                self._draw()
                self._last_draw = now
            return
        if done >= self.total or done * 10 >= self._next_tenth * self.total:
            self.stream.write(self.text(done) + "\n")
            self.stream.flush()
            self._next_tenth = done * 10 // self.total + 1

    def line(self, text: str) -> None:
        """Write one ordinary line without garbling the progress line."""
        if self.enabled and self.tty and self._drawn:
            self.stream.write("\r\033[K" + text + "\n")
            self._drawn = False
            self._draw()
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        """End the progress line (on a terminal it stays, with the final count)."""
        if self.enabled and self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False

    def _draw(self) -> None:
        self.stream.write("\r\033[K" + self._text)
        self.stream.flush()
        self._drawn = True
