#!/usr/bin/env bash
# Runs every check and test of secondsite, as CI does: formatting, lints, the whole test suite.
# Installs what the tests need on a fresh machine first (as root; a no-op once installed).
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests use. Each later part adds its own here (routers, redis-tools, ...).
APT_PACKAGES=()

install_missing_packages() {
    local missing=()
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "installing: ${missing[*]}"
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
    fi
}

install_missing_packages
for component in rustfmt clippy; do
    cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1 || rustup component add "$component"
done

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo test --workspace"
cargo test --workspace
