# Shared by scripts/test.sh and scripts/demo.sh: install the Debian packages secondsite's tests
# and demo use, when running as root on a machine that lacks them.

# iproute2 for namespaces, taps and nstat; util-linux for unshare; redis-tools (redis-cli,
# redis-benchmark) and netcat-openbsd as real clients of the test guest; redis-server as the
# yardstick of `secondsite bench vm`; bird2, frr and gobgpd as the real upstream routers the BGP
# speaker is tested against (their services stay off: the lab starts them in namespaces);
# tshark reads the traffic log's pcapng exports; fonts-dejavu-core is the font the lab's report
# pictures (PNG) are drawn with.
APT_PACKAGES=(iproute2 util-linux redis-tools redis-server netcat-openbsd procps bird2 frr gobgpd tshark
    fonts-dejavu-core)

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
