"""bench.redis_primitives on a real redis-server: every primitive measured, and its fleet_sim inputs are
costs bench.fleet_sim knows."""

from __future__ import annotations

from bench.fleet_sim import Costs
from bench.redis_primitives import fleet_sim_inputs, run


def test_primitives_are_measured_and_feed_the_fleet_sim() -> None:
    measured = run(calls=30, idle_s=0.2)
    primitives = measured["primitives"]
    assert measured["redis_version"]
    for name in (
        "heartbeat_zadd",
        "zrangebyscore_1000_stale_0",
        "zrangebyscore_10000_stale_100",
        "position_two_gets",
        "lease_set_nx_px_lost",
        "lease_set_nx_px_won",
        "lease_pass_script_non_holder",
        "lease_pass_script_holder_10000",
    ):
        assert primitives[name]["calls"] == 30
        assert primitives[name]["cpu_us_per_call"] >= 0, name
    # Handler time is counted in whole microseconds per call: cheap commands may round to 0; the pass
    # that reads 100 stale members never does.
    assert primitives["zrangebyscore_10000_stale_100"]["command_usec_per_call"] > 0
    # A ZSET member (job key + score) costs bytes, not kilobytes.
    assert 50 < primitives["zset_bytes_per_member"] < 500
    # Recovering a lost job (read + lifecycle requeue) is measured with the shipped lifecycle.
    assert primitives["lost_job_requeue"]["requeued"] == primitives["lost_job_requeue"]["lost"] == 100
    assert primitives["lost_job_requeue"]["cpu_us_per_call"] > 0
    inputs = fleet_sim_inputs(primitives)
    assert "redis_us_per_lost_job" in inputs
    costs = Costs()
    costs.apply(inputs, "test")
    assert all(costs.origin(name) == "test" for name in inputs)
