"""
Real services for tests. Outside CI a missing service skips the test; with
CI=true it fails, so a broken CI machine cannot pass silently.
"""

from __future__ import annotations

import os
import socket

from twisted.trial.unittest import SkipTest

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
POSTGRES_DSN = os.environ.get(
    "LLMPROXY_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
MYSQL_DSN = os.environ.get("LLMPROXY_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require(name: str, host: str, port: int) -> None:
    if _reachable(host, port):
        return
    message = f"{name} is not reachable on {host}:{port}"
    if in_ci():
        raise AssertionError(message + " (CI=true: failing instead of skipping)")
    raise SkipTest(message)


def require_redis() -> None:
    require("Redis", REDIS_HOST, REDIS_PORT)


def require_postgres() -> None:
    require("PostgreSQL", "127.0.0.1", 5432)


def require_mysql() -> None:
    require("MariaDB/MySQL", "127.0.0.1", 3306)
