"""The product's settings with Django 5.2's PostgreSQL connection pool (``psycopg_pool``), as measured
before ``DB_POOL_MAX_SIZE`` existed (``--targets product-pool``; ``product-pool20`` uses the setting)."""

from project.settings import *  # noqa: F403
from project.settings import DATABASES

DATABASES["default"]["CONN_MAX_AGE"] = 0  # the pool replaces persistent connections
DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {"min_size": 2, "max_size": 20}
