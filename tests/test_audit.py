"""bin/audit-dependencies: fails on a known vulnerability, and says so when it could not audit.

A fake pip-audit stands in for the real one (which needs PyPI's vulnerability data).
"""

import json
import os
import subprocess
import sys

import pytest

from .server import BASE_DIR

SCRIPT = BASE_DIR / "bin" / "audit-dependencies"
DJANGO = {"name": "django", "version": "5.2.19"}


@pytest.fixture
def audit(tmp_path):
    def run(report: dict | None, *, exit_code: int = 0, **env: str) -> subprocess.CompletedProcess:
        fake = tmp_path / "pip-audit"
        write = "" if report is None else (
            f"out = sys.argv[sys.argv.index('--output') + 1]\nopen(out, 'w').write({json.dumps(report)!r})\n"
        )
        fake.write_text(f"#!{sys.executable}\nimport sys\n{write}print('boom', file=sys.stderr)\n"
                        f"sys.exit({exit_code})\n")
        fake.chmod(0o755)
        return subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PIP_AUDIT": str(fake), **env})

    return run


def test_a_known_vulnerability_fails(audit):
    vuln = {"id": "PYSEC-2099-1", "fix_versions": ["5.2.20"], "aliases": [], "description": "x"}
    result = audit({"dependencies": [{**DJANGO, "vulns": [vuln]}, {"name": "redis", "version": "8.1.0", "vulns": []}],
                    "fixes": []}, exit_code=1)
    assert result.returncode == 1
    assert "django 5.2.19: PYSEC-2099-1 (fixed in 5.2.20)" in result.stdout


def test_no_known_vulnerability_passes(audit):
    result = audit({"dependencies": [{**DJANGO, "vulns": []}], "fixes": []})
    assert result.returncode == 0
    assert result.stdout.strip() == "pip-audit: no known vulnerabilities in 1 packages (0 skipped)."


@pytest.mark.parametrize("report", [None, {"dependencies": [{"name": "django", "skip_reason": "not found"}]}],
                         ids=["service-unreachable", "nothing-known"])
def test_an_audit_that_could_not_run_says_so_and_fails_only_when_required(audit, report):
    result = audit(report, exit_code=1 if report is None else 0)
    assert result.returncode == 0
    assert "NOT AUDITED" in result.stderr
    assert audit(report, exit_code=1 if report is None else 0, AUDIT_REQUIRED="1").returncode == 2
