"""Prometheus metrics: a /metrics endpoint on the master and on each host.

Off by default; `--metrics HOST:PORT` turns it on (a bare `:PORT` binds to
loopback, as every other address here does unless told otherwise).  The
endpoint is prometheus-client's HTTP server, in its own thread; at each
scrape it asks the trio thread for the values (`trio.from_thread`), so a
scrape never reads counters halfway through a change.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from .errors import QuietError
from .protocol import STATS_LEVELS

if TYPE_CHECKING:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Sample:
    """One value: `name` without the `sharedfs_` prefix (and, for a
    counter, without `_total`, which the exposition adds)."""

    name: str
    value: float
    help: str
    counter: bool = True
    labels: dict[str, str] = field(default_factory=dict)


Sampler = Callable[[], list[Sample]]


def counter_samples(
    prefix: str, counters: dict[str, int], labels: dict[str, str] | None = None
) -> list[Sample]:
    """A host's or the master's counters dict as samples: running totals are
    counters, the levels (STATS_LEVELS) gauges."""
    return [
        Sample(
            f"{prefix}_{k}",
            v,
            f"sharedfs {prefix} {k.replace('_', ' ')}",
            counter=k not in STATS_LEVELS,
            labels=labels or {},
        )
        for k, v in sorted(counters.items())
    ]


class _Collector:
    def __init__(self, sample: Sampler, token: trio.lowlevel.TrioToken) -> None:
        self._sample = sample
        self._token = token

    def collect(self) -> Iterator[Metric]:
        samples = trio.from_thread.run_sync(self._sample, trio_token=self._token)
        return iter(families(samples))


def families(samples: Iterable[Sample]) -> list[Metric]:
    """Samples grouped into metric families, one per name."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    out: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
    for s in samples:
        keys = sorted(s.labels)
        fam = out.get(s.name)
        if fam is None:
            cls = CounterMetricFamily if s.counter else GaugeMetricFamily
            fam = out[s.name] = cls(f"sharedfs_{s.name}", s.help, labels=keys)
        fam.add_metric([s.labels[k] for k in keys], s.value)
    return list(out.values())


@asynccontextmanager
async def serve_metrics(addr: tuple[str, int], sample: Sampler) -> AsyncIterator[int]:
    """Serve /metrics on `addr` while the block runs; yields the port."""
    # Imported only when an endpoint is asked for: every command would
    # otherwise pay 50 ms for it.
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    registry.register(_Collector(sample, trio.lowlevel.current_trio_token()))  # type: ignore[arg-type]
    host, port = addr
    try:
        server, _ = start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        raise QuietError(
            f"--metrics {host}:{port}: cannot listen: {e.strerror or e}; pick another port", 1
        ) from None
    try:
        yield server.server_port
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(server.shutdown)
        server.server_close()
