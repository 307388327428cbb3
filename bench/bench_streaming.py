"""Streaming scoring: records/s end to end through Kafka vs the same model scored in-process.

Both sides score the trained cc-fraud scikit-learn pipeline (``examples/models/cc-fraud``)
with its own ``score_batch``:

* in-process: ``load_model(...).score_batch`` called on chunks of ``--batch`` records (the
  consumer's ``max_poll_records``) in this process; the per-record latency is the time of
  the call that scored it;
* end to end: the embedded broker (Tansu, on 127.0.0.1), one streaming consumer
  (``python -m mlc.streaming consume``, exactly what the local runtime starts) and, in this
  process, a producer writing the records (``acks=all``) and a reader of the output topic.
  A record's latency runs from the moment it was handed to the producer to the moment its
  output was read back; records/s is records over first produce -> last output read. So
  it includes producing, the broker, validation, one ``score_batch`` per poll, producing
  each output with headers, waiting for their acknowledgements and the synchronous offset
  commit that at-least-once needs.

Each side runs ``--runs`` times after a warm-up; the best run's numbers are printed side
by side with the ratio. Everything listens on 127.0.0.1; the bench stops by itself.

    .venv/bin/python bench/bench_streaming.py --records 50000 --runs 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cli.examples import prepare_example_model  # noqa: E402 (after the path setup)
from cli.stack.kafka_broker import EmbeddedBroker  # noqa: E402
from mlc.kafka_settings import KafkaSettings  # noqa: E402
from mlc.serving.model_code import load_model  # noqa: E402
from mlc.streaming.consumer import READY_LINE, STREAM_CONFIG_ENV  # noqa: E402
from mlc.streaming.settings import StreamConfig  # noqa: E402
from mlc.streaming.topics import ensure_topics  # noqa: E402


@dataclass
class Result:
    """One measured run."""

    records_per_second: float
    p50_ms: float
    p99_ms: float
    seconds: float


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def records_of(package: Path, count: int) -> list[dict[str, Any]]:
    lines = (package / "data" / "eval.jsonl").read_text().splitlines()
    base = [orjson.loads(line) for line in lines if line.strip()]
    for record in base:
        record.pop("is_fraud", None)
    return [base[i % len(base)] for i in range(count)]


def in_process(package: Path, records: list[dict[str, Any]], batch: int) -> Result:
    model = load_model(package)
    latencies: list[float] = []
    started = time.perf_counter()
    for start in range(0, len(records), batch):
        chunk = records[start : start + batch]
        t0 = time.perf_counter()
        outputs = model.score_batch(chunk)
        took = time.perf_counter() - t0
        assert len(outputs) == len(chunk)
        latencies += [took] * len(chunk)
    seconds = time.perf_counter() - started
    return Result(
        len(records) / seconds, percentile(latencies, 0.5) * 1e3, percentile(latencies, 0.99) * 1e3, seconds
    )


def end_to_end(
    config: StreamConfig, records: list[dict[str, Any]], run: int, *, rate: float | None = None
) -> Result:
    """Produce ``records`` (as fast as possible, or paced at ``rate`` records/s) and read
    every output back."""
    client = dict(config.client)
    values = [orjson.dumps(r) for r in records]
    reader = Consumer(
        {**client, "group.id": f"bench-reader-{run}", "enable.auto.commit": False, "fetch.wait.max.ms": 20}
    )
    metadata = reader.list_topics(config.output_topic, timeout=10).topics[config.output_topic]
    # Every run reads the topic from the start; its keys' prefix tells this run's outputs apart.
    reader.assign([TopicPartition(config.output_topic, p, OFFSET_BEGINNING) for p in metadata.partitions])
    prefix = f"{run}/".encode()
    sent = [0.0] * len(records)
    done: list[float] = []
    received = 0
    seen = bytearray(len(records))

    def produce() -> None:
        producer = Producer({**client, "acks": "all", "linger.ms": 5})
        for i, value in enumerate(values):
            while True:
                try:
                    producer.produce(config.input_topic, value=value, key=prefix + str(i).encode())
                    break
                except BufferError:
                    producer.poll(0.01)
            sent[i] = time.perf_counter()
            if rate is not None:
                pause = first + (i + 1) / rate - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
                producer.poll(0)
            elif i % 1000 == 0:
                producer.poll(0)
        producer.flush(60)

    first = time.perf_counter()
    thread = threading.Thread(target=produce)
    thread.start()
    deadline = first + 300
    while received < len(records) and time.perf_counter() < deadline:
        for message in reader.consume(5000, 0.005):
            key = message.key() or b""
            if message.error() is not None or not key.startswith(prefix):
                continue
            index = int(key[len(prefix) :])
            if not seen[index]:
                seen[index] = 1
                received += 1
                done.append(time.perf_counter() - sent[index])
    last = time.perf_counter()
    thread.join()
    reader.close()
    if received < len(records):
        raise SystemExit(f"only {received} of {len(records)} outputs arrived within 300 s")
    return Result(
        len(records) / (last - first), percentile(done, 0.5) * 1e3, percentile(done, 0.99) * 1e3, last - first
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=500, help="max_poll_records, and the in-process chunk")
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument(
        "--rate", type=float, default=2000.0, help="records/s of the paced run that measures latency"
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-streaming-"))
    package = prepare_example_model(work / "cc-fraud")
    records = records_of(package, args.records)
    local = [in_process(package, records, args.batch) for _ in range(args.runs + 1)][1:]

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
                kafka.dead_letters: 1,
                config.test_input_topic: 1,
                config.test_output_topic: 1,
            },
        )
        log = (work / "consumer.log").open("wb")
        consumer = subprocess.Popen(
            [sys.executable, "-m", "mlc.streaming", "consume", "--package", str(package)],
            env={**os.environ, STREAM_CONFIG_ENV: config.model_dump_json(), "PYTHONPATH": str(ROOT)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            while READY_LINE not in (work / "consumer.log").read_text():
                if consumer.poll() is not None:
                    raise SystemExit(f"the consumer exited; see {work / 'consumer.log'}")
                time.sleep(0.05)
            end_to_end(config, records[: min(5000, len(records))], run=0)  # warm-up, rebalance
            remote = [end_to_end(config, records, run=i + 1) for i in range(args.runs)]
            paced_count = min(len(records), int(args.rate * 10))
            paced = end_to_end(config, records[:paced_count], run=args.runs + 1, rate=args.rate)
        finally:
            consumer.terminate()
            consumer.wait(30)
            log.close()

    best_local = max(local, key=lambda r: r.records_per_second)
    best_remote = max(remote, key=lambda r: r.records_per_second)
    ratio = best_remote.records_per_second / best_local.records_per_second
    print(
        f"\ncc-fraud: {args.records} records, batches of {args.batch}, {args.partitions} partitions, "
        f"best of {args.runs} runs"
    )
    print(f"{'':34} {'in-process':>12} {'Kafka end to end':>18}")
    print(
        f"{'records/s (flood)':34} {best_local.records_per_second:12.0f} "
        f"{best_remote.records_per_second:18.0f}   ratio {ratio:.3f}"
    )
    print(f"{'p50 / p99 ms per record (flood)':34} {best_local.p50_ms:5.2f} / {best_local.p99_ms:4.2f} "
          f"{best_remote.p50_ms:9.1f} / {best_remote.p99_ms:6.1f}")  # fmt: skip
    print(
        f"{f'p50 / p99 ms per record ({args.rate:.0f}/s)':34} {'':12} "
        f"{paced.p50_ms:9.1f} / {paced.p99_ms:6.1f}"
    )
    print(
        f"all runs, records/s: in-process {[round(r.records_per_second) for r in local]}, "
        f"end to end {[round(r.records_per_second) for r in remote]} "
        f"(median {statistics.median(r.records_per_second for r in remote):.0f})"
    )


if __name__ == "__main__":
    main()
