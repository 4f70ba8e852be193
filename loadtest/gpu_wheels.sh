#!/usr/bin/env bash
# Wheels for the GPU machine, downloaded here: what `alit-serve verify`, `alit-serve bench`,
# `python -m service.model.speed` and `python -m service.training` import and the GPU machine's image
# lacks. That image has python3.12 with torch (CUDA), numpy, pillow, safetensors, pyyaml, scikit-image,
# scikit-learn, pandas, pyarrow, tqdm, prometheus-client, pytest and matplotlib, and no network; what
# those commands import besides (found by running them and listing the third-party modules loaded):
# pydantic-settings (service/settings.py, which verify and bench read) and what it needs. FastAPI,
# uvicorn, redis and the rest of pyproject.toml's dependencies are the API's, imported by none of them.
# Exact versions from constraints.txt; cp312 manylinux wheels (pydantic-core) or pure-Python ones.
#
# Usage: loadtest/gpu_wheels.sh [DEST]   (default .whl/, kept out of git by .git/info/exclude)
# On the GPU machine (loadtest/gpu_checks.sh does this itself when DEST is .whl/):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.whl}
py=${PYTHON:-python3}
packages=(pydantic pydantic-core pydantic-settings python-dotenv annotated-types typing-inspection typing-extensions)

pinned() {  # NAME -> NAME==VERSION from constraints.txt (names compared as pip does: case, '-', '_', '.')
  awk -F'==' -v want="$1" '
    function norm(s) { s = tolower(s); gsub(/[-_.]+/, "-", s); return s }
    !/^#/ && NF == 2 && norm($1) == norm(want) { print $1 "==" $2; found = 1 }
    END { exit !found }' constraints.txt
}

mkdir -p "$dest"
specs=()
for name in "${packages[@]}"; do
  spec=$(pinned "$name") || { echo "error: $name is not pinned in constraints.txt" >&2; exit 2; }
  specs+=("$spec")
done
echo "downloading into $dest: ${specs[*]}"
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$dest" "${specs[@]}"
ls -l "$dest"/*.whl
total=$(du -cb "$dest"/*.whl | tail -1 | cut -f1)
echo "total $((total / 1024)) KiB in $(find "$dest" -type f -name '*.whl' | wc -l) wheels"
if (( total > 30 * 1024 * 1024 )); then
  echo "error: more than 30 MiB of wheels" >&2
  exit 1
fi
