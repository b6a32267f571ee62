#!/usr/bin/env bash
# The secondsite demo (the README's first command): installs what it needs, builds secondsite
# (cargo's progress on screen), installs it as /usr/local/bin/secondsite, then runs
# `secondsite lab demo`: two sites, a BIRD upstream and a client in network namespaces built from
# containerlab/secondsite.clab.yml; site-a is killed under load and site-b takes over while the
# client's TCP connection goes on. The lab stops only what it started, by pid and namespace.
# Needs root and /dev/kvm. Options after the script's name go to `secondsite lab demo`
# (e.g. `--upstream frr`, `--wan-delay-ms 5`, `--report DIR`).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
[ "$(id -u)" = 0 ] || { echo "run as root: the demo uses KVM and network namespaces" >&2; exit 1; }
[ -e /dev/kvm ] || { echo "no /dev/kvm here: the demo runs real VMs" >&2; exit 1; }
echo "== secondsite demo: checking the Debian packages it needs"
install_missing_packages
echo "== building secondsite (release; a few minutes the first time)"
cargo build --release -p secondsite
install -m 0755 target/release/secondsite /usr/local/bin/secondsite
echo "== installed: /usr/local/bin/secondsite"
echo "== secondsite lab demo"
exec secondsite lab demo --topology containerlab/secondsite.clab.yml "$@"
