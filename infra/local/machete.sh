#!/usr/bin/env bash
# Unused dependencies (make lint), with cargo-machete: it searches each
# crate's sources for the dependencies its Cargo.toml lists. It can be
# fooled (a dependency used only through another crate's macro, or only
# for a feature it turns on); such a dependency is listed in that crate's
# [package.metadata.cargo-machete] ignored = [...], with a comment saying
# why. Installs cargo-machete if missing.
set -euo pipefail
cd "$(dirname "$0")/../.."

MACHETE_VERSION=0.9.2
if ! command -v cargo-machete >/dev/null; then
  echo "installing cargo-machete $MACHETE_VERSION (a minute or two, once)"
  cargo install cargo-machete --locked --version "$MACHETE_VERSION" >/dev/null
fi
echo "unused dependencies: cargo machete"
cargo machete
