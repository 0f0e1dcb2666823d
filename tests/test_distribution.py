"""The app's own distribution (pyproject.toml, ``make dist``): the wheel holds ``notifications/``
with every module, template, static file and migration, and nothing of this project; its metadata
asks for ranges, not pins; installed alone into a new venv, ``importlib.resources`` finds its files.

The wheel is built once, the way ``make dist`` builds it (sdist, then the wheel from the sdist),
from a copy of the repository without ``.git``, ``.venv`` and earlier build output: setuptools'
``build/`` and ``*.egg-info`` never land in the work tree, a stale ``build/lib`` never leaks into
the wheel, and the copy is what the assertions compare with. ``--no-isolation``: the backend is the
venv's setuptools (requirements-dev.txt), so the build needs no network. Without the build tools the
tests skip on a developer machine and fail when ``CI=true``.
"""

import email.parser
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from .conftest import missing_service

pytestmark = [pytest.mark.distribution, pytest.mark.timeout(90)]

REPO = Path(__file__).resolve().parent.parent
NAME = "django-live-notifications"
VERSION = "0.1.0"
DIST_INFO = f"django_live_notifications-{VERSION}.dist-info"
NOT_SHIPPED = ("project/", "tests/", "bench/", "examples/", "templates/", "docs/", "bin/")
COPY_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "__pycache__", "*.pyc", "build", "dist", "*.egg-info", ".pytest_cache", ".hypothesis",
    "*.sqlite3", ".test-db-*", "staticfiles", "results",
)
STEP_TIMEOUT = 60  # seconds for each of build, venv, pip install: each takes a few


def run(*args: str | Path, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(arg) for arg in args], cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=STEP_TIMEOUT,
    )
    assert result.returncode == 0, f"{' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}"
    return result


class Built:
    def __init__(self, source: Path, wheel: Path):
        self.source = source  # the copy the wheel was built from
        self.wheel = wheel
        with zipfile.ZipFile(wheel) as archive:
            self.names = set(archive.namelist())
            self.metadata = email.parser.Parser().parsestr(archive.read(f"{DIST_INFO}/METADATA").decode())

    def shipped(self, pattern: str) -> set[str]:
        """The files of the app's source matching ``pattern``, as the wheel names them."""
        return {p.relative_to(self.source).as_posix() for p in (self.source / "notifications").glob(pattern)
                if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    for module in ("build", "setuptools"):
        if importlib.util.find_spec(module) is None:
            missing_service(f"{module} is not installed: pip install -r requirements-dev.txt")
    root = tmp_path_factory.mktemp("distribution")
    source = root / "source"
    shutil.copytree(REPO, source, ignore=COPY_IGNORE)
    run(sys.executable, "-m", "build", "--no-isolation", "--outdir", root / "dist", source, cwd=root)
    (wheel,) = (root / "dist").glob("*.whl")
    return Built(source, wheel)


def test_wheel_holds_the_app_and_nothing_of_this_project(built):
    assert {name.split("/")[0] for name in built.names} == {"notifications", DIST_INFO}
    assert not [name for name in built.names if name.startswith(NOT_SHIPPED)]
    assert built.shipped("**/*.py") <= built.names
    assert built.shipped("migrations/0001_*.py")
    assert built.shipped("migrations/*.py") <= built.names


def test_wheel_carries_the_static_files(built):
    assert "notifications/static/notifications/client.js" in built.names
    assert built.shipped("static/**/*") <= built.names


def test_wheel_carries_every_template_the_app_renders(built):
    templates = built.shipped("templates/**/*.html")
    assert templates, "no template under notifications/templates/: the app renders its own"
    assert templates <= built.names, f"not in the wheel: {sorted(templates - built.names)}"


def test_metadata_asks_for_ranges_and_python_3_11(built):
    from packaging.requirements import Requirement

    assert (built.metadata["Name"], built.metadata["Version"]) == (NAME, VERSION)
    assert built.metadata["Requires-Python"] == ">=3.11"
    requirements = [Requirement(line) for line in built.metadata.get_all("Requires-Dist")]
    runtime = {req.name.lower(): req for req in requirements if req.marker is None}
    assert {"django", "channels", "channels-redis", "redis", "django-ninja", "prometheus-client"} <= set(runtime)
    for req in requirements:
        operators = {spec.operator for spec in req.specifier}
        assert ">=" in operators, f"{req}: no lower bound"
        assert not operators & {"==", "==="}, f"{req}: a pin; requirements.txt keeps the pins"
    assert str(runtime["django"].specifier) == "<6,>=5.2"


def test_wheel_installs_alone_into_a_new_venv_and_finds_its_files(built, tmp_path):
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("PYTHON", "PIP_", "DJANGO_", "VIRTUAL_ENV"))}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv, cwd=tmp_path, env=env)
    python = venv / "bin" / "python"
    run(python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", built.wheel, cwd=tmp_path, env=env)
    files = sorted(built.shipped("templates/**/*.html") | built.shipped("static/**/*"))
    probe = (
        "import importlib.metadata, importlib.resources, json, sys, notifications\n"
        "root = importlib.resources.files('notifications')\n"
        "print(json.dumps({'module': notifications.__file__,\n"
        "                  'version': importlib.metadata.version(sys.argv[1]),\n"
        "                  'client_js': root.joinpath('static/notifications/client.js').read_text('utf-8'),\n"
        "                  'missing': [f for f in sys.argv[2:] if not root.joinpath(f).is_file()]}))\n"
    )
    # -I: neither the current directory nor PYTHONPATH is on sys.path, so only the venv's copy imports.
    found = json.loads(run(python, "-I", "-c", probe, NAME, *(f.removeprefix("notifications/") for f in files),
                           cwd=tmp_path, env=env).stdout)
    assert Path(found["module"]).is_relative_to(venv)
    assert found["version"] == VERSION
    assert found["client_js"] == (built.source / "notifications/static/notifications/client.js").read_text("utf-8")
    assert found["missing"] == []
