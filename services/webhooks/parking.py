"""Where webhook attempts wait for a busy share: a list per share in Redis, released as slots come free.

An attempt whose receiver's host (or API key) has no free slot in this process (``services.webhooks.hosts``)
used to go back on the RQ queue a little later, again and again: each time an RQ task that found the share
still busy and put itself back. A hanging receiver's backlog therefore cost CPU in proportion to its size
— one task per waiting event per attempt deadline, several cores for 10,000 events — and a tenant could buy
the webhook fleet's CPU with one URL that never answers. Parked instead, a waiting attempt is one list
entry that costs nothing until a slot of its share comes free.

Keys: ``darkroom:webhooks:parked:{scope}:{name}`` (a list of attempts, oldest first) per share, and the index
``darkroom:webhooks:parked`` (a sorted set of those shares, scored by when the list was started). A park adds
to both in one transaction; the script that trims a list removes its share from the index when it empties
it, so no list is ever left unindexed.

Release: every webhook process runs :class:`Releaser` (a side thread): once a second it takes, from each
parked share, as many attempts as that process has free slots of that share, and puts them on the webhook
queue at once. Whichever process runs one takes its share or parks it again (at the back). So the work
per second is bounded by the parked shares and their free slots, not by how many attempts wait; and a
share whose process died is released by the others. Nothing taken is lost: under a short per-share lock,
a release reads the head of the list, puts those attempts on the queue, and only then trims them off; a
process that dies in between leaves them parked, to be put on the queue again (the attempt is skipped if
it was made meanwhile; if not, the receiver may get it twice, with the same ``webhook-id``).
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from dataclasses import asdict, dataclass
from datetime import timedelta

import redis
import structlog
from rq import Queue

from services.clients import REDIS_UNAVAILABLE
from services.webhooks.hosts import HostLimiter
from services.webhooks.scheduling import enqueue_attempt

log = structlog.get_logger(__name__)

PARKED_INDEX = "darkroom:webhooks:parked"
_PARKED_PREFIX = "darkroom:webhooks:parked:"
#: How often a process looks for parked attempts it has room for.
RELEASE_INTERVAL_S = 1.0
#: Parked shares looked at per pass, oldest first.
SHARES_PER_PASS = 500

#: How long one process may hold a share's release lock (a pass takes milliseconds).
_LOCK_MS = 10_000

# Drop the ARGV[1] entries a release has put on the queue from the head of the list; drop the share from
# the index when its list is empty.
_TRIM = """
redis.call('LTRIM', KEYS[1], tonumber(ARGV[1]), -1)
if redis.call('LLEN', KEYS[1]) == 0 then redis.call('ZREM', KEYS[2], ARGV[2]) end
return 1
"""
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(frozen=True)
class ParkedAttempt:
    """What puts an attempt back on the queue: the RQ task and its arguments."""

    task: str
    subject_id: str
    msg_id: str
    attempt: int
    waited: int


def share_member(scope: str, name: str) -> str:
    """The index member of a share: ``host:hooks.example.com:443``, ``key:<owner>``."""
    return f"{scope}:{name}"


def parked_key(member: str) -> str:
    return _PARKED_PREFIX + member


def park(client: redis.Redis, scope: str, name: str, attempt: ParkedAttempt) -> None:
    """Park ``attempt`` behind the busy share ``scope``/``name`` (one transaction)."""
    member = share_member(scope, name)
    with client.pipeline(transaction=True) as pipe:
        pipe.rpush(parked_key(member), json.dumps(asdict(attempt), separators=(",", ":")))
        pipe.zadd(PARKED_INDEX, {member: time.time()}, nx=True)
        pipe.execute()


def parked_count(client: redis.Redis, scope: str, name: str) -> int:
    """Attempts parked behind one share (for operators and tests)."""
    return int(client.llen(parked_key(share_member(scope, name))))


class Releaser:
    """Puts parked attempts back on the webhook queue as this process has room for them."""

    def __init__(
        self,
        client: redis.Redis,
        queue: Queue,
        limiters: dict[str, HostLimiter],
        *,
        task_timeout: timedelta,
        interval_s: float = RELEASE_INTERVAL_S,
    ) -> None:
        self.redis = client
        self.queue = queue
        self.limiters = limiters  # by scope: "host", "key"
        self.task_timeout = task_timeout
        self.interval_s = interval_s
        self._trim = client.register_script(_TRIM)
        self._unlock = client.register_script(_UNLOCK)
        self._token = secrets.token_hex(8)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> int:
        """One pass over the parked shares; how many attempts went back on the queue."""
        released = 0
        for raw in self.redis.zrange(PARKED_INDEX, 0, SHARES_PER_PASS - 1):
            member = raw.decode() if isinstance(raw, bytes) else str(raw)
            scope, _, name = member.partition(":")
            limiter = self.limiters.get(scope)
            room = 1 if limiter is None else limiter.per_host - limiter.in_flight(name)
            if room > 0:
                released += self._release(member, room)
        return released

    def _release(self, member: str, room: int) -> int:
        lock = f"darkroom:webhooks:parked-lock:{member}"
        if not self.redis.set(lock, self._token, nx=True, px=_LOCK_MS):
            return 0  # another process is releasing this share now
        try:
            key = parked_key(member)
            items = self.redis.lrange(key, 0, room - 1)
            for item in items:
                parked = ParkedAttempt(**json.loads(item))
                enqueue_attempt(
                    self.queue,
                    parked.subject_id,
                    parked.msg_id,
                    parked.attempt,
                    timeout=self.task_timeout,
                    task=parked.task,
                    waited=parked.waited,
                )
            self._trim(keys=[key, PARKED_INDEX], args=[len(items), member])
            return len(items)
        finally:
            self._unlock(keys=[lock], args=[self._token])

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="webhook-releaser", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.run_once()
            except REDIS_UNAVAILABLE as exc:  # the next pass tries again
                log.warning("webhook.release_skipped", error=str(exc))
            except Exception:  # a bug of ours: logged, the attempts stay parked for the next pass
                log.exception("webhook.release_failed")
