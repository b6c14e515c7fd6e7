"""Engines a test made, shut down when it ends (conftest's autouse fixture):
shutdown stops the connectors' store threads, which would otherwise keep
every pool alive for the rest of the session."""
from __future__ import annotations

made: list = []


def track(engine):
    made.append(engine)
    return engine


def shutdown_all() -> None:
    while made:
        made.pop().shutdown()
