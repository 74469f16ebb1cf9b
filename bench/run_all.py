"""`make bench`: run every benchmark in bench/ in turn; each prints its figures and saves
JSON under bench/out/. Never part of `make test`."""
from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys
import time

import bench


def main() -> int:
    names = sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if m.name.startswith("bench_"))
    only = set(sys.argv[1:])
    failed = []
    for name in names:
        if only and name not in only:
            continue
        print(f"\n=== bench/{name}.py ===", flush=True)
        t0 = time.perf_counter()
        module = importlib.import_module(f"bench.{name}")
        try:
            fn = module.main
            fn([]) if inspect.signature(fn).parameters else fn()
        except Exception as e:  # a broken benchmark must not hide the others' figures
            failed.append(name)
            print(f"{name} failed: {type(e).__name__}: {e}", file=sys.stderr)
        print(f"=== {name}: {time.perf_counter() - t0:.0f} s ===", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
