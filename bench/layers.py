"""RedisChannelLayer (core) or RedisPubSubChannelLayer (pubsub) under the per-process hub?

    .venv/bin/python bench/layers.py [scaleout.py options, e.g. --sockets 1000]

Same server (``bin/serve``, 2 uvicorn workers), same load, each layer in turn; prints a table
and writes ``bench/results/layers-<date>.json``. docs/deployment.md explains the choice.
"""

import sys

from compare import compare

if __name__ == "__main__":
    compare("layers", [("uvicorn", "core"), ("uvicorn", "pubsub")], sys.argv[1:])
