"""Topic administration and consumer lag, on workers and in the CLI (never in containers).

Every confluent-kafka error of these calls is translated here, once: an unreachable or
timing-out broker is :class:`RuntimeUnavailableError` (retryable: the broker may be
restarting), anything else (authorization, invalid configuration) is
:class:`DeploymentFailedError` naming the broker and what to check.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from confluent_kafka import (
    ConsumerGroupState,
    ConsumerGroupTopicPartitions,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic, OffsetSpec  # type: ignore[attr-defined]  # re-exported without __all__

from mlc.errors import DeploymentFailedError, RuntimeUnavailableError

ADMIN_TIMEOUT_SECONDS = 15.0

_UNAVAILABLE = frozenset(
    {
        KafkaError._TRANSPORT,
        KafkaError._TIMED_OUT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._RESOLVE,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError.NOT_COORDINATOR,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError.LEADER_NOT_AVAILABLE,
    }
)


_LATEST: Any = OffsetSpec.latest()  # type: ignore[no-untyped-call]  # untyped in its stubs


@contextlib.contextmanager
def kafka_errors(bootstrap: str, what: str) -> Iterator[None]:
    """Translate confluent-kafka's exceptions raised inside into the project's errors."""
    try:
        yield
    except KafkaException as exc:
        error = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
        reason = error.str() if error is not None else str(exc)
        if error is None or error.code() in _UNAVAILABLE or error.retriable():
            raise RuntimeUnavailableError(
                f"Kafka at {bootstrap} is unreachable or not ready while trying to {what}: {reason}; "
                "check that the broker runs and the runtime's kafka.bootstrap_servers"
            ) from exc
        raise DeploymentFailedError(
            f"Kafka at {bootstrap} refused to {what}: {reason}; check the runtime's kafka "
            "security settings and the principal's ACLs"
        ) from exc


def _admin(client: Mapping[str, str], timeout: float = ADMIN_TIMEOUT_SECONDS) -> AdminClient:
    return AdminClient({**client, "socket.timeout.ms": int(timeout * 1000)})


def _wait(futures: Mapping[Any, Future[Any]], *, ignore: frozenset[int] = frozenset()) -> None:
    for future in futures.values():
        try:
            future.result(timeout=ADMIN_TIMEOUT_SECONDS)
        except KafkaException as exc:
            if exc.args and isinstance(exc.args[0], KafkaError) and exc.args[0].code() in ignore:
                continue
            raise
        except TimeoutError:
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "admin request timed out")) from None


def ensure_topics(
    client: Mapping[str, str], topics: Mapping[str, int], *, replication_factor: int = 1
) -> None:
    """Create the topics (name -> partitions) that do not exist yet; existing ones are kept.

    Raises:
        RuntimeUnavailableError: the broker cannot be reached.
        DeploymentFailedError: the broker refused (e.g. no permission to create topics).
    """
    bootstrap = client.get("bootstrap.servers", "?")
    with kafka_errors(bootstrap, f"create topics {', '.join(topics)}"):
        admin = _admin(client)
        futures = admin.create_topics(
            [NewTopic(name, partitions, replication_factor) for name, partitions in topics.items()],
            request_timeout=ADMIN_TIMEOUT_SECONDS,
        )
        _wait(futures, ignore=frozenset({KafkaError.TOPIC_ALREADY_EXISTS}))


def delete_topics(client: Mapping[str, str], topics: Sequence[str]) -> None:
    """Delete topics; ones that do not exist are fine.

    Raises:
        RuntimeUnavailableError: the broker cannot be reached.
    """
    bootstrap = client.get("bootstrap.servers", "?")
    with kafka_errors(bootstrap, f"delete topics {', '.join(topics)}"):
        admin = _admin(client)
        futures = admin.delete_topics(list(topics), request_timeout=ADMIN_TIMEOUT_SECONDS)
        _wait(futures, ignore=frozenset({KafkaError.UNKNOWN_TOPIC_OR_PART}))


@dataclass(frozen=True)
class GroupLag:
    """How far a consumer group is behind on a topic."""

    lag: int
    """Records not yet committed (sum over partitions; a partition never committed counts whole)."""
    committed: dict[int, int]
    """Partition -> committed offset (partitions without a commit are left out)."""
    end: dict[int, int]
    """Partition -> end offset (the broker's high watermark)."""


def group_lag(
    client: Mapping[str, str], group: str, topic: str, *, timeout: float = ADMIN_TIMEOUT_SECONDS
) -> GroupLag:
    """The group's committed offsets against the topic's end offsets.

    The embedded broker (Tansu 0.6) reports a partition's end as the start of its newest
    record batch, so there the lag can read low by up to one producer batch; it is never
    reported below zero.

    Raises:
        RuntimeUnavailableError: the broker cannot be reached.
    """
    bootstrap = client.get("bootstrap.servers", "?")
    with kafka_errors(bootstrap, f"read the lag of group {group} on {topic}"):
        admin = _admin(client, timeout)
        metadata = admin.list_topics(topic, timeout=timeout).topics.get(topic)
        if metadata is None or metadata.error is not None:
            return GroupLag(lag=0, committed={}, end={})
        partitions = sorted(metadata.partitions)
        ends = admin.list_offsets(
            {TopicPartition(topic, p): _LATEST for p in partitions},
            request_timeout=timeout,
        )
        end = {tp.partition: f.result(timeout=timeout).offset for tp, f in ends.items()}
        answer = admin.list_consumer_group_offsets(
            [ConsumerGroupTopicPartitions(group, [TopicPartition(topic, p) for p in partitions])],
            request_timeout=timeout,
        )
        committed: dict[int, int] = {}
        for future in answer.values():
            for tp in future.result(timeout=timeout).topic_partitions or []:
                if tp.offset >= 0:
                    committed[tp.partition] = tp.offset
    lag = sum(max(0, end[p] - committed.get(p, 0)) for p in partitions)
    return GroupLag(lag=lag, committed=committed, end=end)


SETTLE_TIMEOUT_SECONDS = 20.0
_SETTLED = frozenset({ConsumerGroupState.STABLE, ConsumerGroupState.EMPTY, ConsumerGroupState.DEAD})


def wait_until_settled(
    client: Mapping[str, str], group: str, *, timeout: float = SETTLE_TIMEOUT_SECONDS, quiet: float = 1.5
) -> bool:
    """Wait until ``group`` has finished the rebalance a member's departure started.

    Drivers stop a deployment's consumers one at a time and call this in between: a member
    that leaves while its group is still rebalancing after the previous departure can leave
    the group wedged on some brokers (seen with Tansu: no later member ever gets an
    assignment), and on any broker it only causes another round of rebalancing. Returns
    True once the group is stable or empty after having been seen rebalancing, or after
    ``quiet`` seconds without a rebalance; False on timeout or when the broker cannot say.
    """
    started = time.monotonic()
    rebalancing = False
    admin = _admin(client, 5.0)
    while time.monotonic() - started < timeout:
        try:
            futures = admin.describe_consumer_groups([group], request_timeout=5.0)
            state = futures[group].result(timeout=5.0).state
        except (KafkaException, TimeoutError):
            return False
        if state in _SETTLED:
            if rebalancing or time.monotonic() - started >= quiet:
                return True
        else:
            rebalancing = True
        time.sleep(0.1)
    return False
