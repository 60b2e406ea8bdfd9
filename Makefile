# Two commands on a fresh machine (Python 3.11, pip, make): `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# One state directory per user and checkout: two checkouts' test runs never share (or stop) a broker.
CHECKOUT_ID := $(shell id -u)-$(shell printf %s "$(CURDIR)" | cksum | cut -d' ' -f1)
KAFKA_STATE ?= $(or $(TMPDIR),/tmp)/choreo-kafka-$(CHECKOUT_ID)
JAEGER_STATE ?= $(or $(TMPDIR),/tmp)/choreo-jaeger-$(CHECKOUT_ID)
PYTEST_ARGS ?=
# The broker `make bench` runs on: tansu (the embedded dev stack) or kafka (a fresh Apache Kafka per
# bench, the one `make test-kafka` starts, with the dev stack's Redis). Each has its own results file
# and chart, so figures from one never overwrite the other's.
BROKER ?= tansu
BENCH_BROKERS := tansu kafka
ifeq ($(BROKER),kafka)
BENCH_RUN := $(PY) scripts/apache_kafka.py run --state-dir $(KAFKA_STATE) --
BENCH_FROM_ENV := --broker-from-env
BENCH_RESULTS := bench/results-kafka.json
else
BENCH_RUN :=
BENCH_FROM_ENV :=
BENCH_RESULTS := bench/results.json
endif
BENCH_CHART := $(BENCH_RESULTS:.json=.png)
# Expanded by each bench's recipe, so only the benches refuse an unknown BROKER, before anything runs.
bench_broker = $(if $(filter-out 1,$(words $(BROKER)))$(filter-out $(BENCH_BROKERS),$(BROKER)),$(error \
	BROKER=$(BROKER) is not a broker the benches run on: use BROKER=tansu (the embedded dev stack, the \
	default) or BROKER=kafka (Apache Kafka, as in make test-kafka)))

.PHONY: install demo test test-unit test-kafka dev bench bench-parallel bench-step bench-chain bench-saga bench-backlog clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## Start the embedded broker and Redis, run the reference services, print what happened, stop.
demo: install
	$(PY) -m services.demo

## The whole suite on the embedded stack (Tansu + Redis), plus mypy (strict) on choreo, services, bench and scripts.
test: install
	$(PY) -m mypy
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: install
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

## The integration and conformance suites against a real single-node KRaft Apache Kafka 4.x, with a
## real Jaeger v2 receiving the services' traces (built with Go on first use; test_jaeger.py reads them).
test-kafka: install
	$(PY) scripts/jaeger.py run --state-dir $(JAEGER_STATE) -- \
		$(PY) scripts/apache_kafka.py run --state-dir $(KAFKA_STATE) -- \
		$(PY) -m pytest tests/integration tests/conformance $(PYTEST_ARGS)

## Every bench in sequence (one at a time even under make -j: they would skew each other's figures),
## then the chart of their figures: bench/results.png, or bench/results-kafka.png with BROKER=kafka.
bench: install
	$(bench_broker)
	$(MAKE) --no-print-directory bench-parallel
	$(MAKE) --no-print-directory bench-step
	$(MAKE) --no-print-directory bench-chain
	$(MAKE) --no-print-directory bench-saga
	$(PY) -m bench.chart --results $(BENCH_RESULTS) --out $(BENCH_CHART)

## Key-ordered parallel processing: events/s by Settings.concurrency, order violations; writes bench/results.json.
bench-parallel: install
	$(bench_broker)
	$(BENCH_RUN) $(PY) -m bench.parallel --rounds 3 $(BENCH_FROM_ENV) --results $(BENCH_RESULTS)

## One saga step side by side: choreo vs hand-written confluent-kafka loops (events/s, p50/p99, CPU); writes bench/results.json.
bench-step: install
	$(bench_broker)
	$(BENCH_RUN) $(PY) -m bench.step $(BENCH_FROM_ENV) --results $(BENCH_RESULTS)

## Throughput of the two-service chain (printed only).
bench-chain: install
	$(bench_broker)
	$(BENCH_RUN) $(PY) -m bench.chain $(BENCH_FROM_ENV)

## The checkout saga: sagas/s under a backlog (3 rounds), p50/p99 saga duration at a low rate; writes bench/results.json.
bench-saga: install
	$(bench_broker)
	$(BENCH_RUN) $(PY) -m bench.saga $(BENCH_FROM_ENV) --results $(BENCH_RESULTS)

## One service drains a million-event backlog: peak RSS, VmHWM, RSS at 10/50/90%; minutes, so not in `bench`.
bench-backlog: install
	$(PY) -m bench.backlog $(ARGS)

## A local broker and Redis until Ctrl-C.
dev: install
	$(VENV)/bin/choreo dev

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache
