"""The fuzzers' figures, printed (``pytest -s``) and kept in ``bench/results/fuzz-latest.json``."""

import json
from datetime import UTC, datetime
from pathlib import Path

from django.db import connection
from hypothesis import settings

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results" / "fuzz-latest.json"


def record(section: str, figures: dict) -> None:
    """Print ``figures`` and store them under ``section`` (the other fuzzer's section is kept)."""
    figures = {
        **figures,
        "hypothesis_profile": settings.get_current_profile_name(),
        "max_examples": settings().max_examples,
        "database": connection.vendor,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    print(f"\n{section} fuzzing: {json.dumps(figures, indent=1, sort_keys=True)}")
    try:
        stored = json.loads(RESULTS.read_text())
    except (OSError, ValueError):
        stored = {}
    stored[section] = figures
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(stored, indent=2, sort_keys=True) + "\n")
