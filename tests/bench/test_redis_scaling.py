"""The scratch-Redis scaling benchmark at tiny scale: it runs, and the costs it reports are flat.

Only command *counts* are checked (they are exact); times from a busy test machine mean nothing.
"""

from __future__ import annotations

from bench import redis_scaling


def test_recovery_and_position_costs_do_not_grow_with_the_fleet_or_the_queue() -> None:
    results = redis_scaling.run(fleets=[20, 200], depths=[1, 500], reads=5)
    small, large = results["recovery_pass"]
    assert small["lease_holder_pass"]["by_command"] == large["lease_holder_pass"]["by_command"]
    assert small["lease_holder_pass"]["by_command"]["hgetall"] == 1  # the lost job's record, no other
    assert large["other_worker_pass"]["commands"] == small["other_worker_pass"]["commands"] <= 2
    shallow, deep = results["queue_position"]
    reads = [
        place["now_hmget"]["commands_per_read"]
        for depth in (shallow, deep)
        for place in depth["by_position"].values()
    ]
    assert reads == [1.0, 1.0, 1.0]
    assert deep["by_position"]["500"]["before_lpos"]["commands_per_read"] == 1.0
