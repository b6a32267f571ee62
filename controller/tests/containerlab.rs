//! `containerlab/secondsite.clab.yml`, the topology both containerlab and `secondsite lab` build:
//! valid against containerlab's own JSON schema (`../shared/containerlab/clab.schema.json`; the
//! test says it skipped when that is absent), with the nodes, links and files the lab expects,
//! and a policy beside it that `policy check` accepts.

use std::path::{Path, PathBuf};

use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .to_owned()
}

fn topology() -> Value {
    let file = repo().join("containerlab/secondsite.clab.yml");
    let text = std::fs::read_to_string(&file).expect("the topology file");
    secondsite_policy::yaml_to_json(&text)
        .unwrap_or_else(|d| panic!("{}", d.render(&file.display().to_string())))
}

#[test]
fn the_topology_is_valid_against_containerlabs_schema() {
    let schema_file = repo().join("../shared/containerlab/clab.schema.json");
    let Ok(schema) = std::fs::read_to_string(&schema_file) else {
        secondsite_lab::skip(
            "the_topology_is_valid_against_containerlabs_schema",
            &format!("{} is absent", schema_file.display()),
        );
        return;
    };
    let schema: Value = serde_json::from_str(&schema).expect("the schema is JSON");
    let validator = jsonschema::validator_for(&schema).expect("the schema compiles");
    let topology = topology();
    let errors: Vec<String> = validator
        .iter_errors(&topology)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect();
    assert!(errors.is_empty(), "{errors:#?}");
    // The schema does catch a topology containerlab would refuse.
    let mut broken = topology;
    broken["topology"]["nodes"]["site-a"]["privileged"] = Value::from("yes please");
    broken["topology"]["links"][0]["endpoints"] = Value::from(7);
    assert_eq!(validator.iter_errors(&broken).count(), 2);
}

#[test]
fn the_topology_has_the_nodes_links_and_files_the_lab_builds() {
    let topology = topology();
    let nodes = topology["topology"]["nodes"].as_object().expect("nodes");
    let role = |node: &str| nodes[node]["labels"]["secondsite.role"].as_str();
    assert_eq!(role("upstream"), Some("upstream"));
    assert_eq!(role("site-a"), Some("site"));
    assert_eq!(role("site-b"), Some("site"));
    assert_eq!(role("client"), Some("client"));
    let links: Vec<Vec<&str>> = topology["topology"]["links"]
        .as_array()
        .expect("links")
        .iter()
        .map(|l| {
            l["endpoints"]
                .as_array()
                .expect("endpoints")
                .iter()
                .filter_map(Value::as_str)
                .collect()
        })
        .collect();
    assert!(
        links.contains(&vec!["site-a:eth2", "site-b:eth2"]),
        "the WAN link: {links:?}"
    );
    // Every bound file is beside the topology (directories are made when the lab comes up).
    for (name, node) in nodes {
        for bind in node["binds"].as_array().into_iter().flatten() {
            let source = bind
                .as_str()
                .and_then(|b| b.split(':').next())
                .expect("SRC:DST");
            let path = repo().join("containerlab").join(source);
            let is_dir_bind = nodes.contains_key(source);
            assert!(
                is_dir_bind || path.is_file(),
                "{name}: {} is missing",
                path.display()
            );
        }
    }
    // Each site starts `secondsite run` from the policy kept next to the topology.
    for site in ["site-a", "site-b"] {
        let exec: Vec<&str> = nodes[site]["exec"]
            .as_array()
            .expect("exec")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(
            exec.iter().any(|line| line.contains(&format!(
                "secondsite run --policy /etc/secondsite/secondsite.yaml --site {site}"
            ))),
            "{exec:?}"
        );
    }
}

#[test]
fn the_policy_beside_the_topology_checks() {
    let report = secondsite_policy::check_file(&repo().join("containerlab/secondsite.yaml"));
    assert!(report.policy.is_some(), "{:?}", report.diagnostics);
}
