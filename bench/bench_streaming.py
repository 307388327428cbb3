"""Streaming scoring: records/s and latency end to end through Kafka vs the same work in-process.

Both sides start from the same message bytes (each record of the cc-fraud example's
evaluation set, without its label, as the JSON a producer writes) and score them with the
trained scikit-learn pipeline's own ``score_batch``.

Fairness rules:

* **The same work per record on both sides.** The in-process reference takes chunks of
  ``--batch`` message values (the consumer's ``max_poll_records``) and, per chunk, does
  what the streaming deployment does per poll: parse each message's JSON, validate the
  records against the manifest's input schema (:class:`RecordValidator`, as the model
  server and the consumer do), one ``score_batch`` call, and serialise each output
  message (orjson, as the consumer does). Its latency is the time of the chunk that held
  the record.
* **End to end is the deployment as the local runtime runs it**: the embedded broker
  (Tansu, on 127.0.0.1), the deployment's model server on a unix socket (``python -m
  mlc.serving serve --uds``; the runtime also puts it in a network namespace of its own,
  which changes nothing on a unix socket) and one streaming consumer (``python -m
  mlc.streaming consume --score-socket``) with its production settings (``acks=all``,
  idempotent producer, outputs acknowledged before their offsets are committed).
  ``--model-in-consumer`` measures the container shape instead (the consumer loads the
  model). In this process a producer (``acks=all``) writes the records and a reader reads
  the output and dead-letter topics.
* **Latency is stamped before ``produce()``** (in a side table indexed by the record's
  key) and taken when the reader gets the output. Records/s is records over first
  produce to last output read. The flood run produces everything at once; the paced runs
  produce ``--rate`` records/s for ``--paced-seconds`` (under capacity: their latency is
  what a record sees, not queueing behind a backlog).
* **Errors fail the run**: a record whose output never arrives, an output read twice, a
  failed delivery of the bench's producer, any record on the dead-letter topic, or a
  consumer that reports retried batches or refused commits.
* **Interleaved and repeated**: after a warm-up, each of ``--runs`` rounds runs in-process,
  the flood and a paced run, in that order; the table gives the median and the spread
  (min-max) of the rounds, with the machine's load average.

Everything listens on 127.0.0.1 or a unix socket; the bench stops by itself.

    .venv/bin/python bench/bench_streaming.py --records 50000 --runs 5 --rate 2000
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
from confluent_kafka import OFFSET_END, Consumer, KafkaError, Message, Producer, TopicPartition

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cli.examples import prepare_example_model  # noqa: E402 (after the path setup)
from cli.stack.kafka_broker import EmbeddedBroker  # noqa: E402
from mlc.kafka_settings import KafkaSettings  # noqa: E402
from mlc.serving.model_code import load_model  # noqa: E402
from mlc.serving.validation import RecordValidator  # noqa: E402
from mlc.streaming.consumer import READY_LINE, STREAM_CONFIG_ENV  # noqa: E402
from mlc.streaming.settings import StreamConfig  # noqa: E402
from mlc.streaming.topics import ensure_topics  # noqa: E402

DEADLINE_SECONDS = 120.0
"""A run whose outputs have not all arrived by then fails."""


class RunFailedError(Exception):
    """A run had errors; its numbers are not reported."""


@dataclass
class Result:
    """One measured run."""

    records_per_second: float
    p50_ms: float
    p99_ms: float
    cpu_us: dict[str, float] = field(default_factory=dict)
    """CPU microseconds per record, per part: in-process, this process; end to end, the
    consumer, the model server, the broker and this process (the producer and reader)."""


def cpu_seconds(pids: Sequence[int]) -> float:
    """User plus system CPU seconds the processes have used so far (``/proc/PID/stat``)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def message_values(package: Path, count: int) -> list[bytes]:
    """``count`` input messages as a producer writes them: one JSON object each."""
    lines = (package / "data" / "eval.jsonl").read_text().splitlines()
    base = [orjson.loads(line) for line in lines if line.strip()]
    for record in base:
        record.pop("is_fraud", None)
    return [orjson.dumps(base[i % len(base)]) for i in range(count)]


def in_process(
    score_batch: Callable[[list[Any]], Any], validator: RecordValidator, values: list[bytes], batch: int
) -> Result:
    """The consumer's work per poll, without Kafka: parse, validate, score, serialise."""
    latencies: list[float] = []
    cpu = time.process_time()
    started = time.perf_counter()
    for start in range(0, len(values), batch):
        t0 = time.perf_counter()
        records = [orjson.loads(v) for v in values[start : start + batch]]
        if validator.problems(records, limit=5):
            raise RunFailedError("in-process: a record does not match the input schema")
        outputs = score_batch(records)
        messages = [orjson.dumps(o, option=orjson.OPT_SERIALIZE_NUMPY) for o in outputs]
        took = time.perf_counter() - t0
        if len(messages) != len(records):
            raise RunFailedError(f"in-process: {len(messages)} outputs for {len(records)} records")
        latencies += [took] * len(records)
    seconds = time.perf_counter() - started
    cpu_us = (time.process_time() - cpu) / len(values) * 1e6
    return Result(
        len(values) / seconds,
        percentile(latencies, 0.5) * 1e3,
        percentile(latencies, 0.99) * 1e3,
        {"scoring": cpu_us},
    )


class Reader:
    """Reads the output and dead-letter topics from their current ends (before a run starts)."""

    def __init__(self, config: StreamConfig, run: int) -> None:
        self.consumer = Consumer(
            {
                **config.client,
                "group.id": f"bench-reader-{run}",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 5,
                "fetch.min.bytes": 1,
            }
        )
        partitions = []
        for topic in (config.output_topic, config.dead_letter_topic):
            metadata = self.consumer.list_topics(topic, timeout=10).topics[topic]
            partitions += [TopicPartition(topic, p, OFFSET_END) for p in metadata.partitions]
        self.consumer.assign(partitions)
        self.dead_letter_topic = config.dead_letter_topic
        # OFFSET_END resolves lazily: make sure every partition has a position before producing.
        deadline = time.monotonic() + 10
        while any(p.offset < 0 for p in self.consumer.position(partitions)) and time.monotonic() < deadline:
            self.consumer.consume(100, 0.05)

    def read(self, timeout: float) -> list[Message]:
        return [m for m in self.consumer.consume(10_000, timeout) if m.error() is None]

    def close(self) -> None:
        self.consumer.close()


def end_to_end(
    config: StreamConfig,
    values: list[bytes],
    run: int,
    parts: dict[str, int],
    *,
    rate: float | None = None,
) -> Result:
    """Produce ``values`` (as fast as possible, or paced at ``rate`` records/s) and read
    every output back; raise :class:`RunFailedError` on any error. ``parts`` names the
    processes whose CPU time is counted, besides this one."""
    reader = Reader(config, run)
    cpu = {name: cpu_seconds([pid]) for name, pid in parts.items()}
    own = time.process_time()
    prefix = f"{run}/".encode()
    sent = [0.0] * len(values)
    latencies: list[float] = []
    seen = bytearray(len(values))
    failures: list[str] = []

    def delivered(error: KafkaError | None, message: Message) -> None:
        if error is not None:
            failures.append(str(error))

    def produce() -> None:
        producer = Producer({**config.client, "acks": "all"})  # librdkafka's defaults otherwise
        for i, value in enumerate(values):
            key = prefix + str(i).encode()
            sent[i] = time.perf_counter()
            while True:
                try:
                    producer.produce(config.input_topic, value=value, key=key, on_delivery=delivered)
                    break
                except BufferError:
                    producer.poll(0.01)
            if rate is not None:
                producer.poll(0)
                pause = first + (i + 1) / rate - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
            elif i % 1000 == 0:
                producer.poll(0)
        if producer.flush(60):
            failures.append("the bench's producer could not deliver every record within 60 s")

    first = time.perf_counter()
    thread = threading.Thread(target=produce)
    thread.start()
    received = 0
    deadline = first + DEADLINE_SECONDS
    try:
        while received < len(values) and time.perf_counter() < deadline and not failures:
            for message in reader.read(0.005):
                now = time.perf_counter()
                key = message.key() or b""
                if not key.startswith(prefix):
                    continue
                if message.topic() == reader.dead_letter_topic:
                    headers = dict(message.headers() or [])
                    raise RunFailedError(
                        f"record {key.decode()} was dead-lettered: {headers.get('mlc-error')!r}"
                    )
                index = int(key[len(prefix) :])
                if seen[index]:
                    raise RunFailedError(f"the output of record {key.decode()} was read twice")
                seen[index] = 1
                received += 1
                latencies.append(now - sent[index])
        last = time.perf_counter()
        thread.join()
        # Anything more (a duplicate, a dead letter) shows within a short grace period.
        for message in reader.read(0.2):
            if (message.key() or b"").startswith(prefix):
                raise RunFailedError(f"an extra message for {message.key()!r} on {message.topic()}")
    finally:
        thread.join()
        reader.close()
    if failures:
        raise RunFailedError(f"the bench's producer failed: {failures[0]}")
    if received < len(values):
        raise RunFailedError(
            f"only {received} of {len(values)} outputs arrived within {DEADLINE_SECONDS:.0f} s"
        )
    return Result(
        len(values) / (last - first),
        percentile(latencies, 0.5) * 1e3,
        percentile(latencies, 0.99) * 1e3,
        {
            **{name: (cpu_seconds([pid]) - cpu[name]) / len(values) * 1e6 for name, pid in parts.items()},
            "bench producer + reader": (time.process_time() - own) / len(values) * 1e6,
        },
    )


def wait_for(path: Path, text: str, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and text in path.read_text(errors="replace")):
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{process.args[3]} did not start; see {path}")
        time.sleep(0.05)


def wait_healthy(socket: Path, process: subprocess.Popen[bytes], log_path: Path, timeout: float = 60) -> None:
    client = httpx.Client(
        transport=httpx.HTTPTransport(uds=str(socket)), base_url="http://model", trust_env=False
    )
    deadline = time.monotonic() + timeout
    while True:
        try:
            if client.get("/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the model server did not start; see {log_path}")
        time.sleep(0.05)


def consumer_stats(log_path: Path) -> str:
    """The consumer's last stats line; the run fails unless nothing was retried or refused."""
    lines = [line for line in log_path.read_text().splitlines() if "dead-lettered" in line]
    if not lines:
        raise RunFailedError(f"the consumer logged no stats; see {log_path}")
    last = lines[-1]
    if not re.search(r"dead-lettered 0 in \d+ batches \(0 retried, 0 commits refused\)", last):
        raise RunFailedError(f"the consumer had errors: {last}")
    return last.split(": ", 1)[-1]


def spread(values: Sequence[float], fmt: str) -> str:
    return f"{format(statistics.median(values), fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=50_000, help="records of each flood run")
    parser.add_argument("--runs", type=int, default=5, help="rounds of in-process, flood and paced runs")
    parser.add_argument("--batch", type=int, default=500, help="max_poll_records, and the in-process chunk")
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--rate", type=float, default=2000.0, help="records/s of the paced runs")
    parser.add_argument("--paced-seconds", type=float, default=5.0, help="how long each paced run produces")
    parser.add_argument(
        "--model-in-consumer",
        action="store_true",
        help="the container shape: the consumer loads the model instead of using a model server",
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-streaming-"))
    package = prepare_example_model(work / "cc-fraud")
    values = message_values(package, args.records)
    paced_values = values[: int(args.rate * args.paced_seconds)]
    model = load_model(package)
    validator = RecordValidator(model.manifest.input_schema)
    load: list[float] = []
    local: list[Result] = []
    flood: list[Result] = []
    paced: list[Result] = []

    with EmbeddedBroker(log_path=work / "tansu.log") as broker:
        kafka = KafkaSettings(
            bootstrap_servers=broker.bootstrap,
            input_topic="bench.in",
            output_topic="bench.out",
            partitions=args.partitions,
            max_poll_records=args.batch,
        )
        config = StreamConfig.build(
            kafka, runtime="bench", deployment_id="bench-1", model="cc-fraud", version=1, standby=False
        )
        ensure_topics(
            kafka.client_config(),
            {
                "bench.in": args.partitions,
                "bench.out": args.partitions,
                kafka.dead_letters: args.partitions,
                config.test_input_topic: 1,
                config.test_output_topic: 1,
            },
        )
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        children: list[subprocess.Popen[bytes]] = []
        consumer_log = work / "consumer.log"
        python = [sys.executable, "-m"]
        command = [*python, "mlc.streaming", "consume", "--package", str(package)]
        try:
            if not args.model_in_consumer:
                socket = work / "s.sock"  # short: a socket address has ~100 bytes
                server_log = work / "server.log"
                with server_log.open("wb") as out:
                    children.append(
                        subprocess.Popen(
                            [
                                *python,
                                "mlc.serving",
                                "serve",
                                "--package",
                                str(package),
                                "--uds",
                                str(socket),
                            ],
                            env=env,
                            stdout=out,
                            stderr=subprocess.STDOUT,
                        )
                    )
                wait_healthy(socket, children[-1], server_log)
                command += ["--score-socket", str(socket)]
            with consumer_log.open("wb") as out:
                children.append(
                    subprocess.Popen(
                        command,
                        env={**env, STREAM_CONFIG_ENV: config.model_dump_json()},
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )
            wait_for(consumer_log, READY_LINE, children[-1])
            in_process(model.score_batch, validator, values[:5000], args.batch)  # warm-up
            assert broker._process is not None
            parts = {"broker": broker._process.pid, "consumer": children[-1].pid}
            if not args.model_in_consumer:
                parts["model server"] = children[0].pid
            end_to_end(config, values[: min(5000, len(values))], 0, parts)  # warm-up, group join
            for run in range(1, args.runs + 1):
                load.append(os.getloadavg()[0])
                local.append(in_process(model.score_batch, validator, values, args.batch))
                flood.append(end_to_end(config, values, 2 * run - 1, parts))
                paced.append(end_to_end(config, paced_values, 2 * run, parts, rate=args.rate))
                print(
                    f"round {run}: in-process {local[-1].records_per_second:.0f}/s, flood "
                    f"{flood[-1].records_per_second:.0f}/s p99 {flood[-1].p99_ms:.1f} ms, paced p99 "
                    f"{paced[-1].p99_ms:.1f} ms",
                    flush=True,
                )
        finally:
            for child in reversed(children):
                child.terminate()
                child.wait(30)
        stats = consumer_stats(consumer_log)

    ratios = [f.records_per_second / p.records_per_second for f, p in zip(flood, local, strict=True)]
    shape = "model in the consumer" if args.model_in_consumer else "consumer + model server on a unix socket"
    print(
        f"\ncc-fraud: {args.records} records per flood, batches of {args.batch}, "
        f"{args.partitions} partitions, "
        f"{shape}; median (min-max) of {args.runs} interleaved rounds; load average "
        f"{spread(load, '.1f')}"
    )
    print(f"{'':36} {'in-process (same work)':>26} {'Kafka end to end':>26}")
    print(
        f"{'records/s (flood)':36} {spread([r.records_per_second for r in local], '.0f'):>26} "
        f"{spread([r.records_per_second for r in flood], '.0f'):>26}"
    )
    print(f"{'ratio end to end / in-process':36} {'':>26} {spread(ratios, '.3f'):>26}")
    for name, pick in (("p50", lambda r: r.p50_ms), ("p99", lambda r: r.p99_ms)):
        print(
            f"{name + ' ms per record (flood)':36} {spread([pick(r) for r in local], '.2f'):>26} "
            f"{spread([pick(r) for r in flood], '.1f'):>26}"
        )
    for name, pick in (("p50", lambda r: r.p50_ms), ("p99", lambda r: r.p99_ms)):
        print(
            f"{f'{name} ms per record ({args.rate:.0f}/s)':36} {'':>26} "
            f"{spread([pick(r) for r in paced], '.1f'):>26}"
        )
    scoring = [r.cpu_us["consumer"] + r.cpu_us.get("model server", 0.0) for r in flood]
    print(
        f"{'CPU us/record: scoring (flood)':36} {spread([r.cpu_us['scoring'] for r in local], '.1f'):>26} "
        f"{spread(scoring, '.1f'):>26}"
    )
    for part in flood[0].cpu_us:
        print(f"{'  ' + part:36} {'':>26} {spread([r.cpu_us[part] for r in flood], '.1f'):>26}")
    print(f"consumer: {stats}")


if __name__ == "__main__":
    try:
        main()
    except RunFailedError as exc:
        raise SystemExit(f"run failed: {exc}") from None
