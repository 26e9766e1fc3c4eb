"""``python -m distillery.bench``: one bench child process (spawned by :func:`distillery.bench.run_bench`)."""

import sys

from distillery.bench.run import child_main

sys.exit(child_main(sys.argv[1:]))
