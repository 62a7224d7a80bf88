#!/usr/bin/env bash
# Print the path of a Python >= 3.12 interpreter: PATH first, then pyenv. Exit 1 with advice if none.
set -u
ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; }
for cand in python3.13 python3.12 python3 python; do
  if command -v "$cand" >/dev/null 2>&1 && ok "$cand"; then
    "$cand" -c 'import sys; print(sys.executable)'; exit 0
  fi
done
if command -v pyenv >/dev/null 2>&1; then
  for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.(1[2-9]|[2-9][0-9])(\.[0-9]+)?$' | sort -t. -k1,1n -k2,2n -k3,3n -r); do
    exe="$(pyenv root)/versions/$v/bin/python3"
    if [ -x "$exe" ] && ok "$exe"; then echo "$exe"; exit 0; fi
  done
fi
echo "edkit needs Python >= 3.12, and none was found on PATH or through pyenv." >&2
echo "Install one (e.g. 'pyenv install 3.12', 'apt-get install python3.12', or python.org) and run again." >&2
exit 1
