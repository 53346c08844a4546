"""``redis+sentinel://`` URLs: what they name, and the mistakes that must stop start-up."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.redis_connect import SentinelTarget, is_sentinel_url, parse_sentinel_url
from services.settings import Settings


def test_a_full_url_names_sentinels_service_db_and_both_passwords() -> None:
    url = (
        "redis+sentinel://app:s%40cret@redis-node-0.redis-headless:26379,10.0.0.7:5000,[::1]"
        "/mymaster/2?sentinel_password=sp&sentinel_username=sentinel-user"
    )
    assert parse_sentinel_url(url) == SentinelTarget(
        sentinels=(("redis-node-0.redis-headless", 26379), ("10.0.0.7", 5000), ("::1", 26379)),
        service_name="mymaster",
        db=2,
        username="app",
        password="s@cret",
        sentinel_username="sentinel-user",
        sentinel_password="sp",
    )


def test_defaults_port_db_and_no_auth() -> None:
    target = parse_sentinel_url("redis+sentinel://sentinel/mymaster")
    assert target.sentinels == (("sentinel", 26379),) and target.db == 0
    assert target.username is None and target.password is None and target.sentinel_password is None
    assert target.node_kwargs() == {"db": 0}
    assert target.sentinel_kwargs(connect_timeout=2, socket_timeout=5) == {
        "socket_connect_timeout": 2,
        "socket_timeout": 5,
    }


def test_a_password_alone_authenticates_to_the_nodes_and_tls_reaches_both() -> None:
    target = parse_sentinel_url("rediss+sentinel://:pw@s1:26379,s2:26379/mymaster/0?sentinel_password=x")
    assert target.node_kwargs() == {"db": 0, "password": "pw", "ssl": True}
    assert target.sentinel_kwargs(connect_timeout=1, socket_timeout=1) == {
        "socket_connect_timeout": 1,
        "socket_timeout": 1,
        "password": "x",
        "ssl": True,
    }


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+sentinel://s1:26379", "service_name"),
        ("redis+sentinel://s1:26379/", "service_name"),
        ("redis+sentinel://s1:26379/mymaster/zero", "must be a number"),
        ("redis+sentinel://s1:26379/mymaster/0/extra", "more segments"),
        ("redis+sentinel://s1:99999/mymaster", "between 1 and 65535"),
        ("redis+sentinel://s1:port/mymaster", "between 1 and 65535"),
        ("redis+sentinel://s1,,s2/mymaster", "no empty entry"),
        ("redis+sentinel://:26379/mymaster", "no host"),
        ("redis+sentinel://[::1/mymaster", "[ipv6]:port"),
        ("redis+sentinel://s1/mymaster?master_name=x", "unknown Sentinel URL option(s) master_name"),
        ("redis://s1:6379/0", "not a Sentinel URL"),
    ],
)
def test_malformed_urls_say_what_is_wrong(url: str, says: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_sentinel_url(url)
    assert says in str(caught.value)


def test_the_error_never_shows_the_password() -> None:
    with pytest.raises(ValueError) as caught:
        parse_sentinel_url("redis+sentinel://app:hunter2@s1/mymaster/x")
    assert "hunter2" not in str(caught.value)


def test_only_the_scheme_decides_whether_a_url_is_sentinel() -> None:
    assert is_sentinel_url("redis+sentinel://s/m") and is_sentinel_url("REDISS+SENTINEL://s/m")
    assert not is_sentinel_url("redis://h:6379/0") and not is_sentinel_url("unix:///tmp/r.sock")


def test_settings_refuse_a_malformed_sentinel_url_at_start_up() -> None:
    with pytest.raises(ValidationError, match="service_name"):
        Settings(redis_url="redis+sentinel://s1:26379")
    assert Settings(redis_url="redis+sentinel://s1:26379/mymaster").redis_url.endswith("/mymaster")
