"""uvicorn --workers 2, or two daphne processes on one socket (daphne --fd)?

    .venv/bin/python bench/servers.py [scaleout.py options, e.g. --sockets 1000]

Same load, the core Redis layer, each server in turn; prints a table and writes
``bench/results/servers-<date>.json``. docs/deployment.md explains the choice.
"""

import sys

from compare import compare

if __name__ == "__main__":
    compare("servers", [("uvicorn", "core"), ("daphne", "core")], sys.argv[1:])
