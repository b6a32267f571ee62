//! The API over a real socket on loopback, with a stand-in for the daemon's loop that answers
//! group commands.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Instant;

use super::*;

const TOKEN: &str = "s3cret";

/// The API on an ephemeral loopback port; the daemon's side answers commands for `web`:
/// a switchover is refused, a failover done; a reload finds the policy needs a restart.
fn start() -> (SocketAddr, Arc<ApiState>, tokio::runtime::Runtime) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let (tx, mut rx) = mpsc::unbounded_channel::<DaemonRequest>();
    let state = ApiState::new(Some(TOKEN.into()), tx);
    *state.status.lock().expect("status") = json!({
        "site": "site-b",
        "groups": { "web": { "state": "Standby", "term": 0 } },
    });
    let listener = runtime
        .block_on(TcpListener::bind("127.0.0.1:0"))
        .expect("binds");
    let addr = listener.local_addr().expect("an address");
    runtime.spawn(serve(listener, router(state.clone())));
    runtime.spawn(async move {
        while let Some(request) = rx.recv().await {
            let command = match request {
                DaemonRequest::Group(command) => command,
                DaemonRequest::Reload(reply) => {
                    let _ = reply.send(Err(ReloadError::NeedsRestart(vec![
                        "the heartbeats".into(),
                    ])));
                    continue;
                }
            };
            let events = (command.group == "web").then(|| match command.input {
                Input::Switchover => vec![Event::Refused {
                    command: "switchover".into(),
                    reason: "this site is the backup: ask the active site".into(),
                }],
                _ => vec![Event::TakeoverStarted {
                    term: 1,
                    planned: false,
                }],
            });
            let _ = command.reply.send(events);
        }
    });
    (addr, state, runtime)
}

/// One raw HTTP/1.1 request; the status code and the body.
fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connects");
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("writes");
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

#[test]
fn every_route_answers_and_errors_are_json_with_the_right_code() {
    let (addr, _state, _rt) = start();
    let get = |path: &str, token| request(addr, "GET", path, token, "");
    assert_eq!(get("/v1/status", None).0, 401);
    assert_eq!(get("/v1/status", Some("wrong")).0, 403);
    let (code, body) = get("/v1/status", Some(TOKEN));
    assert_eq!(code, 200);
    assert!(body.contains("site-b"), "{body}");
    assert_eq!(get("/v1/groups", Some(TOKEN)).0, 200);
    assert_eq!(get("/v1/groups/web", Some(TOKEN)).0, 200);
    let (code, body) = get("/v1/groups/nope", Some(TOKEN));
    assert_eq!(code, 404);
    assert!(body.contains("\"error\""), "{body}");
    let (code, body) = get("/v2/nothing", Some(TOKEN));
    assert_eq!(code, 404);
    assert!(body.contains("no route"), "{body}");
    let post = |path: &str, body: &str| request(addr, "POST", path, Some(TOKEN), body);
    let (code, body) = post("/v1/groups/web/failover", "{\"force\": maybe}");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("force"), "{body}");
    assert_eq!(post("/v1/groups/web/failover", "{\"force\": true}").0, 200);
    assert_eq!(post("/v1/groups/web/failover", "").0, 200);
    let (code, body) = post("/v1/groups/web/switchover", "");
    assert_eq!(code, 409, "a refusal is a conflict: {body}");
    assert!(body.contains("ask the active site"), "{body}");
    assert_eq!(post("/v1/groups/nope/switchover", "").0, 404);
    let (code, body) = post("/v1/policy/reload", "");
    assert_eq!(code, 409, "a reload that needs a restart: {body}");
    assert!(body.contains("the heartbeats"), "{body}");
}

#[test]
fn metrics_parse_as_prometheus_text() {
    let (addr, state, _rt) = start();
    let label = GroupLabel {
        group: "web".into(),
    };
    state.metrics.group_serving.get_or_create(&label).set(1);
    state.metrics.takeovers.get_or_create(&label).inc();
    let (code, body) = request(addr, "GET", "/metrics", Some(TOKEN), "");
    assert_eq!(code, 200);
    let lines = body.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text");
    let serving = scrape
        .samples
        .iter()
        .find(|s| s.metric == "secondsite_group_serving")
        .expect("the serving gauge");
    assert_eq!(serving.labels.get("group"), Some("web"));
    assert!(
        scrape
            .samples
            .iter()
            .any(|s| s.metric == "secondsite_takeovers_total"),
        "{body}"
    );
}

#[test]
fn events_arrive_in_order_as_server_sent_events() {
    let (addr, state, _rt) = start();
    let mut stream = TcpStream::connect(addr).expect("connects");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        stream,
        "GET /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
    )
    .expect("writes");
    // Sent once the subscription exists (the response head is back).
    let mut head = [0u8; 512];
    let n = stream.read(&mut head).expect("a response");
    assert!(String::from_utf8_lossy(&head[..n]).contains("text/event-stream"));
    for i in 0..5 {
        state
            .events
            .send(format!("{{\"n\":{i}}}"))
            .expect("a subscriber");
    }
    let mut seen = String::new();
    let started = Instant::now();
    while !seen.contains("{\"n\":4}") && started.elapsed() < Duration::from_secs(10) {
        let mut buf = [0u8; 1024];
        let n = stream.read(&mut buf).expect("reads");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let order: Vec<usize> = (0..5)
        .map(|i| seen.find(&format!("{{\"n\":{i}}}")).expect("each event"))
        .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{seen}");
}

#[test]
fn oversized_requests_and_a_slow_client_get_errors_and_stall_nothing() {
    let (addr, _state, _rt) = start();
    // A slowloris: headers trickle in and never end.
    let mut slow = TcpStream::connect(addr).expect("connects");
    slow.write_all(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n")
        .expect("writes");
    // Meanwhile the API answers others at once.
    let started = Instant::now();
    assert_eq!(request(addr, "GET", "/v1/status", Some(TOKEN), "").0, 200);
    assert!(started.elapsed() < Duration::from_secs(2));
    // Headers over the limit.
    let mut big = TcpStream::connect(addr).expect("connects");
    big.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let huge = "a".repeat(MAX_HEAD * 2);
    let _ = write!(
        big,
        "GET /v1/status HTTP/1.1\r\nHost: x\r\nX-Big: {huge}\r\n\r\n"
    );
    let mut response = String::new();
    let _ = big.read_to_string(&mut response);
    assert!(response.starts_with("HTTP/1.1 431"), "{:.80}", response);
    // A body over the limit.
    let body = "x".repeat(MAX_BODY + 1);
    let (code, _) = request(addr, "POST", "/v1/groups/web/failover", Some(TOKEN), &body);
    assert_eq!(code, 413);
    // The slow client is cut off once its headers are late.
    slow.set_read_timeout(Some(HEADER_TIMEOUT * 3))
        .expect("timeout");
    let mut rest = Vec::new();
    let cut = Instant::now();
    let _ = slow.read_to_end(&mut rest);
    assert!(
        cut.elapsed() < HEADER_TIMEOUT * 2,
        "the slow client was held {:?}",
        cut.elapsed()
    );
}

#[test]
fn the_openapi_document_lists_every_route_and_every_route_answers() {
    let doc: Value = serde_json::from_str(include_str!("../../../../docs/openapi.json"))
        .expect("docs/openapi.json is JSON");
    let mut documented: Vec<(String, String)> = doc["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .flat_map(|(path, methods)| {
            methods
                .as_object()
                .expect("methods")
                .keys()
                .map(move |m| (m.to_uppercase(), path.clone()))
        })
        .collect();
    documented.sort();
    let mut routes: Vec<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    routes.sort();
    assert_eq!(documented, routes);
    let (addr, _state, _rt) = start();
    for (method, path) in ROUTES {
        if path == "/v1/events" {
            continue; // a stream: the SSE test reads it
        }
        let path = path.replace("{group}", "web");
        let (_, body) = request(addr, method, &path, Some(TOKEN), "");
        assert!(!body.contains("no route"), "{method} {path}: {body}");
    }
}
