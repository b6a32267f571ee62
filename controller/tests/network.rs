//! The network the site daemon builds for a group (`site::network`), built for real in a
//! namespace of its own from a test thread moved into it: a group of two VMs with an IPv4 and
//! an IPv6 prefix gets a bridge over their taps with both gateway addresses and the site's MAC,
//! a route to each VM's own addresses, and nothing is left once it is taken down.

use secondsite::runtime::group::group_vms;
use secondsite::site::network::{GATEWAY_MAC, GroupNetwork};
use secondsite_lab::{Netns, privileged};

fn two_vm_group(dir: &std::path::Path) -> secondsite_policy::model::Group {
    let text = std::fs::read_to_string(secondsite_lab::policy(dir)).expect("the lab's policy");
    let text = text
        .replacen(
            "prefixes:\n",
            "prefixes:\n  - prefix: 2001:db8:113::/48\n    announce:\n      - site: site-a\n      - site: site-b\n        prepend: 2\n",
            1,
        )
        .replace(
            "prefixes: [203.0.113.0/24]",
            "prefixes: [203.0.113.0/24, 2001:db8:113::/48]",
        )
        .replace(
            "        addresses: [203.0.113.10]\n",
            "        addresses: [203.0.113.10, 2001:db8:113::10]
      - name: redis-2
        memory_mib: 64
        mac: 52:54:00:12:34:57
        addresses: [203.0.113.11, 2001:db8:113::11]
",
        );
    let report = secondsite_policy::check_str(&text, dir);
    let policy = report
        .policy
        .unwrap_or_else(|| panic!("{:?}\n{text}", report.diagnostics));
    policy.groups[0].clone()
}

#[test]
fn a_group_of_two_vms_gets_a_bridge_with_its_gateways_and_routes_and_nothing_is_left() {
    if !privileged(
        "a_group_of_two_vms_gets_a_bridge_with_its_gateways_and_routes_and_nothing_is_left",
    ) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let group = two_vm_group(dir.path());
    let ns = Netns::new("net").expect("a namespace");
    let show = |args: &[&str]| {
        let out = ns.exec("ip", args).expect("ip");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let network = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                ns.enter_on_this_thread().expect("enters the namespace");
                let vms = group_vms(&group).expect("the group's VMs");
                assert_eq!(
                    vms[1].ipv6,
                    ["2001:db8:113::11".parse::<std::net::Ipv6Addr>().unwrap()]
                );
                GroupNetwork::build(0, &group, &vms).expect("builds")
            })
            .join()
            .expect("the builder")
    });
    assert_eq!(network.taps, ["ss0v0", "ss0v1"]);
    let bridge = show(&["-o", "addr", "show", "dev", "ss0br"]);
    assert!(bridge.contains("203.0.113.1/24"), "{bridge}");
    assert!(bridge.contains("2001:db8:113::1/48"), "{bridge}");
    let link = show(&["-o", "link", "show", "dev", "ss0br"]);
    assert!(link.contains(GATEWAY_MAC), "{link}");
    let ports = show(&["-o", "link", "show", "master", "ss0br"]);
    assert!(
        ports.contains("ss0v0") && ports.contains("ss0v1"),
        "{ports}"
    );
    let v4 = show(&["-4", "route"]);
    for vm in ["203.0.113.10 dev ss0br", "203.0.113.11 dev ss0br"] {
        assert!(v4.contains(vm), "{v4}");
    }
    assert!(
        !v4.contains("203.0.113.0/24"),
        "only the VMs' own addresses are routed: {v4}"
    );
    let v6 = show(&["-6", "route"]);
    for vm in ["2001:db8:113::10 dev ss0br", "2001:db8:113::11 dev ss0br"] {
        assert!(v6.contains(vm), "{v6}");
    }
    let forwarding = ns
        .exec("sysctl", &["-n", "net.ipv6.conf.all.forwarding"])
        .expect("sysctl");
    assert_eq!(String::from_utf8_lossy(&forwarding.stdout).trim(), "1");

    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                ns.enter_on_this_thread().expect("enters the namespace");
                network.take_down();
            })
            .join()
            .expect("the taker-down")
    });
    let links = show(&["-o", "link"]);
    assert!(!links.contains("ss0"), "nothing is left: {links}");
    assert!(!show(&["-6", "route"]).contains("2001:db8:113::10"));
}
