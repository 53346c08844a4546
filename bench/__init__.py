"""Benchmarks: service overhead and API load on CPU, the GPU harness, and the fleet simulation.

Each module is a command (``python -m bench.service``, ``python -m bench.gpu``, ``python -m bench.fleet_sim``)
that prints its targets as PASS/FAIL lines and writes its raw figures as JSON; BENCHMARKS.md records them.
"""
