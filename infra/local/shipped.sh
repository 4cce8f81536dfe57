#!/usr/bin/env bash
# The shipped binaries carry no test hooks: built per package (as the
# Dockerfile builds them), none of them enables the `failpoints` feature of
# the platform crates. Only the end-to-end tests' build turns it on.
set -euo pipefail
cd "$(dirname "$0")/../.."

shipped=(-p order-service -p processor-service -p outbox-relay -p loyalty-service)
if cargo tree "${shipped[@]}" -e features -i orderflow-outbox --offline 2>/dev/null | grep -q 'feature "failpoints"' \
  || cargo tree "${shipped[@]}" -e features -i orderflow-consumer --offline 2>/dev/null | grep -q 'feature "failpoints"'; then
  echo "a shipped binary enables the failpoints feature (test hooks); only orderflow-e2e may" >&2
  cargo tree "${shipped[@]}" -e features -i orderflow-outbox --offline | grep -B2 -A2 failpoints >&2 || true
  exit 1
fi
# The check itself works: the end-to-end tests' build does have them.
cargo tree -p orderflow-e2e -e features -i orderflow-outbox --offline | grep -q 'feature "failpoints"' \
  || { echo "shipped.sh cannot see the failpoints feature even where it is on; the check is broken" >&2; exit 1; }
echo "shipped binaries: no failpoints (test hooks only in the end-to-end tests' build)"
