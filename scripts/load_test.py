#!/usr/bin/env python3
"""The deployment README's latency probe: `python3 scripts/load_test.py [ragllm loadtest options]`."""

import sys

from ragllm.cli import main

if __name__ == "__main__":
    sys.exit(main(["loadtest", *sys.argv[1:]]))
