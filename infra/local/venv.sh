# Sourced by the scripts that need Python tools (fuzz.sh, validate.sh).
#   ensure_venv "pkg==1.2.3" ...   creates $VENV once and installs what is missing
VENV=${ORDERFLOW_VENV:-${FUZZ_VENV:-$HOME/.cache/orderflow/venv}}

ensure_venv() {
  if [[ ! -x "$VENV/bin/pip" ]]; then
    if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
      # Debian's python3 ships venv (and ensurepip) separately.
      rm -rf "$VENV"
      DEBIAN_FRONTEND=noninteractive apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
      python3 -m venv "$VENV"
    fi
  fi
  local missing=()
  for pkg in "$@"; do
    "$VENV/bin/pip" show -q "${pkg%%==*}" >/dev/null 2>&1 &&
      [[ "$pkg" != *"=="* || "$("$VENV/bin/pip" show "${pkg%%==*}" 2>/dev/null | sed -n 's/^Version: //p')" == "${pkg##*==}" ]] ||
      missing+=("$pkg")
  done
  if ((${#missing[@]})); then
    echo "installing ${missing[*]} into $VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check "${missing[@]}"
  fi
}
