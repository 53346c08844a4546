"""Where ``DARKROOM_REDIS_URL`` points: one Redis, or a primary that Redis Sentinel names.

Why a URL form of our own: redis-py parses ``redis://``, ``rediss://`` and ``unix://`` URLs but has no URL
for a Sentinel topology (``redis.sentinel.Sentinel`` takes a list of addresses), and every darkroom process
is configured by one ``DARKROOM_REDIS_URL``. We accept the convention Prefect, RedisVL and the
``Redis-Sentinel-Url`` package share, so an operator's existing URL works as is::

    redis+sentinel://[user:pass@]host1[:port][,host2[:port]...]/service_name[/db][?options]
    rediss+sentinel://...      (TLS to the data nodes and to the Sentinels)

- Sentinel addresses default to port 26379; ``service_name`` is Sentinel's name of the primary
  (``sentinel monitor <name> ...``, ``mymaster`` in the Bitnami chart).
- ``user:pass@`` authenticates to the **Redis nodes** (``requirepass``/ACL), as in a ``redis://`` URL.
- ``?sentinel_password=...`` (and ``sentinel_username``) authenticate to the **Sentinels**, when they have
  a password of their own (``requirepass`` in sentinel.conf); without them, Sentinels are asked
  unauthenticated.
- Any other option is refused: a misspelt option silently ignored would be worse than an error at start-up.

Clients built from it ask a Sentinel for the primary's address at every new connection, drop pooled
connections when the address changes, and turn a demoted primary's ``READONLY`` into a ``ConnectionError``
(redis-py's ``SentinelManagedConnection``), so a failover looks to our code like a Redis restart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

#: Scheme -> whether the data nodes and Sentinels are reached over TLS.
SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}
DEFAULT_SENTINEL_PORT = 26379
_SENTINEL_OPTIONS = ("sentinel_username", "sentinel_password")


@dataclass(frozen=True)
class SentinelTarget:
    """A parsed ``redis+sentinel://`` URL."""

    sentinels: tuple[tuple[str, int], ...]
    service_name: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    ssl: bool = False

    def node_kwargs(self) -> dict[str, Any]:
        """Connection arguments for the primary (redis-py ``Sentinel(**connection_kwargs)``)."""
        kwargs: dict[str, Any] = {"db": self.db}
        if self.username is not None:
            kwargs["username"] = self.username
        if self.password is not None:
            kwargs["password"] = self.password
        if self.ssl:
            kwargs["ssl"] = True
        return kwargs

    def sentinel_kwargs(self, *, connect_timeout: float, socket_timeout: float) -> dict[str, Any]:
        """Connection arguments for the Sentinels themselves: short timeouts, so a dead Sentinel costs one
        connect timeout before the next one is asked, never a hang."""
        kwargs: dict[str, Any] = {
            "socket_connect_timeout": connect_timeout,
            "socket_timeout": socket_timeout,
        }
        if self.sentinel_username is not None:
            kwargs["username"] = self.sentinel_username
        if self.sentinel_password is not None:
            kwargs["password"] = self.sentinel_password
        if self.ssl:
            kwargs["ssl"] = True
        return kwargs


def is_sentinel_url(url: str) -> bool:
    """Whether ``url`` names a Sentinel-managed primary (by its scheme only)."""
    return url.split("://", 1)[0].lower() in SENTINEL_SCHEMES


def parse_sentinel_url(url: str) -> SentinelTarget:
    """Parse a ``redis+sentinel://`` URL; ``ValueError`` saying what is wrong with it otherwise.

    The error never repeats the URL (it may hold a password)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in SENTINEL_SCHEMES:
        raise ValueError(f"not a Sentinel URL: the scheme must be one of {', '.join(SENTINEL_SCHEMES)}")
    # The host list is split by hand: urlsplit refuses "h1:1,h2:2" as a port.
    authority, slash, path_and_query = rest.partition("/")
    userinfo, at, hosts = authority.rpartition("@")
    if not at:
        userinfo, hosts = "", authority
    parts = urlsplit("x://h/" + path_and_query if slash else "x://h")
    sentinels = tuple(_address(entry) for entry in hosts.split(","))
    segments = [unquote(segment) for segment in parts.path.split("/") if segment]
    if not segments:
        raise ValueError("a Sentinel URL names its primary after the hosts: .../service_name[/db]")
    if len(segments) > 2:
        raise ValueError("a Sentinel URL's path is /service_name[/db]; it has more segments")
    db = 0
    if len(segments) == 2:
        if not segments[1].isdigit():
            raise ValueError("a Sentinel URL's database (after the service name) must be a number")
        db = int(segments[1])
    options = _options(parts.query)
    username, _, password = userinfo.partition(":") if userinfo else ("", "", "")
    return SentinelTarget(
        sentinels=sentinels,
        service_name=segments[0],
        db=db,
        username=unquote(username) or None,
        password=unquote(password) if password else None,
        sentinel_username=options.get("sentinel_username"),
        sentinel_password=options.get("sentinel_password"),
        ssl=SENTINEL_SCHEMES[scheme.lower()],
    )


def _address(entry: str) -> tuple[str, int]:
    """``host[:port]`` (``[v6]:port`` too) -> (host, port)."""
    entry = entry.strip()
    if not entry:
        raise ValueError("a Sentinel URL lists at least one Sentinel, comma separated, with no empty entry")
    if entry.startswith("["):
        host, bracket, tail = entry[1:].partition("]")
        if not bracket or (tail and not tail.startswith(":")):
            raise ValueError("a Sentinel address in brackets is [ipv6]:port")
        port_text = tail[1:]
    else:
        host, _, port_text = entry.partition(":")
    if not host:
        raise ValueError("a Sentinel address has no host")
    if not port_text:
        return host, DEFAULT_SENTINEL_PORT
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError("a Sentinel port must be a number between 1 and 65535")
    return host, int(port_text)


def _options(query: str) -> dict[str, str]:
    values = parse_qs(query, keep_blank_values=True, strict_parsing=False)
    unknown = sorted(set(values) - set(_SENTINEL_OPTIONS))
    if unknown:
        raise ValueError(
            f"unknown Sentinel URL option(s) {', '.join(unknown)}; known: {', '.join(_SENTINEL_OPTIONS)}"
        )
    return {name: found[-1] for name, found in values.items()}
