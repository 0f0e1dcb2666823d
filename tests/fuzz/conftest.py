"""Hypothesis profiles for the fuzzers (tests/fuzz).

``HYPOTHESIS_PROFILE`` picks one: ``ci`` (the default when ``CI=true``: 200 examples),
``dev`` (the default elsewhere: 50, so ``make test`` stays quick) or ``thorough`` (2,000, by hand).
No deadline: an example opens WebSocket connections and writes to the database.
"""

import os

from hypothesis import HealthCheck, settings

from ..conftest import CI

# The WebSocket fuzzer keeps one connection across examples (a function-scoped fixture, on purpose).
_COMMON = {"deadline": None, "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]}
settings.register_profile("ci", max_examples=200, print_blob=True, **_COMMON)
settings.register_profile("dev", max_examples=50, **_COMMON)
settings.register_profile("thorough", max_examples=2000, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if CI else "dev"))
