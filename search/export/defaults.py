"""Defaults of `hwcompress export --within` (search.export.select), in a module light enough for
the CLI to read when it builds its help (no JAX, no Optuna)."""

SCREEN = 3.0  # the bisection starts among front plans this far below the baseline at the search's budget
CANDIDATES = 8  # at most this many retrains
