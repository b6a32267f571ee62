//! The site daemon's HTTP API (axum on hyper, HTTP/1.1), described in `docs/openapi.yaml`.
//!
//! ```text
//!  GET  /v1/status  /v1/groups  /v1/groups/{g}    the daemon's status (refreshed each interval)
//!  GET  /v1/events                                the journal's events as they happen (SSE)
//!  GET  /metrics                                  Prometheus text
//!  POST /v1/groups/{g}/switchover                 ──┐ a command to the group's failover
//!  POST /v1/groups/{g}/failover  {"force": bool}  ──┘ machine, answered with its events
//!  POST /v1/policy/reload                         the policy file read again: what changed
//!                                                 (200), why nothing did (400 invalid, 409
//!                                                 needs a restart)
//! ```
//! A bearer token (the policy's `api.token_file`) guards every route: 401 without it, 403 with
//! another. Errors are `{"error": "..."}`. Headers over 16 KiB get 431, a body over 64 KiB 413,
//! a request not answered in 10 s 408, and a client that takes over 5 s to send its headers
//! (slowloris) is disconnected; none of them holds up the daemon.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, oneshot};
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;

use super::failover::{Event, Input, Timeline};
use super::reload::{Changes, ReloadError};

/// Largest request body.
pub const MAX_BODY: usize = 64 * 1024;
/// Largest request head (hyper's read buffer).
pub const MAX_HEAD: usize = 16 * 1024;
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A command for a group's failover machine, and where its answer goes.
#[derive(Debug)]
pub struct GroupCommand {
    pub group: String,
    pub input: Input,
    pub reply: oneshot::Sender<Option<Vec<Event>>>,
}

/// What the API asks of the daemon's loop.
#[derive(Debug)]
pub enum DaemonRequest {
    Group(GroupCommand),
    /// Read the policy file again and apply what changed.
    Reload(oneshot::Sender<Result<Changes, ReloadError>>),
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabel {
    pub group: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabel {
    pub group: String,
    pub step: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PathLabel {
    pub path: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabel {
    pub peer: String,
}

/// The daemon's metrics; the daemon sets them, `/metrics` encodes them.
#[derive(Debug, Default)]
pub struct Metrics {
    pub group_serving: Family<GroupLabel, Gauge>,
    pub group_term: Family<GroupLabel, Gauge>,
    pub takeovers: Family<GroupLabel, Counter>,
    pub takeover_step_ms: Family<StepLabel, Gauge<f64, AtomicU64>>,
    pub epochs_committed: Family<GroupLabel, Gauge>,
    pub pause_p99_us: Family<GroupLabel, Gauge>,
    pub commit_p99_us: Family<GroupLabel, Gauge>,
    pub bytes_replicated: Family<GroupLabel, Gauge>,
    pub output_frames_held: Family<GroupLabel, Gauge>,
    pub log_lag_frames: Family<GroupLabel, Gauge>,
    pub heartbeat_path_up: Family<PathLabel, Gauge>,
    pub heartbeat_rtt_us: Family<PathLabel, Gauge>,
    pub heartbeats_received: Family<PathLabel, Gauge>,
    pub heartbeats_lost: Family<PathLabel, Gauge>,
    pub heartbeats_refused: Family<ReasonLabel, Gauge>,
    pub bgp_session_up: Family<PeerLabel, Gauge>,
    pub policy_reloads: Family<ResultLabel, Counter>,
}

impl Metrics {
    /// The steps of group `group`'s last takeover (those that happened).
    pub fn set_takeover_steps(&self, group: &str, t: &Timeline) {
        let steps = [
            ("suspicion", t.suspicion_ms),
            ("witness_confirmed", t.witness_confirmed_ms),
            ("restore_start", Some(t.restore_start_ms)),
            ("announce_sent", Some(t.announce_sent_ms)),
            ("vm_serving", t.vm_serving_ms),
            ("replay_done", t.replay_done_ms),
            ("first_frame_out", t.first_frame_out_ms),
        ];
        for (step, ms) in steps {
            let label = StepLabel {
                group: group.to_owned(),
                step: step.to_owned(),
            };
            match ms {
                Some(ms) => {
                    self.takeover_step_ms.get_or_create(&label).set(ms);
                }
                None => {
                    self.takeover_step_ms.remove(&label);
                }
            }
        }
    }

    fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("secondsite");
        r.register(
            "group_serving",
            "The group runs at this site (1) or not (0)",
            self.group_serving.clone(),
        );
        r.register(
            "group_term",
            "The group's failover term as this site knows it",
            self.group_term.clone(),
        );
        r.register(
            "takeovers",
            "Takeovers of the group by this site",
            self.takeovers.clone(),
        );
        r.register(
            "takeover_step_ms",
            "The last takeover here: each step, in ms from its first sign (suspicion)",
            self.takeover_step_ms.clone(),
        );
        r.register(
            "epochs_committed",
            "Epochs of the group the backup has committed",
            self.epochs_committed.clone(),
        );
        r.register(
            "pause_p99_us",
            "Checkpoint pause, 99th percentile of recent ones, in us",
            self.pause_p99_us.clone(),
        );
        r.register(
            "commit_p99_us",
            "From a checkpoint's request to the backup's acknowledgement, 99th percentile of \
             recent ones, in us: what held output waits beyond its epoch",
            self.commit_p99_us.clone(),
        );
        r.register(
            "bytes_replicated",
            "Bytes of checkpoints sent",
            self.bytes_replicated.clone(),
        );
        r.register(
            "output_frames_held",
            "Output frames held until their epoch commits",
            self.output_frames_held.clone(),
        );
        r.register(
            "log_lag_frames",
            "Inbound frames logged and not yet acknowledged",
            self.log_lag_frames.clone(),
        );
        r.register(
            "heartbeat_path_up",
            "A valid heartbeat arrived on the path within the detection time",
            self.heartbeat_path_up.clone(),
        );
        r.register(
            "heartbeat_rtt_us",
            "The path's last round trip, in us",
            self.heartbeat_rtt_us.clone(),
        );
        r.register(
            "heartbeats_received",
            "Valid heartbeats received on the path",
            self.heartbeats_received.clone(),
        );
        r.register(
            "heartbeats_lost",
            "Heartbeats the other site sent on the path that never arrived",
            self.heartbeats_lost.clone(),
        );
        r.register(
            "heartbeats_refused",
            "Heartbeats refused, by reason",
            self.heartbeats_refused.clone(),
        );
        r.register(
            "bgp_session_up",
            "The BGP session with the upstream is established",
            self.bgp_session_up.clone(),
        );
        r.register(
            "policy_reloads",
            "Policy reloads, by result (applied, invalid, needs_restart)",
            self.policy_reloads.clone(),
        );
        r
    }
}

/// What the handlers share with the daemon.
#[derive(Debug)]
pub struct ApiState {
    pub token: Option<String>,
    /// The daemon's status, refreshed each heartbeat interval.
    pub status: Mutex<Value>,
    /// Journal entries as they are written.
    pub events: broadcast::Sender<String>,
    pub metrics: Metrics,
    pub commands: mpsc::UnboundedSender<DaemonRequest>,
}

impl ApiState {
    pub fn new(
        token: Option<String>,
        commands: mpsc::UnboundedSender<DaemonRequest>,
    ) -> Arc<ApiState> {
        Arc::new(ApiState {
            token,
            status: Mutex::new(Value::Null),
            events: broadcast::channel(1024).0,
            metrics: Metrics::default(),
            commands,
        })
    }

    fn status(&self) -> Value {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": message.into() }))).into_response()
}

/// Byte strings compared in constant time (the token).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn auth(State(state): State<Arc<ApiState>>, request: Request, next: Next) -> Response {
    if let Some(token) = &state.token {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match given {
            None => {
                return error(
                    StatusCode::UNAUTHORIZED,
                    "a bearer token is required (Authorization: Bearer TOKEN)",
                );
            }
            Some(given) if !same(given.as_bytes(), token.as_bytes()) => {
                return error(StatusCode::FORBIDDEN, "the token is not this site's");
            }
            Some(_) => {}
        }
    }
    next.run(request).await
}

async fn get_status(State(state): State<Arc<ApiState>>) -> Response {
    axum::Json(state.status()).into_response()
}

async fn get_groups(State(state): State<Arc<ApiState>>) -> Response {
    axum::Json(state.status()["groups"].clone()).into_response()
}

async fn get_group(State(state): State<Arc<ApiState>>, Path(group): Path<String>) -> Response {
    let status = state.status();
    match status["groups"].get(&group) {
        Some(g) => axum::Json(g.clone()).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            format!("no group {group:?} at this site"),
        ),
    }
}

/// Sends `input` to `group`'s machine; 200 with its events, 409 if it refused.
async fn command(state: &ApiState, group: String, input: Input) -> Response {
    let (reply, answer) = oneshot::channel();
    let sent = state.commands.send(DaemonRequest::Group(GroupCommand {
        group: group.clone(),
        input,
        reply,
    }));
    if sent.is_err() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the daemon is stopping");
    }
    match answer.await {
        Ok(Some(events)) => {
            if let Some(Event::Refused { reason, .. }) =
                events.iter().find(|e| matches!(e, Event::Refused { .. }))
            {
                return error(StatusCode::CONFLICT, reason.clone());
            }
            axum::Json(json!({ "group": group, "events": events })).into_response()
        }
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            format!("no group {group:?} at this site"),
        ),
        Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "the daemon is stopping"),
    }
}

async fn post_switchover(
    State(state): State<Arc<ApiState>>,
    Path(group): Path<String>,
) -> Response {
    command(&state, group, Input::Switchover).await
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FailoverBody {
    #[serde(default)]
    force: bool,
}

async fn post_failover(
    State(state): State<Arc<ApiState>>,
    Path(group): Path<String>,
    body: Bytes,
) -> Response {
    let force = if body.iter().all(u8::is_ascii_whitespace) {
        false
    } else {
        match serde_json::from_slice::<FailoverBody>(&body) {
            Ok(b) => b.force,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("the body must be {{\"force\": true|false}}: {e}"),
                );
            }
        }
    };
    command(&state, group, Input::Failover { force }).await
}

async fn post_reload(State(state): State<Arc<ApiState>>) -> Response {
    let (reply, answer) = oneshot::channel();
    if state.commands.send(DaemonRequest::Reload(reply)).is_err() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the daemon is stopping");
    }
    match answer.await {
        Ok(Ok(changes)) => axum::Json(json!({ "changes": changes })).into_response(),
        Ok(Err(e @ ReloadError::Invalid(_))) => error(StatusCode::BAD_REQUEST, e.to_string()),
        Ok(Err(e @ ReloadError::NeedsRestart(_))) => error(StatusCode::CONFLICT, e.to_string()),
        Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "the daemon is stopping"),
    }
}

async fn get_events(State(state): State<Arc<ApiState>>) -> Response {
    let receiver = state.events.subscribe();
    let stream = futures_util::stream::unfold(receiver, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(line) => {
                    return Some((
                        Ok::<_, std::convert::Infallible>(SseEvent::default().data(line)),
                        rx,
                    ));
                }
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

async fn get_metrics(State(state): State<Arc<ApiState>>) -> Response {
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &state.metrics.registry())
    {
        return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    }
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
    );
    (headers, text).into_response()
}

async fn not_found(request: Request) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!("no route {} {}", request.method(), request.uri().path()),
    )
}

/// Every route, as `docs/openapi.json` documents it (a test holds the two together).
pub const ROUTES: [(&str, &str); 8] = [
    ("GET", "/v1/status"),
    ("GET", "/v1/groups"),
    ("GET", "/v1/groups/{group}"),
    ("POST", "/v1/groups/{group}/switchover"),
    ("POST", "/v1/groups/{group}/failover"),
    ("GET", "/v1/events"),
    ("POST", "/v1/policy/reload"),
    ("GET", "/metrics"),
];

/// The API's routes, with its limits and its token check.
pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/v1/status", get(get_status))
        .route("/v1/groups", get(get_groups))
        .route("/v1/groups/{group}", get(get_group))
        .route("/v1/groups/{group}/switchover", post(post_switchover))
        .route("/v1/groups/{group}/failover", post(post_failover))
        .route("/v1/events", get(get_events))
        .route("/v1/policy/reload", post(post_reload))
        .route("/metrics", get(get_metrics))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .layer(RequestBodyLimitLayer::new(MAX_BODY))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
        .with_state(state)
}

/// Serves `router` on `listener`: one task per connection, HTTP/1.1 with the header limits.
pub async fn serve(listener: TcpListener, router: Router) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_HEAD)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests;
