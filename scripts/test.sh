#!/usr/bin/env bash
# vigil's whole test command: install what the tests need, build the guest the virtual nodes
# boot, then format check, lints, all tests. This is the command the README gives and the one
# CI (.ci/run) runs.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-test-deps.sh

echo "== cargo fmt --check" >&2
cargo fmt --all --check
echo "== cargo clippy" >&2
cargo clippy --workspace --all-targets -- -D warnings
echo "== guest for the virtual nodes (static agent, Debian kernel, busybox initrd)" >&2
RUSTFLAGS='-C target-feature=+crt-static' cargo build -q --profile guest --target x86_64-unknown-linux-gnu --bin vigil
hardware-lab/guest/build.sh target/guest target/x86_64-unknown-linux-gnu/guest/vigil
echo "== cargo test" >&2
cargo test --workspace --no-fail-fast
