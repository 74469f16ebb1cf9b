"""Shared set-up of the tests that run real searches: tiny trials, and one baseline cache
for the whole pytest session (results dirs are fresh per test module, the trained baseline is
not: its cache key covers model, data and training config, so sharing it is exact)."""
from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

from search import cli

# tiny trials: lenet300 on digits, three fine-tuning steps, one trial per batch
SEARCH = ["--model", "lenet300", "--dataset", "digits", "--profile", "mobile-cpu",
          "--finetune-steps", "3", "--no-warm-start", "--quiet", "--batch", "1"]

_cache: Path | None = None


def results_dir(parent: Path) -> Path:
    """A new results dir under `parent` whose cache/ is the session's shared baseline cache."""
    global _cache
    if _cache is None:
        _cache = Path(tempfile.mkdtemp(prefix="hwcompress-test-cache-"))
        atexit.register(shutil.rmtree, _cache, True)
    results = parent / "results"
    results.mkdir(parents=True)
    (results / "cache").symlink_to(_cache, target_is_directory=True)
    return results


def start_search(results: Path, study: str, trials: int = 1, *extra: str) -> int:
    """`hwcompress search` with tiny trials into `results` (in-process); returns the exit code."""
    return cli.main(["search", *SEARCH, "--study", study, "--trials", str(trials),
                     "--results-dir", str(results), *extra])
