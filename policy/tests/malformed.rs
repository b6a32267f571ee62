//! Malformed policies, each with the exact `line:col: message` lines `policy check` must print.
//!
//! Most cases are one edit of the reference example (examples/two-sites.yaml), so each shows one
//! mistake an operator could make in a real file; the rest are hostile or broken files.

use std::path::Path;

use secondsite_policy::{Report, check_str};

const EXAMPLE: &str = include_str!("../../examples/two-sites.yaml");
/// Relative file names in the policies below resolve here; nothing exists there.
const BASE_DIR: &str = "/nonexistent-policy-dir";

/// The example with `from` (which must occur exactly once) replaced by `to`.
fn edit(from: &str, to: &str) -> String {
    assert_eq!(
        EXAMPLE.matches(from).count(),
        1,
        "`{from}` must occur once in the example"
    );
    EXAMPLE.replacen(from, to, 1)
}

fn rendered(report: &Report) -> Vec<String> {
    report
        .diagnostics
        .iter()
        .map(|d| d.render("p.yaml").trim_start_matches("p.yaml:").to_owned())
        .collect()
}

#[track_caller]
fn assert_findings(text: &str, expected: &[&str]) {
    let report = check_str(text, Path::new(BASE_DIR));
    assert_eq!(rendered(&report), expected);
    let has_error = expected.iter().any(|e| !e.contains(": warning: "));
    assert_eq!(
        report.policy.is_none(),
        has_error,
        "policy present iff no errors"
    );
}

#[test]
fn the_example_is_valid() {
    assert_findings(EXAMPLE, &[]);
}

// ---- broken files -------------------------------------------------------------------------

#[test]
fn empty_file() {
    let msg = "1:1: the file is empty: a policy needs at least `version`, `sites`, `prefixes` and `groups`";
    assert_findings("", &[msg]);
    assert_findings("# only a comment\n\n", &[msg]);
}

#[test]
fn a_scalar_instead_of_a_mapping() {
    assert_findings(
        "hello\n",
        &[r#"1:1: the policy must be a mapping, found a string ("hello")"#],
    );
}

#[test]
fn unclosed_flow_sequence() {
    assert_findings(
        "version: 1\nsites: [\n",
        &["3:1: YAML syntax error: while parsing a node, did not find expected node content"],
    );
}

#[test]
fn tab_indentation() {
    assert_findings(
        "version: 1\nsites:\n\t- name: a\n",
        &["3:2: YAML syntax error: tabs disallowed within this context (block indentation)"],
    );
}

#[test]
fn duplicate_key() {
    assert_findings(
        &edit("version: 1 ", "version: 1\nversion: 1 "),
        &["17:1: duplicate key `version` (first given at 16:1); the first is kept"],
    );
}

#[test]
fn two_documents() {
    assert_findings(
        &format!("{EXAMPLE}---\nversion: 1\n"),
        &["113:1: a second YAML document: a policy file holds exactly one"],
    );
}

#[test]
fn foreign_tag() {
    assert_findings(
        &edit("version: 1 ", "version: !!python/object:os.system 1 "),
        &[
            "16:10: unsupported YAML tag `tag:yaml.org,2002:python/object:os.system`: a policy uses plain values",
        ],
    );
}

#[test]
fn binary_garbage() {
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let err = secondsite_policy::source::text_from_bytes(garbage).unwrap_err();
    assert_eq!(
        err.render("p.yaml"),
        "p.yaml:1:1: the file holds a NUL byte: it is binary, not a YAML policy"
    );
}

// ---- shape: keys, types, ranges, formats ----------------------------------------------------

#[test]
fn unknown_top_level_key_with_suggestion() {
    assert_findings(
        &edit("heartbeat:\n", "heartbeats:\n"),
        &["104:1: unknown key `heartbeats` at the top level; did you mean `heartbeat`?"],
    );
}

#[test]
fn unknown_nested_key_with_suggestion() {
    assert_findings(
        &edit(
            "          hold_time: 9           #",
            "          hold_tme: 9           #",
        ),
        &["29:11: unknown key `hold_tme` in `sites[0].bgp.peers[0]`; did you mean `hold_time`?"],
    );
}

#[test]
fn unknown_key_without_suggestion_lists_the_keys() {
    assert_findings(
        &edit(
            "    inbound_log: sync ",
            "    colour: blue\n    inbound_log: sync ",
        ),
        &[
            "101:5: unknown key `colour` in `groups[0]`; expected one of: backup, checkpoint, inbound_log, name, output_commit, prefixes, primary, vms",
        ],
    );
}

#[test]
fn several_shape_errors_are_all_reported() {
    let text = edit(
        "          hold_time: 9           #",
        "          hold_tme: 9           #",
    )
    .replacen(
        "local_as: 65001            #",
        "local_as: \"x\"              #",
        1,
    )
    .replacen("interval_ms: 25 ", "interval_ms: 2  ", 1);
    assert_findings(
        &text,
        &[
            r#"24:17: `sites[0].bgp.local_as` must be an integer, found a string ("x")"#,
            "29:11: unknown key `hold_tme` in `sites[0].bgp.peers[0]`; did you mean `hold_time`?",
            "95:20: `groups[0].checkpoint.interval_ms` must be at least 5, found 2",
        ],
    );
}

#[test]
fn hold_time_out_of_range() {
    assert_findings(
        &edit(
            "          hold_time: 9           #",
            "          hold_time: 70000       #",
        ),
        &["29:22: `sites[0].bgp.peers[0].hold_time` must be at most 65535, found 70000"],
    );
}

#[test]
fn checkpoint_interval_under_5_ms() {
    assert_findings(
        &edit("interval_ms: 25 ", "interval_ms: 4  "),
        &["95:20: `groups[0].checkpoint.interval_ms` must be at least 5, found 4"],
    );
}

#[test]
fn missing_required_key() {
    assert_findings(
        &edit("      router_id: 10.0.1.2\n", ""),
        &["24:7: missing key `router_id` in `sites[0].bgp`"],
    );
}

#[test]
fn one_site_is_not_enough() {
    let start = EXAMPLE.find("  - name: site-b").unwrap();
    let end = EXAMPLE.find("# The prefixes that move").unwrap();
    let text = format!("{}{}", &EXAMPLE[..start], &EXAMPLE[end..]);
    assert_findings(&text, &["19:3: `sites` needs at least 2 items, found 1"]);
}

#[test]
fn enum_value_with_suggestion() {
    assert_findings(
        &edit("witness: upstream-bgp ", "witness: upstream "),
        &[
            r#"112:12: `failover.witness` must be one of `upstream-bgp`, `third-site`, `none`, found "upstream"; did you mean `upstream-bgp`?"#,
        ],
    );
}

#[test]
fn yaml_1_1_boolean() {
    assert_findings(
        &edit("enabled: true ", "enabled: yes  "),
        &[
            r#"98:18: `groups[0].checkpoint.throttle.enabled` must be a boolean, found a string ("yes") (YAML 1.2: write true or false)"#,
        ],
    );
}

#[test]
fn malformed_mac_address() {
    assert_findings(
        &edit("mac: 52:54:00:12:34:56", "mac: 52:54:00:12:34"),
        &[
            r#"92:14: `groups[0].vms[0].mac`: "52:54:00:12:34" is not a MAC address (six hex pairs like 52:54:00:12:34:56)"#,
        ],
    );
}

#[test]
fn malformed_prefix() {
    assert_findings(
        &edit(
            "  - prefix: 2001:db8:113::/48",
            "  - prefix: 2001:db8:113::/129",
        ),
        &[
            r#"76:13: `prefixes[1].prefix`: "2001:db8:113::/129" is not an IP prefix (like 203.0.113.0/24 or 2001:db8:113::/48)"#,
        ],
    );
}

#[test]
fn malformed_community() {
    assert_findings(
        &edit(
            r#"communities: ["65001:200"]"#,
            r#"communities: ["65536:200"]"#,
        ),
        &[
            r#"75:23: `prefixes[0].announce[1].communities[0]`: "65536:200" is not a BGP community (ASN:VALUE with each part 0-65535, or graceful-shutdown, no-export, no-advertise, no-export-subconfed, blackhole)"#,
        ],
    );
}

#[test]
fn malformed_name() {
    assert_findings(
        &edit("  - name: web", "  - name: Web_1"),
        &[
            r#"83:11: `groups[0].name`: "Web_1" is not a valid name (lower-case letters, digits and '-', 1 to 63 characters, not starting or ending with '-')"#,
        ],
    );
}

#[test]
fn endpoint_without_port() {
    assert_findings(
        &edit("listen: 10.0.2.2:7800", "listen: 10.0.2.2"),
        &[
            r#"58:15: `sites[1].replication.listen`: "10.0.2.2" is not an address and port (like 192.0.2.1:7800 or [2001:db8::1]:7800)"#,
        ],
    );
}

#[test]
fn malformed_router_id() {
    assert_findings(
        &edit("router_id: 10.0.2.2", "router_id: fd00::2"),
        &[r#"50:18: `sites[1].bgp.router_id`: "fd00::2" is not an IPv4 address (like 10.0.1.2)"#],
    );
}

#[test]
fn unsupported_version() {
    assert_findings(
        &edit("version: 1 ", "version: 2 "),
        &["16:10: `version` must be at most 1, found 2"],
    );
}

#[test]
fn number_too_large() {
    assert_findings(
        &edit(
            "local_as: 65001            #",
            "local_as: 99999999999999999999 #",
        ),
        &["24:17: the number 99999999999999999999 is too large"],
    );
}

#[test]
fn not_a_number() {
    assert_findings(
        &edit("misses: 5 ", "misses: .nan "),
        &["106:11: infinity and NaN are not allowed in a policy"],
    );
}

// ---- semantics ------------------------------------------------------------------------------

#[test]
fn vm_address_outside_the_group_prefix() {
    assert_findings(
        &edit("addresses: [203.0.113.10,", "addresses: [198.51.100.10,"),
        &[
            "93:21: address 198.51.100.10 of VM `redis-1` is outside group `web`'s prefixes (203.0.113.0/24, 2001:db8:113::/48)",
        ],
    );
}

#[test]
fn vm_address_is_the_network_address() {
    assert_findings(
        &edit("addresses: [203.0.113.10,", "addresses: [203.0.113.0,"),
        &["93:21: address 203.0.113.0 is the network or broadcast address of 203.0.113.0/24"],
    );
}

#[test]
fn unknown_site_with_suggestion() {
    assert_findings(
        &edit("backup: site-b  ", "backup: site-bb "),
        &["85:13: backup site `site-bb` is not a site of this policy; did you mean `site-b`?"],
    );
}

#[test]
fn primary_equals_backup() {
    assert_findings(
        &edit("backup: site-b  ", "backup: site-a  "),
        &[
            "85:13: group `web` has `site-a` as both primary and backup: the backup must be another site",
        ],
    );
}

#[test]
fn duplicate_names_and_router_ids() {
    let text = edit("  - name: site-b\n", "  - name: site-a\n").replacen(
        "router_id: 10.0.2.2",
        "router_id: 10.0.1.2",
        1,
    );
    assert_findings(
        &text,
        &[
            "44:11: duplicate site name `site-a` (first at 19:11)",
            "50:18: duplicate router id `10.0.1.2` (first at 25:18)",
            // Renaming site-b leaves everything that named it dangling; each place is reported.
            "72:15: announcing site `site-b` is not a site of this policy; did you mean `site-a`?",
            "79:15: announcing site `site-b` is not a site of this policy; did you mean `site-a`?",
            "85:13: backup site `site-b` is not a site of this policy; did you mean `site-a`?",
        ],
    );
}

#[test]
fn bgp_hold_time_of_one_or_two() {
    for bad in ["1", "2"] {
        assert_findings(
            &edit(
                "          hold_time: 9           #",
                &format!("          hold_time: {bad}           #"),
            ),
            &[&format!(
                "29:22: hold_time must be 0 or at least 3 seconds (RFC 4271 section 4.2), found {bad}"
            )],
        );
    }
}

#[test]
fn as_trans_is_not_an_as() {
    assert_findings(
        &edit(
            "local_as: 65001            #",
            "local_as: 23456            #",
        ),
        &["24:17: AS 23456 is AS_TRANS (RFC 6793), a placeholder, not an AS a site can use"],
    );
}

#[test]
fn referenced_files_must_exist() {
    let text = edit(
        "          # md5_password_file: peer-a.key",
        "          md5_password_file: peer-a.key",
    )
    .replacen(
        "      # token_file: api.token",
        "      token_file: api.token",
        1,
    )
    .replacen(
        "  # key_file: heartbeat.key",
        "  key_file: heartbeat.key",
        1,
    );
    let key_line = text
        .lines()
        .position(|l| l.starts_with("  key_file:"))
        .expect("the key_file line")
        + 1;
    assert_findings(
        &text,
        &[
            "32:30: cannot use /nonexistent-policy-dir/peer-a.key: No such file or directory (os error 2)",
            "42:19: cannot use /nonexistent-policy-dir/api.token: No such file or directory (os error 2)",
            &format!(
                "{key_line}:13: cannot use /nonexistent-policy-dir/heartbeat.key: No such file or directory (os error 2)"
            ),
        ],
    );
}

#[test]
fn prefix_with_host_bits() {
    assert_findings(
        &edit("  - prefix: 203.0.113.0/24", "  - prefix: 203.0.113.7/24"),
        &[
            "68:13: prefix 203.0.113.7/24 has host bits set; did you mean 203.0.113.0/24?",
            "86:16: prefix 203.0.113.0/24 of group `web` is not listed in `prefixes`",
        ],
    );
}

#[test]
fn group_prefix_not_announced_by_the_backup() {
    let text = edit("      - site: site-b\n        prepend: 2\n\n", "\n");
    assert_findings(
        &text,
        &[
            "84:32: group `web` runs at backup site `site-b`, but `prefixes` has no announcement of 2001:db8:113::/48 by `site-b`",
        ],
    );
}

#[test]
fn store_path_must_be_absolute() {
    assert_findings(
        &edit(
            "path: /var/lib/secondsite/store\n    api",
            "path: store\n    api",
        ),
        &["61:13: store path store must be absolute: the daemon does not run where you edit"],
    );
}

#[test]
fn multicast_mac() {
    assert_findings(
        &edit("mac: 52:54:00:12:34:56", "mac: 01:00:5e:00:00:01"),
        &["92:14: 01:00:5e:00:00:01 is not a unicast MAC address a NIC can have"],
    );
}

#[test]
fn gtsm_needs_a_directly_connected_peer() {
    assert_findings(
        &edit(
            "        - address: 10.0.2.1\n",
            "        - address: 10.9.2.1\n",
        ),
        &[
            "56:17: GTSM needs a directly connected peer, but 10.9.2.1 is on none of uplink eth0's subnets",
        ],
    );
}

#[test]
fn third_site_witness_needs_an_address() {
    assert_findings(
        &edit("witness: upstream-bgp ", "witness: third-site   "),
        &["112:12: witness `third-site` needs `third_site`, the witness's address and port"],
    );
}

// ---- warnings -------------------------------------------------------------------------------

#[test]
fn slow_heartbeat_is_a_warning() {
    let text =
        edit("interval_ms: 100 ", "interval_ms: 2000").replacen("misses: 5 ", "misses: 6 ", 1);
    assert_findings(
        &text,
        &[
            "105:16: warning: heartbeats detect a lost site after 12000 ms (2000 ms x 6 misses), later than the 9 s hold time of site-a's session with 10.0.1.1 (29:22): the upstream drops the route before the other site starts to fail over",
            "105:16: warning: heartbeats detect a lost site after 12000 ms (2000 ms x 6 misses), later than the 9 s hold time of site-b's session with 10.0.2.1 (54:22): the upstream drops the route before the other site starts to fail over",
        ],
    );
}

#[test]
fn no_witness_with_automatic_failover_is_a_warning() {
    assert_findings(
        &edit("witness: upstream-bgp ", "witness: none         "),
        &[
            "112:12: warning: automatic failover without a witness: if the sites lose sight of each other, both may run the same group (split brain)",
        ],
    );
}

#[test]
fn output_released_at_once_without_a_sync_log_is_a_warning() {
    for (log, words) in [("async", "an async"), ("off  ", "no")] {
        let text = edit("inbound_log: sync ", &format!("inbound_log: {log}")).replacen(
            "output_commit: true ",
            "output_commit: false",
            1,
        );
        assert_findings(
            &text,
            &[&format!(
                "102:20: warning: group `web` releases output at once with {words} inbound log: at failover a client may have seen a reply to a request the backup never got, so acknowledged writes can be lost (use output_commit: true, or a sync log)"
            )],
        );
    }
    // Either one alone keeps acknowledged writes: no warning.
    assert_findings(&edit("output_commit: true ", "output_commit: false"), &[]);
}

#[test]
fn api_on_a_public_address_without_token_is_a_warning() {
    assert_findings(
        &edit(
            "      listen: 127.0.0.1:7080     #",
            "      listen: 10.0.1.2:7080      #",
        ),
        &[
            "41:15: warning: the API listens on 10.0.1.2:7080 without a token_file: anyone who reaches it can fail over groups",
        ],
    );
}
