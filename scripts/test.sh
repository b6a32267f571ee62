#!/usr/bin/env bash
# Runs every check and test of secondsite, as CI does: formatting, lints, the whole test suite.
# Installs what the tests need on a fresh machine first (as root; a no-op once installed).
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/lib.sh

if [ "$(id -u)" = 0 ]; then
    install_missing_packages
    # As root (CI), the privileged tests (KVM, namespaces) must run, not skip.
    export SECONDSITE_REQUIRE_PRIVILEGED=1
else
    echo "not root: skipping package installs; privileged tests will be skipped"
fi
for component in rustfmt clippy; do
    cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1 || rustup component add "$component"
done

echo "== cargo fmt --check"
cargo fmt --all -- --check
(cd guest && cargo fmt -- --check)
echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
(cd guest && cargo clippy --release --locked -- -D warnings)
echo "== fuzz targets build"
# cargo-fuzz needs nightly; where it is missing, checking the fuzz crates on stable will do (the
# same entry points run as property tests below).
for fuzz in bgp/fuzz replicator/fuzz; do
    if cargo +nightly fuzz --version >/dev/null 2>&1; then
        (cd "$fuzz" && cargo +nightly fuzz build --target-dir ../../target/fuzz -O)
    else
        cargo check --manifest-path "$fuzz/Cargo.toml" --target-dir target/fuzz-check --quiet
    fi
done
echo "== cargo test --workspace"
log=$(mktemp)
# Tests that cannot run here (not root, no ../shared) write why into this file: they count as
# skipped, not passed.
export SECONDSITE_SKIPS=$(mktemp)
trap 'rm -f "$log" "$SECONDSITE_SKIPS"' EXIT
cargo test --workspace --no-fail-fast 2>&1 | tee "$log"
if [ -s "$SECONDSITE_SKIPS" ]; then
    echo "== skipped"
    cat "$SECONDSITE_SKIPS"
fi
# One closing line for the whole run (cargo prints one per test binary).
awk -v skipped="$(wc -l < "$SECONDSITE_SKIPS")" '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
     END { printf "tests: %d passed, %d failed, %d skipped\n", p - skipped, f, s + skipped }' "$log"
