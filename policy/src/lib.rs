//! # secondsite-policy
//!
//! One YAML file describes a whole secondsite deployment: the sites and their BGP sessions, the
//! prefixes that move between them, the protected groups of VMs with their checkpoint settings,
//! heartbeats and failover rules. This crate reads it, checks it, and explains it.
//!
//! ```text
//!  bytes ──source──> text ──yaml──> Node tree (marks) ──source_map──> JSON + pointer→line:col
//!                                                                         │
//!                       schema (from the Rust types) ── check_structure ──┤ all shape errors
//!                                                                         │
//!                                        serde (Policy) ──── validate ────┤ semantic errors
//!                                                                         ▼
//!                                                      Report { policy, diagnostics }
//! ```
//!
//! Every finding is a [`Diagnostic`] printed as `FILE:LINE:COL: message`. Parsing never panics
//! and is bounded (size, depth, alias expansion), so a hostile file gets an error, fast.
//!
//! Main entry points: [`check_file`], [`check_str`], [`json_schema`], [`explain`].

#![forbid(unsafe_code)]

pub mod diagnostic;
mod explain;
pub mod model;
mod schema;
pub mod source;
mod source_map;
mod suggest;
mod validate;
pub mod yaml;

use std::path::Path;

pub use diagnostic::{Diagnostic, Mark, Severity};
pub use explain::{count, explain};
pub use model::Policy;
pub use schema::json_schema;

/// The outcome of checking one policy: the policy when it has no errors, and every finding.
#[derive(Debug)]
pub struct Report {
    /// The policy, present exactly when no diagnostic is an error.
    pub policy: Option<Policy>,
    /// Errors and warnings, sorted by position.
    pub diagnostics: Vec<Diagnostic>,
}

impl Report {
    pub fn error_count(&self) -> usize {
        self.diagnostics.iter().filter(|d| d.is_error()).count()
    }

    pub fn warning_count(&self) -> usize {
        self.diagnostics.len() - self.error_count()
    }

    fn failed(diagnostics: Vec<Diagnostic>) -> Self {
        let mut diagnostics = diagnostics;
        diagnostic::sort_and_dedup(&mut diagnostics);
        Report {
            policy: None,
            diagnostics,
        }
    }
}

/// Reads and checks the policy file at `path`; relative file names inside it are taken from the
/// file's own directory.
pub fn check_file(path: &Path) -> Report {
    match source::read_policy_text(path) {
        Ok(text) => check_str(&text, path.parent().unwrap_or(Path::new("."))),
        Err(d) => Report::failed(vec![d]),
    }
}

/// Checks policy text; relative file names inside it are taken from `base_dir`.
pub fn check_str(text: &str, base_dir: &Path) -> Report {
    let parsed = match yaml::parse(text) {
        Ok(parsed) => parsed,
        Err(d) => return Report::failed(vec![d]),
    };
    let mut diagnostics = parsed.diagnostics;
    let (value, map, conversion) = source_map::to_json(&parsed.root);
    // A value that could not be converted (NaN) is already reported; its type error is noise.
    let structure = schema::check_structure(&value, &map)
        .into_iter()
        .filter(|d| !conversion.iter().any(|c| c.mark == d.mark));
    diagnostics.extend(structure);
    diagnostics.extend(conversion);
    if diagnostics.iter().any(Diagnostic::is_error) {
        return Report::failed(diagnostics);
    }
    // The schema passed, so serde should too; if it does not, its error is still located.
    let policy: Policy = match serde_path_to_error::deserialize(&value) {
        Ok(policy) => policy,
        Err(e) => {
            let pointer = path_to_pointer(e.path());
            diagnostics.push(Diagnostic::error(
                map.value(&pointer),
                format!("`{}`: {}", e.path(), e.inner()),
            ));
            return Report::failed(diagnostics);
        }
    };
    diagnostics.extend(validate::validate(&policy, &map, base_dir));
    diagnostic::sort_and_dedup(&mut diagnostics);
    let ok = !diagnostics.iter().any(Diagnostic::is_error);
    Report {
        policy: ok.then_some(policy),
        diagnostics,
    }
}

/// The policy text as plain JSON (YAML parsed, aliases and merge keys expanded), unchecked:
/// what the JSON Schema validates. Any YAML file reads so (the lab's containerlab topology).
pub fn yaml_to_json(text: &str) -> Result<serde_json::Value, Diagnostic> {
    let parsed = yaml::parse(text)?;
    let (value, _, mut errors) = source_map::to_json(&parsed.root);
    match errors.pop() {
        Some(e) => Err(e),
        None => Ok(value),
    }
}

fn path_to_pointer(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut pointer = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => {
                pointer = source_map::pointer_push(&pointer, &index.to_string())
            }
            Segment::Map { key } => pointer = source_map::pointer_push(&pointer, key),
            Segment::Enum { .. } | Segment::Unknown => {}
        }
    }
    pointer
}
