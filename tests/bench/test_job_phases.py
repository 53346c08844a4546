"""``bench.job_phases``: a MONITOR capture of one job split into phases and round trips, by process."""

from __future__ import annotations

from bench.job_phases import breakdown, classify

JOB = "gen_0123456789abcdef0123456789abcdef"
T0 = 1_000.0


def capture() -> tuple[list[tuple[str, str]], list[float], list[int]]:
    """A made-up job: (process, port, seconds after T0, command)."""
    rows = [
        ("api", 1, 0.000, "EVALSHA rl 1 darkroom:ratelimit:k 10 1 1"),
        ("api", 1, 0.001, "EVALSHA adm 9 darkroom:job:" + JOB + " x"),
        ("api", 2, 0.002, f"XREAD BLOCK 5000 COUNT 1 STREAMS darkroom:job:{JOB}:done 0-0"),
        ("worker", 3, 0.010, f"HGETALL rq:job:{JOB}"),
        ("worker", 3, 0.011, f"HSET rq:job:{JOB} status started"),
        ("worker", 3, 0.011001, "HSET rq:worker:w state busy"),  # pipelined with the line above
        (
            "worker",
            3,
            0.012,
            f"EVALSHA t 8 darkroom:job:{JOB} darkroom:job:{JOB}:events darkroom:outbox "
            "darkroom:jobs:running-by-beat",
        ),
        ("worker", 3, 0.020, f"EVALSHA p 3 darkroom:job:{JOB} darkroom:job:{JOB}:events darkroom:outbox"),
        ("worker", 3, 0.030, f"EVALSHA b 2 darkroom:jobs:running-by-beat darkroom:job:{JOB} w"),
        ("webhooks", 4, 0.031, "ZRANGEBYSCORE darkroom:archive:due -inf 1 LIMIT 0 100"),
        (
            "worker",
            3,
            0.040,
            f"EVALSHA t 8 darkroom:job:{JOB} darkroom:job:{JOB}:events darkroom:outbox "
            "darkroom:jobs:running-by-beat",
        ),
        ("worker", 3, 0.041, "MULTI"),
        ("worker", 3, 0.041001, f"DEL rq:job:{JOB}"),
        ("worker", 3, 0.041002, "EXEC"),
        ("api", 1, 0.050, f"HGETALL darkroom:job:{JOB}"),  # after the POST answered: the client's GET
        ("webhooks", 4, 0.060, f"HGETALL darkroom:job:{JOB}"),
        ("webhooks", 4, 0.060001, f"XRANGE darkroom:job:{JOB}:events - +"),
        ("webhooks", 4, 0.070, "MULTI"),
        ("webhooks", 4, 0.070001, f"EXPIRE darkroom:job:{JOB} 300"),
        ("webhooks", 4, 0.070002, f"ZREM darkroom:archive:due job:{JOB}"),
        ("webhooks", 4, 0.070003, "EXEC"),
    ]
    return (
        [(process, line) for process, _, _, line in rows],
        [T0 + at for _, _, at, _ in rows],
        [port for _, port, _, _ in rows],
    )


def test_each_command_lands_in_its_phase_and_pipelines_count_once() -> None:
    commands, times, ports = capture()
    phases = breakdown(classify(commands, times, ports, JOB, post_done_at=T0 + 0.045))
    assert phases["api"]["submit"]["commands"] == 2
    assert phases["api"]["prefer_wait"] == {"commands": 1, "round_trips": 1, "by_command": {"XREAD": 1}}
    assert phases["api"]["get"]["commands"] == 1
    worker = phases["worker"]
    assert worker["claim"]["commands"] == 4 and worker["claim"]["round_trips"] == 3  # HSETs pipelined
    assert worker["steps"]["by_command"] == {"EVALSHA": 1}
    assert worker["heartbeat"]["by_command"] == {"EVALSHA": 1}
    assert worker["finish"] == {
        "commands": 4,
        "round_trips": 2,
        "by_command": {"EVALSHA": 1, "MULTI": 1, "DEL": 1, "EXEC": 1},
    }
    archive = phases["webhooks"]["archive"]
    assert archive["commands"] == 6 and archive["round_trips"] == 2  # snapshot pipeline, trim MULTI
    assert "background" not in phases["webhooks"]  # the archiver's idle pass is left out
    assert phases["total"]["commands"] == 2 + 1 + 1 + 4 + 1 + 1 + 4 + 6
