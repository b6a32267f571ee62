#!/usr/bin/env bash
# Runs every check and test of secondsite, as CI does: formatting, lints, the whole test suite.
# Installs what the tests need on a fresh machine first (as root; a no-op once installed).
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests use: iproute2 for namespaces, taps and nstat; redis-tools
# (redis-cli, redis-benchmark) and netcat-openbsd as real clients of the test guest;
# redis-server as the yardstick of `secondsite bench vm`; util-linux for unshare.
APT_PACKAGES=(iproute2 util-linux redis-tools redis-server netcat-openbsd procps)

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
echo "== cargo test --workspace"
cargo test --workspace
