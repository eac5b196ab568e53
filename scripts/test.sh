#!/usr/bin/env bash
# The test suite, as CI runs it: installs what it needs, then format, lint and every test tier
# (unit tests, and privileged tests in network namespaces they create and remove). Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "test.sh: the privileged tests create network namespaces; run as root" >&2
  exit 1
fi
bash scripts/install-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
