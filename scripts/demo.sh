#!/usr/bin/env bash
# The secondsite demo: check and explain the reference policy, then move a live VM between
# processes without dropping its client's TCP connection. Needs root and /dev/kvm; everything
# runs in network namespaces this script creates and removes.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
[ "$(id -u)" = 0 ] || { echo "run as root: the demo uses KVM and network namespaces" >&2; exit 1; }
install_missing_packages

cargo build --release -q -p secondsite
bin=$PWD/target/release/secondsite

echo "== secondsite policy check examples/two-sites.yaml"
"$bin" policy check examples/two-sites.yaml
echo "== secondsite policy explain examples/two-sites.yaml"
"$bin" policy explain examples/two-sites.yaml

site=ssdemo-site-$$ client=ssdemo-client-$$ work=$(mktemp -d)
cleanup() {
    exec 3>&- 2>/dev/null || true
    for ns in "$site" "$client"; do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
        ip netns del "$ns" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT

echo "== a site namespace with a tap for the VM, a client namespace routed to it"
ip netns add "$site"; ip netns add "$client"
ip -n "$site" link set lo up; ip -n "$client" link set lo up
ip -n "$site" tuntap add dev tap0 mode tap
ip -n "$site" addr add 203.0.113.1/24 dev tap0; ip -n "$site" link set tap0 up
ip link add to-client netns "$site" type veth peer name to-site netns "$client"
ip -n "$site" addr add 10.0.3.1/24 dev to-client; ip -n "$site" link set to-client up
ip -n "$client" addr add 10.0.3.2/24 dev to-site; ip -n "$client" link set to-site up
ip -n "$client" route add 203.0.113.0/24 via 10.0.3.1
ip netns exec "$site" sysctl -qw net.ipv4.ip_forward=1

run_vm() {
    ip netns exec "$site" "$bin" vm "$@" --control "$work/vm.sock" --console "$work/console.log" \
        >>"$work/vmm.log" 2>&1 &
}
wait_pong() {
    for _ in $(seq 100); do
        [ "$(ip netns exec "$client" redis-cli -h 203.0.113.10 ping 2>/dev/null)" = PONG ] && return 0
        sleep 0.1
    done
    echo "the guest does not answer; VMM log:" >&2; cat "$work/vmm.log" >&2; exit 1
}

echo "== secondsite vm run: the test guest, a Redis-protocol server, at 203.0.113.10"
run_vm run --mem 64M --tap tap0 --ip 203.0.113.10/24 --gw 203.0.113.1
wait_pong
ip netns exec "$client" redis-cli -h 203.0.113.10 set greeting "hello from the guest"
ip netns exec "$client" redis-benchmark -h 203.0.113.10 -t set,get -n 20000 -q

echo "== a client opens one TCP connection and keeps it"
mkfifo "$work/in"
ip netns exec "$client" nc 203.0.113.10 6379 <"$work/in" >"$work/out" &
exec 3>"$work/in"
printf 'INCR visits\r\n' >&3; sleep 0.3; echo "client: INCR visits -> $(tail -n1 "$work/out")"

echo "== save the VM, kill its process, recreate the tap, restore it in a new process"
"$bin" vm save --control "$work/vm.sock" --to "$work/snapshot"
pkill -9 -f "$bin vm run" || true
ip -n "$site" link del tap0
ip -n "$site" tuntap add dev tap0 mode tap
ip -n "$site" addr add 203.0.113.1/24 dev tap0; ip -n "$site" link set tap0 up
run_vm restore --from "$work/snapshot" --tap tap0
wait_pong

echo "== the same client connection carries on"
printf 'INCR visits\r\n' >&3; sleep 0.3; echo "client: INCR visits -> $(tail -n1 "$work/out")"
printf 'GET greeting\r\n' >&3; sleep 0.3; echo "client: GET greeting -> $(tail -n1 "$work/out")"
"$bin" vm status --control "$work/vm.sock"
