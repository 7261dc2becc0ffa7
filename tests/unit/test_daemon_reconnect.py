"""Reconnect policy (pure): exponential backoff, full jitter, cap, URL rotation; and the
runner's URL helpers."""

from __future__ import annotations

import pytest

from daemon.reconnect import Backoff, ReconnectPolicy, backoff_delay
from daemon.runner import gateway_base_url, tunnel_url

B = Backoff(base_s=0.5, cap_s=30.0, multiplier=2.0)


def test_full_jitter_is_uniform_under_an_exponential_ceiling() -> None:
    assert [backoff_delay(n, B, lambda: 0.999999) for n in range(8)] == pytest.approx(
        [0.5, 1, 2, 4, 8, 16, 30, 30], rel=1e-5
    )
    assert backoff_delay(5, B, lambda: 0.0) == 0.0
    assert backoff_delay(3, B, lambda: 0.5) == 2.0


def test_huge_attempts_stay_at_the_cap() -> None:
    assert backoff_delay(10_000, B, lambda: 0.5) == 15.0
    assert backoff_delay(-3, B, lambda: 1.0) == 0.5


def test_urls_rotate_and_failures_grow_the_backoff() -> None:
    policy = ReconnectPolicy(["a", "b", "c"], B, rand=lambda: 1.0)
    assert [policy.next_url() for _ in range(5)] == ["a", "b", "c", "a", "b"]
    assert [policy.failed() for _ in range(4)] == [0.5, 1.0, 2.0, 4.0]
    assert policy.attempt == 4


def test_a_stable_tunnel_resets_the_backoff_a_flapping_one_does_not() -> None:
    policy = ReconnectPolicy(["a"], B, rand=lambda: 1.0, stable_after_s=10)
    for _ in range(4):
        policy.failed()
    assert policy.lost(2.0) == 8.0  # dropped at once: keep backing off
    assert policy.lost(60.0) == 0.5  # was up for a minute: start over
    assert policy.attempt == 1


def test_a_policy_needs_urls() -> None:
    with pytest.raises(ValueError):
        ReconnectPolicy([])


@pytest.mark.parametrize(
    ("given", "ws", "base"),
    [
        ("http://gw:8000", "ws://gw:8000/v1/tunnel", "http://gw:8000"),
        ("https://gw.example/", "wss://gw.example/v1/tunnel", "https://gw.example"),
        (
            "https://gw.example/lattice",
            "wss://gw.example/lattice/v1/tunnel",
            "https://gw.example/lattice",
        ),
        ("wss://gw.example/v1/tunnel", "wss://gw.example/v1/tunnel", "https://gw.example"),
    ],
)
def test_tunnel_urls(given: str, ws: str, base: str) -> None:
    assert tunnel_url(given) == ws
    assert gateway_base_url(given) == base


@pytest.mark.parametrize("bad", ["gw:8000", "ftp://gw", "http://"])
def test_bad_gateway_urls(bad: str) -> None:
    with pytest.raises(ValueError):
        tunnel_url(bad)
