//! The CLI verbs that are clients of the site daemon's API: `status`, `events`,
//! `group switchover|failover`, `policy reload`.

use std::io::BufRead;
use std::process::ExitCode;

use anyhow::Context;
use secondsite::site::plan::read_secret;

use crate::cli::ApiArgs;

/// A request to the API; prints the answer (pretty JSON); fails on an error status.
fn call(api: &ApiArgs, method: &str, path: &str, body: Option<&str>) -> anyhow::Result<ExitCode> {
    let agent = agent();
    let url = format!("{}{path}", api.api.trim_end_matches('/'));
    let token = token(api)?;
    let mut response = match method {
        "POST" => {
            let mut request = agent.post(&url);
            if let Some(t) = &token {
                request = request.header("Authorization", &format!("Bearer {t}"));
            }
            request.send(body.unwrap_or(""))
        }
        _ => {
            let mut request = agent.get(&url);
            if let Some(t) = &token {
                request = request.header("Authorization", &format!("Bearer {t}"));
            }
            request.call()
        }
    }
    .with_context(|| format!("cannot reach the site daemon at {}", api.api))?;
    let status = response.status();
    let text = response.body_mut().read_to_string().unwrap_or_default();
    let shown = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or(text);
    if status.is_success() {
        outln!("{shown}");
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("secondsite: {} {path}: {status}: {shown}", method);
        Ok(ExitCode::FAILURE)
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

fn token(api: &ApiArgs) -> anyhow::Result<Option<String>> {
    Ok(match &api.token_file {
        Some(file) => Some(String::from_utf8_lossy(&read_secret(file)?).into_owned()),
        None => None,
    })
}

pub fn status(api: &ApiArgs) -> anyhow::Result<ExitCode> {
    call(api, "GET", "/v1/status", None)
}

pub fn switchover(api: &ApiArgs, group: &str) -> anyhow::Result<ExitCode> {
    call(api, "POST", &format!("/v1/groups/{group}/switchover"), None)
}

pub fn failover(api: &ApiArgs, group: &str, force: bool) -> anyhow::Result<ExitCode> {
    let body = serde_json::json!({ "force": force }).to_string();
    call(
        api,
        "POST",
        &format!("/v1/groups/{group}/failover"),
        Some(&body),
    )
}

pub fn reload(api: &ApiArgs) -> anyhow::Result<ExitCode> {
    call(api, "POST", "/v1/policy/reload", None)
}

/// Follows `/v1/events`: each event's data on a line of its own.
pub fn events(api: &ApiArgs) -> anyhow::Result<ExitCode> {
    let url = format!("{}/v1/events", api.api.trim_end_matches('/'));
    let mut request = agent().get(&url);
    if let Some(t) = token(api)? {
        request = request.header("Authorization", &format!("Bearer {t}"));
    }
    let mut response = request
        .call()
        .with_context(|| format!("cannot reach the site daemon at {}", api.api))?;
    if !response.status().is_success() {
        let text = response.body_mut().read_to_string().unwrap_or_default();
        eprintln!("secondsite: GET /v1/events: {}: {text}", response.status());
        return Ok(ExitCode::FAILURE);
    }
    let reader = std::io::BufReader::new(response.body_mut().as_reader());
    for line in reader.lines() {
        let line = line.context("the event stream")?;
        if let Some(data) = line.strip_prefix("data:") {
            outln!("{}", data.trim_start());
        }
    }
    Ok(ExitCode::SUCCESS)
}
