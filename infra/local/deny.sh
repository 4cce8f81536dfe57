#!/usr/bin/env bash
# Supply chain (make lint): advisories, licenses, banned or duplicate
# versions and sources, with cargo-deny. Installs cargo-deny if missing.
# Advisories come from the RustSec database: fetched where GitHub answers,
# else the offline snapshot in ../shared/rustsec (say its date with the
# verdict: a snapshot ages).
set -euo pipefail
cd "$(dirname "$0")/../.."

DENY_VERSION=0.20.2
if ! command -v cargo-deny >/dev/null; then
  echo "installing cargo-deny $DENY_VERSION (a few minutes, once)"
  cargo install cargo-deny --locked --version "$DENY_VERSION" >/dev/null
fi

DBS="$HOME/.cache/orderflow/advisory-dbs"
# cargo-deny's default database lives under this name inside db-path.
DB="$DBS/advisory-db-3157b0e258782691"
# RUSTSEC_SNAPSHOT names a snapshot elsewhere (a clone outside the workplace).
# Otherwise the workplace's shared/ beside this checkout, or beside /work's
# checkouts when this clone is elsewhere (CI clones into a temporary dir).
SNAPSHOT=${RUSTSEC_SNAPSHOT:-$(ls ../shared/rustsec/advisory-db-*.tar.gz /work/shared/rustsec/advisory-db-*.tar.gz 2>/dev/null | sort -t- -k3 | tail -n1 || true)}
if timeout 10 git ls-remote https://github.com/rustsec/advisory-db HEAD >/dev/null 2>&1; then
  echo "advisories: live RustSec database"
  rm -rf "$DB"
  OFFLINE=()
  cargo deny fetch db
elif [[ -n "$SNAPSHOT" ]]; then
  stamp=$(basename "$SNAPSHOT" .tar.gz)
  if [[ ! -f "$DB/.snapshot-$stamp" ]]; then
    rm -rf "$DB" && mkdir -p "$DBS"
    tmp=$(mktemp -d)
    tar -xzf "$SNAPSHOT" -C "$tmp"
    mv "$tmp/advisory-db" "$DB"
    rm -rf "$tmp"
    # cargo-deny reads the database's age from its git HEAD.
    git -C "$DB" init -q
    git -C "$DB" add -A
    git -C "$DB" -c user.name=orderflow -c user.email=ci@orderflow.invalid commit -qm "$stamp"
    touch "$DB/.snapshot-$stamp"
  fi
  echo "advisories: offline RustSec snapshot ${stamp#advisory-db-} ($SNAPSHOT)"
  OFFLINE=(--offline)
elif compgen -G "$DB/.snapshot-*" >/dev/null; then
  # A snapshot unpacked by an earlier run on this machine.
  stamp=$(basename "$(ls "$DB"/.snapshot-* | sort | tail -n1)")
  echo "advisories: offline RustSec snapshot ${stamp#.snapshot-advisory-db-} (cached in $DB)"
  OFFLINE=(--offline)
else
  echo "advisories: no RustSec database reachable and no snapshot in ../shared/rustsec: set RUSTSEC_SNAPSHOT=/path/to/advisory-db-DATE.tar.gz" >&2
  exit 1
fi
cargo fetch --locked >/dev/null
cargo deny "${OFFLINE[@]}" check
