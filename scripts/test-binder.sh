#!/usr/bin/env bash
# Check the Binder set-up without Docker: build a fresh venv the way repo2docker does (Python of
# binder/runtime.txt, `pip install -r binder/requirements.txt`, then binder/postBuild), check it
# is consistent (`pip check`, the widgets import) and execute every notebook in it with the venv's
# own Jupyter and kernel. Needs network access to PyPI for the install (pip's cache is reused).
# BINDER_VENV (default build/binder-venv) is rebuilt from scratch; the executed notebooks are
# written to build/binder-notebooks/. BINDER_NOTEBOOKS names the notebooks to execute (default:
# the badge's landing notebook 01 and the widget-heavy 02; "all": every one). `make
# test-notebooks` executes every notebook with the same package in .venv, so the default here
# checks the environment (pins, front ends, kernel) without paying for every notebook twice.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${BINDER_VENV:-build/binder-venv}
OUT=build/binder-notebooks
CELL_TIMEOUT=${NB_CELL_TIMEOUT:-300}

want=$(sed -n 's/^python-\([0-9]*\.[0-9]*\).*/\1/p' binder/runtime.txt)
if command -v "python$want" >/dev/null 2>&1 && "python$want" -c '' >/dev/null 2>&1; then
  PYTHON=$(command -v "python$want")
else
  PYTHON=$(scripts/find-python.sh) || exit 1
fi
have=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$have" != "$want" ]; then
  echo "warning: binder/runtime.txt asks for Python $want; testing with $have ($PYTHON)" >&2
fi
echo "binder venv: $VENV from $PYTHON ($("$PYTHON" --version))"
rm -rf "$VENV" "$OUT"
"$PYTHON" -m venv "$VENV"
export PATH="$ROOT/$VENV/bin:$PATH"  # as in the Binder image: the environment's python first
python -m pip install -q --upgrade pip
start=$(date +%s)
python -m pip install -q -r binder/requirements.txt
binder/postBuild
python -m pip check
echo "installed in $(( $(date +%s) - start )) s"
python - <<'PY'
import edkit, edkit.widgets, jupyterlab, voila  # what the notebooks and Binder's front ends need
print("edkit", edkit.__version__, "from", edkit.__file__)
assert edkit.__file__.startswith(__import__("os").getcwd()), "edkit is not this checkout"
PY
# Only this environment's kernels and Jupyter data (no user-level kernel shadows python3).
export JUPYTER_PATH="$ROOT/$VENV/share/jupyter" JUPYTER_DATA_DIR="$ROOT/$VENV/share/jupyter"
jupyter kernelspec list
mkdir -p "$OUT"
status=0
case "${BINDER_NOTEBOOKS:-01_quick_start.ipynb 02_bloch_waves.ipynb}" in
  all) selected=(notebooks/*.ipynb) ;;
  *) read -r -a names <<<"${BINDER_NOTEBOOKS:-01_quick_start.ipynb 02_bloch_waves.ipynb}"
     selected=("${names[@]/#/notebooks/}") ;;
esac
for notebook in "${selected[@]}"; do
  [ -f "$notebook" ] || { echo "FAILED $notebook: no such notebook"; status=1; continue; }
  begin=$(date +%s)
  if (cd notebooks && jupyter nbconvert --to notebook --execute \
        --ExecutePreprocessor.timeout="$CELL_TIMEOUT" --ExecutePreprocessor.kernel_name=python3 \
        --output-dir "$ROOT/$OUT" "$(basename "$notebook")" >"$ROOT/$OUT/$(basename "$notebook" .ipynb).log" 2>&1); then
    echo "ok     $notebook ($(( $(date +%s) - begin )) s)"
  else
    echo "FAILED $notebook ($(( $(date +%s) - begin )) s):"; tail -40 "$OUT/$(basename "$notebook" .ipynb).log"
    status=1
  fi
done
exit $status
