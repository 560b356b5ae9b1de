# Sourced by the scripts: picks a Python interpreter and makes the virtual environment.
# MULTIRUN_PYTHON overrides the interpreter; MULTIRUN_VENV the environment's folder.

pick_python() {
  # $1: wanted minor version, e.g. 3.12 (Motus needs 3.12+); falls back to any python3 >= 3.10
  local want="$1" candidate
  if [[ -n "${MULTIRUN_PYTHON:-}" ]]; then echo "$MULTIRUN_PYTHON"; return; fi
  if command -v pyenv >/dev/null 2>&1; then
    candidate=$(pyenv versions --bare 2>/dev/null | grep -E "^${want//./\\.}(\.[0-9]+)?$" | sort -V | tail -n 1)
    if [[ -n "$candidate" ]]; then echo "$(pyenv root)/versions/$candidate/bin/python"; return; fi
  fi
  for candidate in "python$want" python3; do
    if command -v "$candidate" >/dev/null 2>&1; then command -v "$candidate"; return; fi
  done
  echo "no Python $want or python3 found" >&2
  return 1
}

make_venv() {
  # $1: folder, $2: interpreter, $3: pip install arguments
  # One stamp per pyproject.toml and install spec: a venv the demo made with "." gets the test
  # extras when scripts/test asks for ".[test]"; an edited pyproject.toml reinstalls.
  local venv="$1" python="$2" spec="$3" project stamp old
  project=$(sha1sum < pyproject.toml | cut -c1-12)
  stamp="$venv/.installed-$project-$(printf '%s' "$spec" | sha1sum | cut -c1-12)"
  if [[ ! -x "$venv/bin/python" ]]; then
    echo "==> creating $venv with $("$python" --version)"
    "$python" -m venv "$venv"
  fi
  if [[ ! -f "$stamp" ]]; then
    echo "==> installing $spec into $venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet -e "$spec"
    for old in "$venv"/.installed-*; do
      [[ "$old" == "$venv/.installed-$project-"* ]] || rm -f "$old"  # stamps of an older pyproject.toml
    done
    touch "$stamp"
  fi
}
