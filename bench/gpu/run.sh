#!/usr/bin/env bash
# Run ON an accelerator machine with no network, from the repository root, after
# bench/gpu/fetch.sh filled bench/gpu/carry here and it was carried along:
#   run(command="bash bench/gpu/run.sh", carry=["bench/gpu/carry"], timeout_s=420)
# (without the device tool: copy the repository, bench/gpu/carry included, to the machine and
# run `OUT=/some/dir bash bench/gpu/run.sh` from its root). Installs the carried wheels that this
# machine lacks into a temporary folder (never over its own jax, flax or optax), then, in about
# 5 minutes in all (BUDGET_S):
#   1. the `make demo` search (lenet300 / digits, 40 trials) cold, then warm twice (baseline, K
#      and loop, and the XLA cache kept in its results directory) -> $OUT/demo.json
#   2. bench.bench_steps with what time is left: plan-steps/s and FLOP/s per K x loop driver,
#      lenet300 / lenet5 / resnet20 on Fashion-MNIST -> $OUT/bench_steps.json
# Figures land in $OUT (the device tool brings it back); nothing here needs the network.
set -euo pipefail
OUT=${OUT:-$(mktemp -d)}
BUDGET_S=${BUDGET_S:-270}
CARRY=bench/gpu/carry
start=$(date +%s)
test -d "$CARRY/wheels" || { echo "error: $CARRY/wheels is missing: run bench/gpu/fetch.sh here first and carry $CARRY" >&2; exit 2; }
DEPS=$(mktemp -d)
# each wheel whose import name is missing here (the machine's own packages win)
missing=$(python - "$CARRY/wheels" <<'PY'
import importlib.util, pathlib, sys
names = {"pyyaml": "yaml", "markdown_it_py": "markdown_it", "typing_extensions": "typing_extensions",
         "sqlalchemy": "sqlalchemy", "mako": "mako", "markupsafe": "markupsafe"}
for whl in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    dist = whl.name.split("-")[0].lower()
    mod = names.get(dist, dist)
    if importlib.util.find_spec(mod) is None:
        print(whl)
PY
)
if [ -n "$missing" ]; then
    python -m pip install --quiet --no-index --no-deps --target "$DEPS" $missing
fi
export PYTHONPATH="$PWD:$DEPS${PYTHONPATH:+:$PYTHONPATH}"
python - > "$OUT/machine.json" <<'PY'
import json, os, platform, jax, flax, optax, optuna
print(json.dumps({"devices": [str(d) for d in jax.devices()], "device_kind": jax.devices()[0].device_kind,
                  "backend": jax.default_backend(), "jax": jax.__version__, "flax": flax.__version__,
                  "optax": optax.__version__, "optuna": optuna.__version__, "python": platform.python_version(),
                  "cpus": os.cpu_count()}, indent=1))
PY
cat "$OUT/machine.json"
echo "set-up: $(( $(date +%s) - start )) s"

# 2 first: the demo figures are the targets that a cut-off step table would not hurt
RES=$(mktemp -d)
demo() {  # $1: study name; prints the wall seconds of one `make demo` search
    local t0 t1
    t0=$(date +%s.%N)
    python -m search.cli search --model lenet300 --dataset digits --profile mobile-cpu --study "$1" \
        --results-dir "$RES" --quiet > "$OUT/demo-$1.log" 2>&1
    t1=$(date +%s.%N)
    python -c "print(round($t1 - $t0, 2))"
}
cold=$(demo cold)
warm=$(demo warm)
warm2=$(demo warm2)
python - "$cold" "$warm" "$warm2" "$RES" > "$OUT/demo.json" <<'PY'
import json, sys, pathlib
cold, warm, warm2, res = float(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
k = pathlib.Path(res, "cache", "engine_k.json")
print(json.dumps({"command": "hwcompress search --model lenet300 --dataset digits --profile mobile-cpu --quiet",
                  "cold_s": cold, "warm_s": [warm, warm2], "targets": {"cold_s": 25, "warm_s": 8},
                  "met": {"cold": cold <= 25, "warm": min(warm, warm2) <= 8},
                  "engine_k": json.loads(k.read_text()) if k.is_file() else None}, indent=1))
PY
cat "$OUT/demo.json"

left=$(( BUDGET_S - ($(date +%s) - start) ))
echo "step table: ${left} s left"
python -m bench.bench_steps --data-dir "$CARRY/fashion-mnist" --steps 100 --rounds 2 --budget-s "$left" \
    --out "$OUT/bench_steps.json" || echo "bench_steps stopped: see above"
echo "done in $(( $(date +%s) - start )) s; figures in $OUT"
