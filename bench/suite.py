"""The benchmark suite of issue 11: one table of figures, each the median of its rounds with min
and max, its ratio to a baseline measured in the same run, and PASS or SHORT beside each target.

    .venv/bin/python bench/suite.py [--quick] [--db sqlite|postgres|both] [--only 1,3,...]

Everything runs on this machine: one aiosmtpd sink in its own process (it counts messages and
SMTP sessions and timestamps arrivals), a real broker (Redis; RabbitMQ as well for the
throughput rows 1 and 2), real `celery -A workers worker` processes, on SQLite (a fresh file per
run) and PostgreSQL (a fresh database per run); services and directories: bench/common.py. Each
database and broker runs in a process of its own, whose environment its workers share.

0. Baseline: one smtplib connection sending pre-built messages (sendmail(), as the issue sets
   it), and for reference the same connection pipelining MAIL, RCPT and DATA (RFC 2920); the
   sink offers PIPELINING, as most servers do, and the workers use it. The sink's ceiling: 2
   and 4 pipelining connections in parallel, each in its own process.
1. Bulk: one schedule_messages() call to N addresses, call -> the sink has all; 1, 2 and 4
   worker processes. 2 processes >= 0.9x baseline; 4 faster than 2 unless the sink is the limit
   (4 processes at >= 0.9x the sink's ceiling).
2. One at a time: N calls of one recipient, workers consuming meanwhile; first call -> last
   arrival >= 0.45x baseline; scheduling <= 1 ms per call.
3. Latency: warm idle workers, messages one at a time 20 ms apart, call returned -> arrival:
   p50 <= 15 ms, p99 <= 50 ms.
4. Scheduling cost: one call of 1, 100 and 10,000 recipients (no workers): 10,000 in <= 1 s,
   SQL queries (CaptureQueriesContext) not growing with the recipients.
5. Scale: time per message at N = 1,000, 5,000, 20,000 (bulk): the largest within 15 % of the
   smallest.
6. Worker memory: RSS of a pool process (a fresh -c 1 worker) before and after 20,000
   dispatches (half in one call, half one at a time): < 20 MB growth; then its peak with 1,000
   recipients of a 1 MB message (no target; the 1 KB peak for comparison).
7. XMPP (bench/xmpp_session.py): 500 messages through the warm session vs a login per batch of
   one: >= 10x.

On 2 cores the full run (3 rounds) takes about 6 minutes per database, 13 with --db both;
--quick (smaller N, 1 round) about 3 with --db both. A row that fails is shown as ERROR and
makes the exit status 1; SHORT does not.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import queue
import shlex
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    AMQP_URL,
    MB,
    PG_URL,
    REDIS_URL,
    ROOT,
    SPAWN,
    VAR_ROOT,
    Sink,
    Stat,
    Worker,
    addresses,
    clear,
    configure_django,
    deliver_bulk,
    deliver_singles,
    email,
    fresh_postgres,
    memory,
    percentile,
    purge_smtp_queues,
    settle,
    smtp_rate,
    start_worker,
    text_of,
    wait_delivered,
)

THROUGHPUT_ROWS = {1, 2}  # also run on RabbitMQ
ALL_ROWS = range(1, 8)


@dataclass(frozen=True)
class Sizes:
    rounds: int
    bulk: int  # the baseline, rows 1 and 2
    latency: int
    scheduling: tuple[int, ...]
    scale: tuple[int, ...]
    memory: int
    large: int  # recipients of the 1 MB message
    xmpp: int


FULL = Sizes(3, 5000, 200, (1, 100, 10_000), (1000, 5000, 20_000), 20_000, 1000, 500)
QUICK = Sizes(1, 1000, 50, (1, 100, 10_000), (500, 2000, 10_000), 4000, 200, 100)


@dataclass
class Line:
    """One line of the table: a figure, its ratio to the baseline, and its target if any."""

    row: int
    what: str
    ran_on: str
    stat: Stat = field(default_factory=lambda: Stat(()))
    unit: str = ""
    ratio: float | None = None
    note: str = ""
    error: str = ""
    target: str = ""
    ok: bool | None = None  # None: no target

    @property
    def median(self) -> float:
        return self.stat.median

    def aim(self, target: str, ok: bool) -> Line:
        self.target, self.ok = target, ok
        return self


@dataclass
class Config:
    """What one database-and-broker process runs, and what it needs from the parent."""

    db: str
    broker: str
    rows: list[int]
    sizes: Sizes
    sink: Sink
    baseline: float  # msg/s
    sink_max: float
    run_dir: Path

    @property
    def broker_url(self) -> str:
        return REDIS_URL if self.broker == "redis" else AMQP_URL


class Bench:
    """The state of one database-and-broker process: its sizes, sink and current worker."""

    def __init__(self, config: Config) -> None:
        self.config, self.sizes, self.sink = config, config.sizes, config.sink
        self.worker: Worker | None = None
        self.started_workers = 0

    def workers(self, procs: int, fresh: bool = False) -> Worker:
        """A warm worker with ``procs`` pool processes: the running one if it has as many."""
        if self.worker is not None and (fresh or self.worker.procs != procs):
            self.stop_workers()
        if self.worker is None:
            self.started_workers += 1
            log = self.config.run_dir / f"worker-{self.started_workers}-c{procs}.log"
            self.worker = start_worker(self.sink, procs, log)
        return self.worker

    def stop_workers(self) -> None:
        worker, self.worker = self.worker, None
        if worker is not None:
            worker.stop()

    def ran_on(self, procs: int | None = None) -> str:
        where = f"{self.config.db}, {self.config.broker}"
        return where if procs is None else f"{where}, {plural(procs, 'proc')}"

    def ratio(self, rate: float) -> float:
        return rate / self.config.baseline

    def bulk_rates(self, procs: int, count: int) -> tuple[Stat, float]:
        """Messages per second of one call to ``count`` addresses, over the rounds, and the SMTP
        sessions the sink saw per round."""
        self.workers(procs)
        sessions = self.sink.sessions
        rates = Stat.of(
            count / deliver_bulk(self.sink, addresses(count), email())
            for _ in range(self.sizes.rounds)
        )
        return rates, (self.sink.sessions - sessions) / self.sizes.rounds


def plural(count: int, word: str) -> str:
    return f"{count:,} {word}{'s' * (count != 1)}"


def verdict(ok: bool | None) -> str:
    return "" if ok is None else "PASS" if ok else "SHORT"


def row_bulk(bench: Bench) -> list[Line]:
    """Row 1. 4 processes before 2, so that rows 2, 3 and 5 find 2 running."""
    n = bench.sizes.bulk
    measured = {procs: bench.bulk_rates(procs, n) for procs in (1, 4, 2)}
    lines = {}
    for procs in (1, 2, 4):
        stat, sessions = measured[procs]
        lines[procs] = Line(1, f"bulk: one call, {n:,} recipients", bench.ran_on(procs), stat,
                            "msg/s", bench.ratio(stat.median),
                            f"{sessions:.0f} new SMTP sessions/round")  # fmt: skip
    rate = {procs: stat.median for procs, (stat, _) in measured.items()}
    lines[2].aim(">= 0.90x", bench.ratio(rate[2]) >= 0.9)
    ceiling = rate[4] / bench.config.sink_max
    lines[4].note += f"; {ceiling:.2f}x the sink's ceiling"
    lines[4].aim("> 2 procs, or sink-bound", rate[4] > rate[2] or ceiling >= 0.9)
    return list(lines.values())


def row_singles(bench: Bench) -> list[Line]:
    """Row 2."""
    n = bench.sizes.bulk
    bench.workers(2)
    rounds = [deliver_singles(bench.sink, addresses(n, "s")) for _ in range(bench.sizes.rounds)]
    rate = Stat.of(n / seconds for seconds, _ in rounds)
    per_call = Stat.of(1000 * per_call for _, per_call in rounds)
    ratio = bench.ratio(rate.median)
    where = bench.ran_on(2)
    return [
        Line(2, f"one at a time: {n:,} calls of 1", where, rate, "msg/s", ratio).aim(
            ">= 0.45x", ratio >= 0.45
        ),
        Line(2, "  scheduling, per call", where, per_call, "ms").aim(
            "<= 1 ms", per_call.median <= 1
        ),
    ]


def latencies(bench: Bench, count: int, spacing: float = 0.02) -> list[float]:
    """Milliseconds from each call returning to its message's arrival, one message at a time."""
    from dispatcher import toolbox

    clear()
    result = []
    for address in addresses(count, "l"):
        first = bench.sink.arrivals
        toolbox.schedule_messages(email(), toolbox.recipients("smtp", [address]))
        returned = time.monotonic()
        result.append(1000 * (wait_delivered(bench.sink, first + 1, 10) - returned))
        time.sleep(spacing)
    settle()
    return result


def row_latency(bench: Bench) -> list[Line]:
    """Row 3."""
    n = bench.sizes.latency
    bench.workers(2)
    rounds = [latencies(bench, n) for _ in range(bench.sizes.rounds)]
    lines = {
        percent: Line(3, f"latency p{percent}, {n} messages 20 ms apart", bench.ran_on(2),
                      Stat.of(percentile(values, percent) for values in rounds), "ms")
        for percent in (50, 90, 99)
    }  # fmt: skip
    for percent, limit in ((50, 15), (99, 50)):
        lines[percent].aim(f"<= {limit} ms", lines[percent].median <= limit)
    return list(lines.values())


def row_scheduling(bench: Bench) -> list[Line]:
    """Row 4: no workers, so only the call is measured; the tasks it published are dropped."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from dispatcher import toolbox

    bench.stop_workers()
    toolbox.schedule_messages(email(), toolbox.recipients("smtp", ["first@example.com"]))  # warm
    lines = []
    where = f"{bench.ran_on()}, no workers"
    for n in bench.sizes.scheduling:
        timed, counted = [], []
        for _ in range(bench.sizes.rounds):
            clear()
            to = toolbox.recipients("smtp", addresses(n, "q"))
            with CaptureQueriesContext(connection) as captured:
                started = time.monotonic()
                toolbox.schedule_messages(email(), to)
                timed.append(1000 * (time.monotonic() - started))
            counted.append(len(captured))
            purge_smtp_queues()
        lines += [
            Line(4, f"schedule one call, {plural(n, 'recipient')}", where, Stat.of(timed), "ms"),
            Line(4, f"  SQL queries, {plural(n, 'recipient')}", where, Stat.of(counted), "queries"),
        ]  # fmt: skip
    clear()
    fewest, most = lines[1].median, lines[-1].median
    lines[-2].aim("<= 1 s", lines[-2].median <= 1000)
    lines[-1].aim(f"<= {fewest:.0f}, as for {bench.sizes.scheduling[0]:,}", most <= fewest)
    return lines


def row_scale(bench: Bench) -> list[Line]:
    """Row 5."""
    lines = []
    for n in bench.sizes.scale:
        per_message = bench.bulk_rates(2, n)[0].map(lambda rate: 1000 / rate)
        lines.append(Line(5, f"scale: bulk, {n:,} recipients", bench.ran_on(2), per_message,
                          "ms/msg", bench.ratio(1000 / per_message.median)))  # fmt: skip
    growth = lines[-1].median / lines[0].median
    lines[-1].note = f"{growth:.2f}x the time per message of {bench.sizes.scale[0]:,}"
    lines[-1].aim("within 15 %", growth <= 1.15)
    return lines


def row_memory(bench: Bench) -> list[Line]:
    """Row 6: one round (a leak shows as growth, not as spread), in a fresh worker."""
    pid = bench.workers(1, fresh=True).pool()[0]
    before = memory(pid)
    half = bench.sizes.memory // 2
    deliver_bulk(bench.sink, addresses(half, "m"), email())
    deliver_singles(bench.sink, addresses(bench.sizes.memory - half, "n"))
    after, small_peak = memory(pid), memory(pid, "VmHWM")
    deliver_bulk(bench.sink, addresses(bench.sizes.large, "big"), email(text_of(MB)))
    large_peak = memory(pid, "VmHWM")
    bench.stop_workers()
    where = bench.ran_on(1)
    growth = Line(6, f"worker RSS growth, {bench.sizes.memory:,} dispatches", where,
                  Stat.of([(after - before) / MB]), "MB",
                  note=f"pool process {before / MB:.0f} -> {after / MB:.0f} MB")  # fmt: skip
    large = Line(6, f"  peak RSS, {bench.sizes.large:,} recipients of 1 MB", where,
                 Stat.of([large_peak / MB]), "MB",
                 note=f"{large_peak / small_peak:.2f}x the peak with 1 KB messages")  # fmt: skip
    return [growth.aim("< 20 MB", after - before < 20 * MB), large]


def row_xmpp(bench: Bench) -> list[Line]:
    """Row 7 (no database: runs once)."""
    from bench.xmpp_session import compare

    n = bench.sizes.xmpp
    rounds = compare(n, 1, bench.sizes.rounds)
    ratio = Stat.of(warm / per_login for warm, per_login in rounds)
    where = "prosody, no database"
    return [
        Line(7, f"xmpp: {n} messages, warm session", where, Stat.of(w for w, _ in rounds), "msg/s"),
        Line(7, "  a login per batch of one", where, Stat.of(p for _, p in rounds), "msg/s"),
        Line(7, "  warm / login per batch", where, ratio, "x").aim(">= 10x", ratio.median >= 10),
    ]


ROWS: dict[int, Callable[[Bench], list[Line]]] = {
    1: row_bulk,
    2: row_singles,
    3: row_latency,
    4: row_scheduling,
    5: row_scale,
    6: row_memory,
    7: row_xmpp,
}
#: The order rows run in: the scheduling cost without workers first, then rows that can keep
#: the 2-process worker of row 1 running, then the rows that need a fresh one or none.
RUN_ORDER = [4, 1, 2, 3, 5, 6, 7]


def prepare_services(config: Config) -> str:
    """The database URL of this process's run: a fresh SQLite file, or PostgreSQL's bench
    database dropped and created; for RabbitMQ, its vhost made if missing."""
    if config.broker == "rabbitmq":
        vhost = urlsplit(AMQP_URL).path.lstrip("/") or "/"
        listed = subprocess.run(
            ["rabbitmqctl", "-q", "list_vhosts"], capture_output=True, text=True, check=True
        )
        if vhost not in listed.stdout.split():
            subprocess.run(["rabbitmqctl", "add_vhost", vhost], check=True, capture_output=True)
            subprocess.run(
                ["rabbitmqctl", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
                check=True,
                capture_output=True,
            )
    if config.db == "sqlite":
        return f"sqlite:///{config.run_dir / 'db.sqlite3'}"
    return fresh_postgres(PG_URL, "BENCH_PG_URL")


def failed(row: int, what: str, bench: Bench, exc: Exception) -> Line:
    traceback.print_exc()
    return Line(row, what, bench.ran_on(), error=f"{type(exc).__name__}: {exc}")


def run_config(config: Config, out: Any) -> None:
    """The body of one database-and-broker process: sends each row's lines to ``out``, then
    None. Stops its workers on the way out, whatever happens (SIGTERM included)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    bench = Bench(config)
    try:
        database_url = prepare_services(config)
        configure_django("config.settings", config.run_dir, database_url, config.broker_url,
                         config.sink.port)  # fmt: skip
        purge_smtp_queues()
    except Exception as exc:
        out.put([failed(0, "setup", bench, exc)])
        out.put(None)
        return
    try:
        for row in [row for row in RUN_ORDER if row in config.rows]:
            progress(f"{bench.ran_on()}: row {row}")
            try:
                out.put(ROWS[row](bench))
            except Exception as exc:
                bench.stop_workers()
                out.put([failed(row, ROWS[row].__name__, bench, exc)])
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let the workers stop
        bench.stop_workers()
        out.put(None)


def run_in_process(config: Config) -> list[Line]:
    """Runs one database-and-broker configuration in a fresh process and collects its lines."""
    out = SPAWN.Queue()
    process = SPAWN.Process(target=run_config, args=(config, out), name=f"bench-{config.db}")
    process.start()
    lines: list[Line] = []
    try:
        while True:
            try:
                item = out.get(timeout=1)
            except queue.Empty:
                if not process.is_alive():
                    where = f"{config.db}, {config.broker}"
                    lines.append(Line(0, "process", where, error=f"exited with {process.exitcode}"))
                    break
                continue
            if item is None:
                break
            lines += item
    except BaseException:
        process.terminate()  # its SIGTERM handler stops its workers
        raise
    finally:
        process.join(60)
        if process.is_alive():
            process.kill()
            process.join()
    return lines


def measure_baseline(sink: Sink, sizes: Sizes) -> tuple[list[Line], float, float]:
    """Row 0: the baseline's lines, its rate and the sink's ceiling."""
    n, rounds = sizes.bulk, range(sizes.rounds)
    baseline = Stat.of(smtp_rate(sink, 1, n) for _ in rounds)
    pipelined = Stat.of(smtp_rate(sink, 1, n, pipelined=True) for _ in rounds)
    parallel = {c: Stat.of(smtp_rate(sink, c, n, pipelined=True) for _ in rounds) for c in (2, 4)}
    ceiling = max(stat.median for stat in parallel.values())
    lines = [
        Line(0, f"baseline: smtplib, 1 connection, {n:,}", "pre-built messages", baseline,
             "msg/s", 1.0),
        # For reference: the workers pipeline when the server offers it, as the sink does.
        Line(0, "  the same with PIPELINING", "pre-built messages", pipelined, "msg/s",
             pipelined.median / baseline.median),
    ]  # fmt: skip
    lines += [
        Line(
            0,
            f"sink ceiling: {c} connections",
            "pipelining, a process each",
            stat,
            "msg/s",
            stat.median / baseline.median,
        )
        for c, stat in parallel.items()
    ]
    return lines, baseline.median, ceiling


def configs(
    args: argparse.Namespace,
    sizes: Sizes,
    sink: Sink,
    baseline: float,
    ceiling: float,
    run_dir: Path,
) -> list[Config]:
    """One configuration per database and broker, each with the requested rows it runs: the
    throughput rows on both brokers, the rest on Redis, the XMPP row once."""
    result = []
    databases = ["sqlite", "postgres"] if args.db == "both" else [args.db]
    for db in databases:
        for broker in ("redis", "rabbitmq"):
            rows = [r for r in args.only if broker == "redis" or r in THROUGHPUT_ROWS]
            if db != databases[0]:
                rows = [r for r in rows if r != 7]
            if rows:
                result.append(
                    Config(
                        db, broker, rows, sizes, sink, baseline, ceiling, run_dir / f"{db}-{broker}"
                    )
                )
    return result


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def header() -> str:
    """The exact command, the machine, the commit and the services, for the record."""
    command = shlex.join(
        [os.path.relpath(sys.executable), os.path.relpath(sys.argv[0]), *sys.argv[1:]]
    )
    cpu = next(
        (line.split(":")[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")), "",
    )  # fmt: skip
    gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = os.getloadavg()[0]  # other work on the machine shows in the figures
    commit = git("rev-parse", "--short", "HEAD") or "? (not a git checkout)"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += " + uncommitted changes"
    now, python = datetime.datetime.now(datetime.UTC), platform.python_version()
    return (
        f"command: {command}\n"
        f"machine: {os.cpu_count()} cores ({cpu}), {gib:.0f} GiB, load {load:.1f}; Python {python}\n"
        f"commit:  {commit}; {now:%Y-%m-%d %H:%M} UTC\n"
        f"brokers: Redis {REDIS_URL}, RabbitMQ {AMQP_URL} (rows 1 and 2); PostgreSQL {PG_URL}"
    )


COLUMNS = [
    "row",
    "measure",
    "ran on",
    "median",
    "min",
    "max",
    "unit",
    "x base",
    "target",
    "",
    "note",
]
RIGHT_ALIGNED = {"row", "median", "min", "max", "x base"}


def cells(line: Line) -> list[str]:
    def number(value: float) -> str:
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"

    if line.error:
        return [str(line.row), line.what, line.ran_on, *[""] * 6, "ERROR", line.error]
    figures = [number(value) for value in (line.median, line.stat.low, line.stat.high)]
    ratio = "" if line.ratio is None else f"{line.ratio:.2f}"
    return [str(line.row), line.what, line.ran_on, *figures, line.unit, ratio, line.target,
            verdict(line.ok), line.note]  # fmt: skip


def table(lines: list[Line]) -> str:
    """The lines as aligned text, by row."""
    rows = [COLUMNS, *(cells(line) for line in sorted(lines, key=lambda line: line.row))]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(
            cell.rjust(width) if name in RIGHT_ALIGNED else cell.ljust(width)
            for name, cell, width in zip(COLUMNS, row, widths, strict=True)
        ).rstrip()
        for row in rows
    )


def progress(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller N, one round")
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument(
        "--only",
        type=lambda text: sorted({int(r) for r in text.split(",")} & set(ALL_ROWS)),
        default=list(ALL_ROWS),
        help="rows to run, e.g. 1,3 (the baseline always runs)",
    )
    return parser.parse_args()


def main() -> int:
    args = parse()
    sizes = QUICK if args.quick else FULL
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print(header(), flush=True)
    run_dir = VAR_ROOT / f"run-{time.strftime('%Y%m%d-%H%M%S')}"
    started = time.monotonic()
    with Sink().running() as sink:
        progress("row 0: baseline and the sink's ceiling")
        lines, baseline, ceiling = measure_baseline(sink, sizes)
        for config in configs(args, sizes, sink, baseline, ceiling, run_dir):
            lines += run_in_process(config)
    minutes = (time.monotonic() - started) / 60
    logs = os.path.relpath(run_dir)
    print(f"rounds: {sizes.rounds} per figure; {minutes:.1f} min; logs in {logs}\n")
    print(table(lines))
    return 1 if any(line.error for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
