"""Where the CPU of a bulk delivery goes, per process kind: one call to N recipients delivered
by a real worker with PROCS pool processes, and the CPU seconds each process on the machine
used meanwhile (from /proc), per e-mail. Shows whether a row of the suite is CPU-bound and
whose CPU it is (pool processes, the worker's main process, the sink, PostgreSQL, Redis).

    .venv/bin/python bench/cpushare.py [--db sqlite|postgres] [--procs 2] [N]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    REDIS_URL,
    VAR_ROOT,
    Sink,
    addresses,
    configure_django,
    deliver_bulk,
    email,
    script_database,
    start_worker,
)

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_by_process() -> dict[int, tuple[float, str]]:
    """CPU seconds (user + system) and command line of every process."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            command = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        name = command or stat.split("(", 1)[1].split(")", 1)[0]
        found[int(pid)] = ((int(fields[11]) + int(fields[12])) / TICKS, name)
    return found


def kind(pid: int, command: str, pool: list[int], main: int) -> str:
    if pid in pool:
        return "pool processes"
    if pid == main:
        return "worker main process"
    if pid == os.getpid():
        return "this process (scheduling)"
    for name in ("postgres", "redis", "bench-sink", "multiprocessing"):
        if name in command:
            return {"multiprocessing": "sink"}.get(name, name)
    return command[:40]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=["sqlite", "postgres"], default="postgres")
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("n", type=int, nargs="?", default=5000)
    args = parser.parse_args()
    with Sink().running() as sink:
        var = VAR_ROOT / "cpushare"
        url = script_database(args.db, var, "cpushare")
        configure_django("config.settings", var, url, REDIS_URL, sink.port)
        worker = start_worker(sink, args.procs, var / "worker.log")
        try:
            for round_ in range(2):
                before = cpu_by_process()
                seconds = deliver_bulk(sink, addresses(args.n, f"r{round_}-"), email())
                after = cpu_by_process()
                pool = worker.pool()
                shares: dict[str, float] = {}
                for pid, (cpu, command) in after.items():
                    used = cpu - before.get(pid, (0.0, ""))[0]
                    if used > 0.01:
                        name = kind(pid, command, pool, worker.process.pid)
                        shares[name] = shares.get(name, 0.0) + used
                total = sum(shares.values())
                print(
                    f"{args.db}, {args.procs} procs, round {round_ + 1}: {args.n / seconds:,.0f} "
                    f"msg/s; CPU per e-mail {1000 * total / args.n:.3f} ms "
                    f"({total / seconds:.2f} cores busy):"
                )
                for name, used in sorted(shares.items(), key=lambda item: -item[1]):
                    print(f"  {name:30} {1000 * used / args.n:.3f} ms")
        finally:
            worker.stop()


if __name__ == "__main__":
    main()
