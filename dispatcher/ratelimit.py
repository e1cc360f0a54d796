"""A delivery rate shared by every worker process of a messenger, on every host.

Celery's own ``rate_limit`` counts per worker process, so N processes would send N times a
provider's quota. This limiter keeps one schedule per messenger in Redis (GCRA: the "theoretical
arrival time" of the next allowed send) and takes a slot atomically in a Lua script that reads
the Redis server's clock, so workers on hosts with skewed clocks still agree.

Slots are spaced evenly (no burst): ``20/s`` means one send every 50 ms across all workers, so
no one-second window ever sees more than 20 (21 when a window's edges both fall on a send).
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis

from messengers.base import MessengerBase, alias_of, seconds_per_send
from workers import broker

from . import conf

# KEYS[1]: the messenger's schedule; ARGV[1]: microseconds between two sends.
# Returns 0 when a slot was taken, else the microseconds until the next free slot.
_TAKE_SLOT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local interval = tonumber(ARGV[1])
local next_free = tonumber(redis.call('GET', KEYS[1]) or '0')
if next_free > now then
  return next_free - now
end
redis.call('SET', KEYS[1], string.format('%d', now + interval), 'PX', math.ceil(interval / 1000) + 1000)
return 0
"""

_clients: dict[tuple[int, str], redis.Redis] = {}


#: Where the slots live when no Redis URL is configured and the broker is not Redis.
LOCAL_REDIS = "redis://127.0.0.1:6379/0"


def redis_url() -> str:
    """SITEMESSAGE_RATE_LIMIT_REDIS_URL, else the broker when it is Redis, else local Redis."""
    configured = conf.RATE_LIMIT_REDIS_URL.get()
    if configured:
        return configured
    url = broker.broker_url()
    return url if url.startswith(conf.REDIS_SCHEMES) else LOCAL_REDIS


def _client(url: str) -> redis.Redis:
    key = (os.getpid(), url)  # connections must not cross a fork
    if key not in _clients:
        _clients[key] = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    return _clients[key]


class RateLimiter:
    """Slots for one run of deliveries that may wait for them up to ``max_wait`` seconds."""

    def __init__(self, alias: str, rate: str, max_wait: float, url: str | None = None) -> None:
        self.key = f"sitemessage:rate:{alias}"
        self.deadline = time.monotonic() + max_wait
        self.interval_us = max(1, round(seconds_per_send(rate) * 1_000_000))
        self._script: Any = _client(url or redis_url()).register_script(_TAKE_SLOT)

    @classmethod
    def of(cls, messenger: MessengerBase, max_wait: float) -> RateLimiter | None:
        rate = messenger.rate_limit
        return cls(alias_of(messenger), rate, float(max_wait)) if rate else None

    def acquire(self) -> float:
        """Waits for and takes a slot; returns 0. When the next free slot lies past the
        deadline, takes none and returns the seconds until that slot."""
        while True:
            wait = int(self._script(keys=[self.key], args=[self.interval_us])) / 1_000_000
            if wait <= 0:
                return 0.0
            if time.monotonic() + wait > self.deadline:
                return wait
            time.sleep(wait)
