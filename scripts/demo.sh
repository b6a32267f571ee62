#!/usr/bin/env bash
# The secondsite demo: check and explain the reference policy, move a live VM between processes
# without dropping its client's TCP connection, then move the service's prefix from one site to
# the other with BGP at a real upstream router (BIRD). Needs root and /dev/kvm; everything runs
# in network namespaces this script creates and removes (KEEP=1 keeps its work directory, with
# the logs of the VMM, BIRD and the speakers).
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
up=ssdemo-up-$$ site_a=ssdemo-a-$$ site_b=ssdemo-b-$$
cleanup() {
    exec 3>&- 4>&- 5>&- 2>/dev/null || true
    # The speakers first, with SIGTERM: each sends its peer a Cease and exits.
    for ns in "$site_a" "$site_b"; do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -CONT "$pid"; kill -TERM "$pid"; done
    done 2>/dev/null || true
    sleep 0.5
    for ns in "$site" "$client" "$up" "$site_a" "$site_b"; do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
        ip netns del "$ns" 2>/dev/null || true
    done
    [ -n "${KEEP:-}" ] || rm -rf "$work"
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

echo "== BGP: an upstream router (BIRD, AS 65000) and two sites (AS 65001), as in the policy"
for ns in "$up" "$site_a" "$site_b"; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
n=1
for s in "$site_a" "$site_b"; do
    ip link add "up-site$n" netns "$up" type veth peer name eth0 netns "$s"
    ip -n "$up" addr add "10.0.$n.1/24" dev "up-site$n"; ip -n "$up" link set "up-site$n" up
    ip -n "$s" addr add "10.0.$n.2/24" dev eth0; ip -n "$s" link set eth0 up
    n=$((n + 1))
done
sed -e 's/^#NOEXPORT//' -e 's/^#BFD//' -e 's/siteA/site1/; s/siteB/site2/' lab/configs/bird-upstream.conf \
    | grep -v '^#' | grep -v 'fd00:1::' >"$work/bird.conf"
ip netns exec "$up" bird -f -c "$work/bird.conf" -s "$work/bird.ctl" -P "$work/bird.pid" \
    2>"$work/bird.log" &
speak() { # site number, extra options; commands on fd 4 or 5
    ip netns exec "$1" "$bin" bgp speak --local-as 65001 --peer-as 65000 --router-id "10.0.$2.2" \
        --local-addr "10.0.$2.2" --peer "10.0.$2.1" --announce 203.0.113.0/24 --bfd 100:3 "${@:3}" \
        >>"$work/bgp-$2.log" 2>&1
}
mkfifo "$work/bgp-a" "$work/bgp-b"
speak "$site_b" 2 --prepend 2 <"$work/bgp-b" & exec 5>"$work/bgp-b"
speak "$site_a" 1 <"$work/bgp-a" & exec 4>"$work/bgp-a"
route() { ip -n "$up" route show 203.0.113.0/24; }
for _ in $(seq 100); do route | grep -q 10.0.1.2 && break; sleep 0.1; done
echo "upstream FIB, both sites announcing (site B prepends twice): $(route)"
echo "== site A withdraws (as its failover controller will when site A is lost)"
echo "withdraw 203.0.113.0/24" >&4
for _ in $(seq 100); do route | grep -q 10.0.2.2 && break; sleep 0.01; done
echo "upstream FIB: $(route)"
echo "== site A's speaker is frozen (SIGSTOP) after announcing again: BFD takes it out in ~0.3 s"
echo "announce 203.0.113.0/24" >&4
for _ in $(seq 100); do route | grep -q 10.0.1.2 && break; sleep 0.1; done
echo "upstream FIB: $(route)"
for _ in $(seq 100); do grep -q '"event":"bfd".*"to":"up"' "$work/bgp-1.log" && break; sleep 0.1; done
kill -STOP $(ip netns pids "$site_a")
start=$(date +%s%N)
for _ in $(seq 300); do route | grep -q 10.0.2.2 && break; sleep 0.01; done
echo "upstream FIB after $(( ($(date +%s%N) - start) / 1000000 )) ms: $(route)"
kill -CONT $(ip netns pids "$site_a")
