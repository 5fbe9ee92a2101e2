//! Supervise end to end on host loopback: a hyper server on 127.0.0.1
//! routing `/mcp/<token>` to `Supervise::handle` (as the gate's listener
//! does), an HTTP client speaking MCP's JSON-RPC over streamable HTTP, and
//! the real `bottle supervise` binary deciding. What the egress proxy would
//! allow is asked through `ExtraEgress`, as the proxy asks it.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bottle::gate::config::AgentCredentials;
use bottle::gate::http::BoxError;
use bottle::gate::log::GateLog;
use bottle::gate::paths::GatePaths;
use bottle::gate::supervise::Supervise;
use bottle::gate::supervise::store::{Store, now};
use bottle::gate::{AgentIdentity, ExtraEgress};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

const PROJECT: &str = "sv";
const CODER: &str = "CoderMcpToken0123456789abcdefghi";
const OTHER: &str = "OtherMcpToken0123456789abcdefghi";
/// Every network wait is bounded by this.
const LIMIT: Duration = Duration::from_secs(20);

struct Gate {
    state: tempfile::TempDir,
    paths: GatePaths,
    supervise: Arc<Supervise>,
    addr: SocketAddr,
    runtime: tokio::runtime::Runtime,
}

fn agents() -> BTreeMap<String, AgentCredentials> {
    [("coder", CODER), ("other", OTHER)]
        .into_iter()
        .map(|(name, token)| {
            (
                name.to_owned(),
                AgentCredentials {
                    mcp_token: token.to_owned(),
                    ..Default::default()
                },
            )
        })
        .collect()
}

fn who(agent: &str) -> AgentIdentity {
    AgentIdentity {
        bottle: "dev".into(),
        agent: agent.into(),
    }
}

impl Gate {
    fn start() -> Self {
        let state = tempfile::tempdir().unwrap();
        let paths = GatePaths::new(state.path(), PROJECT);
        std::fs::create_dir_all(&paths.dir).unwrap();
        let log = Arc::new(GateLog::open(&paths.log()).unwrap());
        let supervise = Arc::new(Supervise::new(&paths, log));
        supervise.configure("dev", &agents(), &["api.anthropic.com".to_owned()]);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let served = supervise.clone();
        runtime.spawn(async move {
            // A bounded number of connections: the tests make far fewer.
            for _ in 0..500 {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let supervise = served.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let supervise = supervise.clone();
                            async move {
                                let path = req.uri().path().to_owned();
                                let req =
                                    req.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed());
                                // The listener's routing: /mcp/<token> on bottle "dev".
                                let response = match path.strip_prefix("/mcp/") {
                                    Some(token) => supervise.handle("dev", token, req).await,
                                    None => {
                                        bottle::gate::http::text(http::StatusCode::NOT_FOUND, "no")
                                    }
                                };
                                Ok::<_, std::convert::Infallible>(response)
                            }
                        },
                    );
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                });
            }
        });
        Self {
            state,
            paths,
            supervise,
            addr,
            runtime,
        }
    }

    /// POST `body` to `/mcp/<token>`: status and body.
    fn post_raw(&self, token: &str, body: Vec<u8>) -> (u16, String) {
        self.post_as(token, body, None)
    }

    /// [`Gate::post_raw`] with another `Host` header.
    fn post_as(&self, token: &str, body: Vec<u8>, host: Option<&str>) -> (u16, String) {
        let uri = format!("http://{}/mcp/{token}", self.addr);
        self.runtime.block_on(async {
            tokio::time::timeout(LIMIT, async {
                let client = hyper_util::client::legacy::Client::builder(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .build_http::<Full<Bytes>>();
                let mut request = http::Request::post(uri)
                    .header("content-type", "application/json")
                    .header("accept", "application/json, text/event-stream")
                    .header("mcp-protocol-version", "2025-06-18")
                    .body(Full::new(Bytes::from(body)))
                    .unwrap();
                if let Some(host) = host {
                    request
                        .headers_mut()
                        .insert("host", http::HeaderValue::from_str(host).unwrap());
                }
                let response = client.request(request).await.unwrap();
                let status = response.status().as_u16();
                let bytes = response.into_body().collect().await.unwrap().to_bytes();
                (status, String::from_utf8_lossy(&bytes).into_owned())
            })
            .await
            .expect("the endpoint answers in time")
        })
    }

    /// One JSON-RPC request; the parsed answer.
    fn rpc(&self, token: &str, method: &str, params: Value) -> Value {
        let body = json!({"jsonrpc": "2.0", "id": 7, "method": method, "params": params});
        let (status, text) = self.post_raw(token, body.to_string().into_bytes());
        assert_eq!(status, 200, "{method}: {text}");
        let value: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert_eq!(value["id"], 7, "{text}");
        value
    }

    /// `tools/call`: (is_error, structured or text content).
    fn call(&self, token: &str, tool: &str, arguments: Value) -> (bool, Value) {
        let answer = self.rpc(
            token,
            "tools/call",
            json!({"name": tool, "arguments": arguments}),
        );
        let result = &answer["result"];
        let is_error = result["isError"].as_bool().unwrap_or(false);
        let content = if result["structuredContent"].is_null() {
            result["content"][0]["text"].clone()
        } else {
            result["structuredContent"].clone()
        };
        (is_error, content)
    }

    fn bottle(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_bottle"))
            .arg("--state-dir")
            .arg(self.state.path())
            .args(args)
            .env_remove("BOTTLE_STATE_DIR")
            .env("NO_COLOR", "1")
            .output()
            .unwrap()
    }

    fn list_json(&self) -> Vec<Value> {
        let out = self.bottle(&["supervise", "--project", PROJECT, "--json"]);
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn log_lines(&self) -> Vec<Value> {
        std::fs::read_to_string(self.paths.log())
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

fn text(out: &std::process::Output) -> String {
    format!(
        "exit: {}\n--- stdout\n{}--- stderr\n{}",
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Snapshot `$value` with the request ids in `$ids` (random) as `[ID]`.
macro_rules! snapshot {
    ($name:expr, $value:expr, $ids:expr) => {{
        let mut value: String = $value;
        for id in $ids {
            value = value.replace(id.as_str(), "[ID]");
        }
        let mut settings = insta::Settings::clone_current();
        settings.add_filter(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} UTC", "[TIME]");
        settings.add_filter(r"\b\d+[smhd] left", "[LEFT] left");
        settings.add_filter(r" \d+s   ", " [AGE]   ");
        settings.bind(|| insta::assert_snapshot!($name, value));
    }};
}

#[test]
fn an_agent_asks_the_operator_decides_and_only_that_agent_gets_through() {
    let gate = Gate::start();

    // The MCP handshake, as Claude Code's client does it.
    let init = gate.rpc(
        CODER,
        "initialize",
        json!({"protocolVersion": "2025-06-18", "capabilities": {},
               "clientInfo": {"name": "claude-code", "version": "2.0.0"}}),
    );
    assert_eq!(init["result"]["serverInfo"]["name"], "bottle-supervise");
    assert!(
        init["result"]["capabilities"]["tools"].is_object(),
        "{init}"
    );
    let (status, _) = gate.post_raw(
        CODER,
        br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#.to_vec(),
    );
    assert_eq!(status, 202);
    let tools = gate.rpc(CODER, "tools/list", json!({}));
    let names: Vec<&str> = tools["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "list_egress",
            "request_egress",
            "request_status",
            "message_operator"
        ]
    );

    // Not allowed, not granted.
    assert!(!gate.supervise.allows(&who("coder"), "example.org", 443));

    // The agent asks; what it wrote cannot drive the operator's terminal.
    let (is_error, asked) = gate.call(
        CODER,
        "request_egress",
        json!({"host": "Example.org", "reason": "read the docs\u{1b}[2J\nplease"}),
    );
    assert!(!is_error, "{asked}");
    assert_eq!(asked["state"], "pending");
    assert_eq!(asked["host"], "example.org");
    let id = asked["id"].as_str().unwrap().to_owned();

    // A host the manifest allows needs no request.
    let (_, declared) = gate.call(
        CODER,
        "request_egress",
        json!({"host": "api.anthropic.com", "reason": "x"}),
    );
    assert_eq!(declared["state"], "declared");
    // A malformed host is refused with the grammar's help.
    let (is_error, bad) = gate.call(
        CODER,
        "request_egress",
        json!({"host": "https://example.org/x", "reason": "x"}),
    );
    assert!(is_error);
    assert!(
        bad.as_str().unwrap().contains("is a URL, not a host"),
        "{bad}"
    );

    let (_, message) = gate.call(
        CODER,
        "message_operator",
        json!({"text": "stuck on\ttests"}),
    );
    let message_id = message["id"].as_str().unwrap().to_owned();
    let ids = [id.clone(), message_id];

    // The operator sees it.
    let listed = gate.list_json();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(listed[0]["id"], id.as_str());
    assert_eq!(listed[0]["agent"], "coder");
    assert_eq!(listed[0]["host"], "example.org");
    assert_eq!(listed[0]["reason"], "read the docs\u{1b}[2J\nplease");
    assert_eq!(listed[0]["state"], "pending");
    assert_eq!(listed[1]["kind"], "message");
    let table = gate.bottle(&["supervise", "--project", PROJECT]);
    snapshot!("list_pending", text(&table), &ids);

    // The second agent cannot see or answer the first one's requests.
    let (is_error, answer) = gate.call(OTHER, "request_status", json!({"id": id}));
    assert!(is_error);
    assert!(answer.as_str().unwrap().contains("no request"), "{answer}");
    let (_, theirs) = gate.call(OTHER, "list_egress", json!({}));
    assert_eq!(theirs["pending"], json!([]));
    assert_eq!(theirs["declared"], json!(["api.anthropic.com"]));
    let (_, mine) = gate.call(CODER, "list_egress", json!({}));
    assert_eq!(mine["pending"][0]["id"], id.as_str());

    // Still refused before approval; approved: for that agent only.
    assert!(!gate.supervise.allows(&who("coder"), "example.org", 443));
    let approve = gate.bottle(&[
        "supervise",
        "approve",
        &id,
        "--project",
        PROJECT,
        "--for",
        "2h",
    ]);
    snapshot!("approve", text(&approve), &ids);
    assert!(gate.supervise.allows(&who("coder"), "example.org", 443));
    assert!(gate.supervise.allows(&who("coder"), "example.org", 80));
    assert!(!gate.supervise.allows(&who("coder"), "example.org", 8443));
    assert!(!gate.supervise.allows(&who("coder"), "www.example.org", 443));
    assert!(!gate.supervise.allows(&who("other"), "example.org", 443));
    let (_, status) = gate.call(CODER, "request_status", json!({"id": id}));
    assert_eq!(status["state"], "approved");
    assert!(status["until"].as_u64().unwrap() > now() + 3600);
    let (_, mine) = gate.call(CODER, "list_egress", json!({}));
    assert_eq!(mine["granted"][0]["host"], "example.org");

    // Deciding twice is an error that says what to do.
    let again = gate.bottle(&["supervise", "approve", &id, "--project", PROJECT]);
    snapshot!("approve_again", text(&again), &ids);
    let unknown = gate.bottle(&["supervise", "deny", "zzzzzz", "--project", PROJECT]);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no supervise request `zzzzzz`"));

    // Revoke closes it again.
    let revoke = gate.bottle(&["supervise", "revoke", &id, "--project", PROJECT]);
    assert!(revoke.status.success(), "{revoke:?}");
    assert!(!gate.supervise.allows(&who("coder"), "example.org", 443));
    let (_, status) = gate.call(CODER, "request_status", json!({"id": id}));
    assert_eq!(status["state"], "revoked");

    // Every request and decision is in the gate log.
    let log = gate.log_lines();
    let events: Vec<(&str, &str)> = log
        .iter()
        .filter(|l| l["kind"] == "supervise")
        .filter_map(|l| Some((l["event"].as_str()?, l["agent"].as_str().unwrap_or(""))))
        .collect();
    assert!(events.contains(&("request_egress", "coder")), "{events:?}");
    assert!(events.contains(&("decision", "coder")), "{events:?}");
    assert!(
        events.contains(&("message_operator", "coder")),
        "{events:?}"
    );
    assert!(events.contains(&("grant_used", "coder")), "{events:?}");
    let decisions: Vec<&str> = log
        .iter()
        .filter(|l| l["event"] == "decision")
        .map(|l| l["state"].as_str().unwrap())
        .collect();
    assert_eq!(decisions, ["approved", "revoked"]);
    // No token is ever logged.
    let raw = std::fs::read_to_string(gate.paths.log()).unwrap();
    assert!(!raw.contains(CODER) && !raw.contains(OTHER));
}

#[test]
fn a_grant_expires_on_its_own_and_declaring_the_host_retires_it() {
    let gate = Gate::start();
    let (_, asked) = gate.call(
        CODER,
        "request_egress",
        json!({"host": "old.example", "reason": ""}),
    );
    let old = asked["id"].as_str().unwrap().to_owned();
    // Approved an hour ago for a minute: expired, with no process told.
    let store = Store::new(&gate.paths);
    store.approve(&old, 60, now() - 3600).unwrap();
    assert!(!gate.supervise.allows(&who("coder"), "old.example", 443));
    let (_, status) = gate.call(CODER, "request_status", json!({"id": old}));
    assert_eq!(status["state"], "expired");
    assert_eq!(gate.list_json()[0]["state"], "expired");
    let revoke = gate.bottle(&["supervise", "revoke", &old, "--project", PROJECT]);
    assert_eq!(revoke.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&revoke.stderr).contains("has expired"));

    let (_, asked) = gate.call(
        CODER,
        "request_egress",
        json!({"host": "new.example:8443", "reason": ""}),
    );
    let new = asked["id"].as_str().unwrap().to_owned();
    let out = gate.bottle(&["supervise", "approve", &new, "--project", PROJECT]);
    assert!(out.status.success());
    assert!(gate.supervise.allows(&who("coder"), "new.example", 8443));
    let undeclared = bottle::gate::supervise::grants::undeclared_grants(
        &gate.paths,
        &[("dev".to_owned(), vec!["api.anthropic.com".to_owned()])].into(),
        now(),
    )
    .unwrap();
    assert_eq!(undeclared.len(), 1);
    assert_eq!(undeclared[0].id, new);
    assert_eq!(undeclared[0].agent, "coder");
    assert_eq!(undeclared[0].host, "new.example:8443");

    // The manifests now allow it: the next reload retires the grant.
    gate.supervise.configure(
        "dev",
        &agents(),
        &[
            "api.anthropic.com".to_owned(),
            "new.example:8443".to_owned(),
        ],
    );
    let listed = gate.list_json();
    assert_eq!(listed[1]["id"], new.as_str());
    assert_eq!(listed[1]["state"], "declared");
    // And removing it from the manifests later does not revive it.
    gate.supervise
        .configure("dev", &agents(), &["api.anthropic.com".to_owned()]);
    assert!(!gate.supervise.allows(&who("coder"), "new.example", 8443));
}

#[test]
fn bad_bodies_get_json_rpc_errors_and_bad_tokens_nothing() {
    let gate = Gate::start();
    let error = |status: u16, body: &str| -> i64 {
        let v: Value =
            serde_json::from_str(body).unwrap_or_else(|e| panic!("{status} {e}: {body}"));
        assert_eq!(v["jsonrpc"], "2.0", "{body}");
        v["error"]["code"].as_i64().unwrap()
    };
    let (status, body) = gate.post_raw(CODER, b"{not json".to_vec());
    assert_eq!((status, error(status, &body)), (400, -32700));
    let (status, body) = gate.post_raw(CODER, br#"[{"jsonrpc":"2.0"}]"#.to_vec());
    assert_eq!((status, error(status, &body)), (400, -32600));
    let (status, body) = gate.post_raw(CODER, br#"{"id":1,"method":"tools/list"}"#.to_vec());
    assert_eq!((status, error(status, &body)), (400, -32600));
    let (status, body) = gate.post_raw(
        CODER,
        br#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"arguments":5}}"#.to_vec(),
    );
    // rmcp takes it for a method it does not know: still a JSON-RPC error.
    assert!(error(status, &body) < 0, "{status} {body}");
    let huge = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"message_operator","arguments":{{"text":"{}"}}}}}}"#,
        "x".repeat(200_000)
    );
    let (status, body) = gate.post_raw(CODER, huge.into_bytes());
    assert_eq!((status, error(status, &body)), (413, -32600));
    // An unknown tool is a JSON-RPC error too.
    let answer = gate.rpc(
        CODER,
        "tools/call",
        json!({"name": "rm_rf", "arguments": {}}),
    );
    assert!(answer["error"]["code"].is_i64(), "{answer}");
    // A reason over the bound is refused by the tool, not stored.
    let (is_error, _) = gate.call(
        CODER,
        "request_egress",
        json!({"host": "a.example", "reason": "y".repeat(5000)}),
    );
    assert!(is_error);
    assert!(gate.list_json().is_empty());

    // Unknown tokens: 404, whatever the body.
    let (status, _) = gate.post_raw(
        "nope",
        br#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#.to_vec(),
    );
    assert_eq!(status, 404);
    let (status, _) = gate.post_raw(&CODER[..CODER.len() - 1], b"{}".to_vec());
    assert_eq!(status, 404);

    // Guests name the gate by its address or smolvm's name; a page a
    // browser loaded from elsewhere does not.
    let list = br#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#;
    let (status, _) = gate.post_as(CODER, list.to_vec(), Some("100.96.0.1:4100"));
    assert_eq!(status, 200);
    let (status, _) = gate.post_as(CODER, list.to_vec(), Some("host.smolvm.internal:4100"));
    assert_eq!(status, 200);
    let (status, _) = gate.post_as(CODER, list.to_vec(), Some("evil.example"));
    assert_eq!(status, 403);

    // Still serving.
    let tools = gate.rpc(CODER, "tools/list", json!({}));
    assert_eq!(tools["result"]["tools"].as_array().unwrap().len(), 4);
}

#[test]
fn the_list_reads_the_project_from_the_manifests() {
    let gate = Gate::start();
    let manifests = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/e2e");
    let out = gate.bottle(&["supervise", manifests.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "No supervise requests in project `e2e`.\n"
    );
    let bad = gate.bottle(&["supervise", "list", "--project", "Not A Project"]);
    snapshot!("bad_project", text(&bad), &[] as &[String]);
}

/// `check` counts a grant in force that the manifests do not declare as
/// drift (exit 3, naming it); `plan` and `status` show it; `apply` leaves
/// it; `supervise revoke` ends it and `check` is in sync again.
#[test]
fn check_names_a_grant_wider_than_the_manifests_until_it_is_revoked() {
    let p = support::project::Project::with_double(
        "e2e",
        support::Double::new().with_env("BOTTLE_E2E_SECRET", "not-a-real-secret-supervise"),
    );
    p.bottle(&["apply"]).success();
    p.bottle(&["check"]).success();

    let store = Store::new(&GatePaths::new(p.state_dir(), "e2e"));
    let t = now();
    let asked = store
        .request_egress(&who("coder"), "extra.example", "fetch a crate", t)
        .unwrap();
    // Pending is not in force: still in sync.
    p.bottle(&["check"]).success();
    let id = asked.id;
    let approve = p.bottle(&["supervise", "approve", &id, "--for", "30m"]);
    approve.success();
    assert!(
        approve.stdout.contains("extra.example"),
        "{}",
        approve.stdout
    );

    let check = p.bottle(&["check"]);
    check.code(3);
    snapshot!(
        "check_with_a_grant",
        format!(
            "exit: 3\n--- stdout\n{}--- stderr\n{}",
            check.stdout, check.stderr
        ),
        std::slice::from_ref(&id)
    );
    assert!(
        check.stdout.contains(&format!(
            "  supervise grant {id} lets agent `coder` reach `extra.example`"
        )),
        "{}",
        check.stdout
    );
    let json: Value = serde_json::from_str(&p.bottle(&["check", "--json"]).code(3).stdout).unwrap();
    assert_eq!(json["in_sync"], false);
    assert_eq!(json["grants"][0]["id"], id.as_str());
    assert_eq!(json["grants"][0]["host"], "extra.example");
    // Another agent's check is not about this grant.
    p.bottle(&["check", "--target", "reader"]).success();

    let plan = p.bottle(&["plan"]);
    plan.success();
    assert!(plan.stdout.contains(&id), "{}", plan.stdout);
    let status = p.bottle(&["status"]);
    status.success();
    assert!(status.stdout.contains(&id), "{}", status.stdout);
    // apply neither adds nor removes a grant.
    p.bottle(&["apply"]).success();
    p.bottle(&["check"]).code(3);

    p.bottle(&["supervise", "revoke", &id]).success();
    p.bottle(&["check"]).success();
    let listed = p.bottle(&["supervise", "--json"]);
    let listed: Vec<Value> = serde_json::from_str(&listed.stdout).unwrap();
    assert_eq!(listed[0]["state"], "revoked");
}

#[test]
fn an_agent_that_hammers_the_endpoint_is_refused_and_logged_once() {
    let gate = Gate::start();
    let limit = bottle::gate::supervise::MAX_CALLS_PER_MINUTE;
    let mut refused = 0;
    // A minute boundary in the middle resets the count once at most.
    for _ in 0..(2 * limit + 2) {
        let (status, body) = gate.post_raw(OTHER, b"{".to_vec());
        if status == 429 {
            let v: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["jsonrpc"], "2.0");
            refused += 1;
        } else {
            assert_eq!(status, 400, "{body}");
        }
    }
    assert!(refused >= 1, "never refused");
    // The other agent is not limited by this one.
    let tools = gate.rpc(CODER, "tools/list", json!({}));
    assert_eq!(tools["result"]["tools"].as_array().unwrap().len(), 4);
    let logged = gate
        .log_lines()
        .iter()
        .filter(|l| l["event"] == "rate_limited")
        .count();
    assert!((1..=2).contains(&logged), "{logged}");
}

/// `watch` prints each new request and message as it arrives.
#[test]
fn watch_prints_each_new_request_as_it_arrives() {
    use std::io::BufRead;
    let p = support::project::Project::with_double(
        "e2e",
        support::Double::new().with_env("BOTTLE_E2E_SECRET", "not-a-real-secret-supervise"),
    );
    let mut command = p.command(&["watch", "--json", "--resync", "0"]);
    command.stdout(std::process::Stdio::piped());
    command.stderr(std::process::Stdio::null());
    let mut child = command.spawn().unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = child.stdout.take().unwrap();
    let _child = Kill(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let next = || {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("watch prints in time");
        serde_json::from_str::<Value>(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    };
    // Its first line comes after it started following the grants.
    next();
    let store = Store::new(&GatePaths::new(p.state_dir(), "e2e"));
    let asked = store
        .request_egress(&who("coder"), "extra.example", "need\x1b[31m it", now())
        .unwrap();
    let said = store
        .message(&who("coder"), "hello operator", now())
        .unwrap();
    let mut found = Vec::new();
    while found.len() < 2 {
        let event = next();
        if event["event"] == "supervise_request" || event["event"] == "supervise_message" {
            found.push(event);
        }
    }
    assert_eq!(found[0]["id"], asked.id.as_str());
    assert_eq!(found[0]["host"], "extra.example");
    let message = found[0]["message"].as_str().unwrap();
    assert!(message.contains("need\\u{1b}[31m it"), "{message}");
    assert!(message.contains(&format!("bottle supervise approve {}", asked.id)));
    assert_eq!(found[1]["id"], said.id.as_str());
    assert_eq!(found[1]["event"], "supervise_message");
}
