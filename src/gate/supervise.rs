//! Supervise: how a confined agent asks its operator for more, served by
//! the gate at `/mcp/<agent-token>` (MCP over streamable HTTP, with the
//! official SDK `rmcp`), and how the operator's answers take effect.
//!
//! - [`store`]: the requests and grants of a project, in
//!   `<state-dir>/gate/<project>/grants.json`, written by the gate and by
//!   `bottle supervise approve|deny|revoke` under one file lock.
//! - [`grants`]: grants in force, for the egress proxy
//!   ([`crate::gate::ExtraEgress`]) and for `plan`/`status`/`check`
//!   ([`grants::undeclared_grants`]).
//! - [`mcp`]: the MCP tools (`list_egress`, `request_egress`,
//!   `request_status`, `message_operator`).
//!
//! # The listener's side
//!
//! ```ignore
//! let supervise = Arc::new(Supervise::new(&paths, log.clone()));
//! supervise.configure_all(&config);          // on start and every reload
//! // the egress proxy, after the declared allowlist said no:
//! let extra: Arc<dyn ExtraEgress> = supervise.clone();
//! // an origin-form request for /mcp/<token>:
//! supervise.handle(bottle, token, request).await
//! ```
//!
//! # The reconciler's side
//!
//! - [`grants::undeclared_grants`]`(&paths, &declared, now)`: grants in
//!   force the manifests do not declare (`check` exits 3 naming them;
//!   `plan` and `status` show them). `declared` is each bottle's
//!   `allow_hosts`: [`grants::declared_from_project`] or
//!   [`grants::declared_from_config`]. `crate::cli::supervise::undeclared`
//!   wraps it for the commands.
//! - [`grants::is_declared`]`(host, allow_hosts)`: whether the manifests
//!   now allow a granted host; [`grants::retire_declared`] marks such
//!   grants `declared` for good (the gate does it on every
//!   [`Supervise::configure`]).
//! - `apply` never adds nor removes a grant.
//!
//! The endpoint is stateless (no MCP session is kept between requests:
//! nothing an agent does makes the gate hold memory), answers JSON, and
//! reads at most [`MAX_BODY`] bytes of a request; anything that is not a
//! JSON-RPC message gets a JSON-RPC error.

pub mod grants;
pub mod mcp;
pub mod store;

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use http_body_util::BodyExt;
use rmcp::transport::StreamableHttpService;
use rmcp::transport::streamable_http_server::StreamableHttpServerConfig;
use rmcp::transport::streamable_http_server::session::never::NeverSessionManager;
use serde_json::{Value, json};

use super::config::{AgentCredentials, GateConfig, constant_time_eq};
use super::http::{Request, Response, full};
use super::log::GateLog;
use super::paths::GatePaths;
use super::{AgentIdentity, ExtraEgress};
use grants::Grants;

/// The largest JSON-RPC request body read, in bytes.
pub const MAX_BODY: usize = 64 * 1024;

/// HTTP requests an agent may make to its endpoint per minute; beyond,
/// each gets a JSON-RPC error (HTTP 429) and only the first is logged.
pub const MAX_CALLS_PER_MINUTE: u32 = 120;

/// The `Host` names a guest reaches the gate by: host loopback (local
/// runtime, tests) and smolvm's gateway address and name.
pub const ALLOWED_HOSTS: &[&str] = &[
    "127.0.0.1",
    "localhost",
    "::1",
    "100.96.0.1",
    "host.smolvm.internal",
];

/// The supervise endpoint of a project's gate, for every bottle it serves.
pub struct Supervise {
    inner: Arc<Inner>,
    service: StreamableHttpService<mcp::Handler, NeverSessionManager>,
}

pub(crate) struct Inner {
    pub(crate) grants: Grants,
    pub(crate) log: Arc<GateLog>,
    bottles: RwLock<BTreeMap<String, BottleView>>,
    /// Calls per agent in the current window: (window start, count).
    calls: std::sync::Mutex<BTreeMap<AgentIdentity, (u64, u32)>>,
}

#[derive(Debug, Clone, Default)]
struct BottleView {
    /// (agent, mcp token)
    agents: Vec<(String, String)>,
    allow_hosts: Vec<String>,
}

impl Inner {
    /// Count one call of `who`: `Ok` while under [`MAX_CALLS_PER_MINUTE`]
    /// in this minute, else `Err(first)`, `first` for the first refusal of
    /// the window (the one worth a log line).
    fn count_call(&self, who: &AgentIdentity) -> Result<(), bool> {
        let now = store::now();
        let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        let entry = calls.entry(who.clone()).or_insert((now, 0));
        if now >= entry.0 + 60 {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
        match entry.1 {
            n if n <= MAX_CALLS_PER_MINUTE => Ok(()),
            n => Err(n == MAX_CALLS_PER_MINUTE + 1),
        }
    }

    /// The bottle's declared `allow_hosts`, as last configured.
    pub(crate) fn declared(&self, bottle: &str) -> Vec<String> {
        self.bottles
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(bottle)
            .map(|b| b.allow_hosts.clone())
            .unwrap_or_default()
    }

    pub(crate) fn log(&self, who: &AgentIdentity, fields: Value) {
        let mut object = json!({"bottle": who.bottle, "agent": who.agent});
        if let (Some(o), Value::Object(f)) = (object.as_object_mut(), fields) {
            o.extend(f);
        }
        self.log.event("supervise", object);
    }
}

impl Supervise {
    /// Serve from the grants in `paths`, logging to `log`, for requests
    /// whose `Host` is one of [`ALLOWED_HOSTS`] (any port). Serves no
    /// bottle until [`Supervise::configure`].
    pub fn new(paths: &GatePaths, log: Arc<GateLog>) -> Self {
        Self::with_allowed_hosts(paths, log, ALLOWED_HOSTS.iter().copied())
    }

    /// [`Supervise::new`] for guests that reach the gate by other names
    /// (`host` or `host:port`); a request with any other `Host` gets 403.
    pub fn with_allowed_hosts(
        paths: &GatePaths,
        log: Arc<GateLog>,
        allowed_hosts: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        let inner = Arc::new(Inner {
            grants: Grants::new(paths),
            log,
            bottles: RwLock::new(BTreeMap::new()),
            calls: std::sync::Mutex::new(BTreeMap::new()),
        });
        let handler_inner = inner.clone();
        let config = StreamableHttpServerConfig::default()
            .with_legacy_session_mode(false)
            .with_json_response(true)
            .with_sse_keep_alive(None)
            .with_sse_retry(None)
            .with_allowed_hosts(allowed_hosts)
            .with_max_request_body_bytes(MAX_BODY);
        let service = StreamableHttpService::new(
            move || Ok(mcp::Handler::new(handler_inner.clone())),
            Arc::new(NeverSessionManager::default()),
            config,
        );
        Self { inner, service }
    }

    /// Serve `bottle` for these agents (each identified by its
    /// `mcp_token`) with this declared allowlist, replacing what was
    /// configured before. Grants and pending requests whose host the
    /// allowlist now covers retire as `declared`.
    pub fn configure(
        &self,
        bottle: &str,
        agents: &BTreeMap<String, AgentCredentials>,
        allow_hosts: &[String],
    ) {
        let view = BottleView {
            agents: agents
                .iter()
                .filter(|(_, c)| !c.mcp_token.is_empty())
                .map(|(name, c)| (name.clone(), c.mcp_token.clone()))
                .collect(),
            allow_hosts: allow_hosts.to_vec(),
        };
        self.inner
            .bottles
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(bottle.to_owned(), view);
        let declared: grants::Declared = [(bottle.to_owned(), allow_hosts.to_vec())].into();
        self.retire(&declared);
    }

    /// Stop serving `bottle`.
    pub fn remove(&self, bottle: &str) {
        self.inner
            .bottles
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(bottle);
    }

    /// Serve exactly the bottles of `config` that have `supervise`.
    pub fn configure_all(&self, config: &GateConfig) {
        let served: Vec<String> = self
            .inner
            .bottles
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        for name in served {
            if !config.bottles.get(&name).is_some_and(|b| b.supervise) {
                self.remove(&name);
            }
        }
        for (name, bottle) in config.bottles.iter().filter(|(_, b)| b.supervise) {
            self.configure(name, &bottle.agents, &bottle.allow_hosts);
        }
    }

    fn retire(&self, declared: &grants::Declared) {
        let store = self.inner.grants.store();
        match store.retire_declared(
            |r| {
                r.host.as_deref().is_some_and(|h| {
                    declared
                        .get(&r.bottle)
                        .is_some_and(|allow| grants::is_declared(h, allow))
                })
            },
            store::now(),
        ) {
            Ok(retired) => {
                for r in retired {
                    self.inner.log(
                        &r.who(),
                        json!({"event": "declared", "id": r.id, "host": r.host}),
                    );
                }
            }
            Err(e) => self.inner.log.event(
                "supervise",
                json!({"event": "error", "error": e.to_string()}),
            ),
        }
    }

    /// The agent of `bottle` whose MCP token is `token`. Compares against
    /// every agent's token, in constant time each.
    pub fn agent_by_token(&self, bottle: &str, token: &str) -> Option<AgentIdentity> {
        let bottles = self.inner.bottles.read().unwrap_or_else(|e| e.into_inner());
        let view = bottles.get(bottle)?;
        let mut found = None;
        for (agent, t) in &view.agents {
            if constant_time_eq(t.as_bytes(), token.as_bytes()) && found.is_none() {
                found = Some(agent.clone());
            }
        }
        found.map(|agent| AgentIdentity {
            bottle: bottle.to_owned(),
            agent,
        })
    }

    /// Answer one HTTP request for `/mcp/<token>` on `bottle`'s listener.
    /// The future owns what it needs (`Send + 'static`: spawn it freely).
    pub fn handle(
        &self,
        bottle: &str,
        token: &str,
        request: Request,
    ) -> impl Future<Output = Response> + Send + 'static {
        let who = self.agent_by_token(bottle, token);
        if who.is_none() {
            self.inner.log.unidentified(
                "supervise",
                json!({"bottle": bottle, "event": "unknown_token", "decision": "deny"}),
            );
        }
        let inner = self.inner.clone();
        let service = self.service.clone();
        async move {
            match who {
                Some(who) => serve(inner, service, who, request).await,
                None => super::http::text(http::StatusCode::NOT_FOUND, "not found"),
            }
        }
    }
}

async fn serve(
    inner: Arc<Inner>,
    service: StreamableHttpService<mcp::Handler, NeverSessionManager>,
    who: AgentIdentity,
    request: Request,
) -> Response {
    if let Err(first) = inner.count_call(&who) {
        if first {
            inner.log(
                &who,
                json!({"event": "rate_limited", "limit_per_minute": MAX_CALLS_PER_MINUTE}),
            );
        }
        return jsonrpc_error(
            http::StatusCode::TOO_MANY_REQUESTS,
            Value::Null,
            -32000,
            &format!("too many requests: at most {MAX_CALLS_PER_MINUTE} a minute"),
        );
    }
    let (mut parts, body) = request.into_parts();
    parts.extensions.insert(who.clone());
    let body = if parts.method == http::Method::POST {
        let bytes = match read_bounded(body).await {
            Ok(bytes) => bytes,
            Err(too_large) => {
                let error = if too_large {
                    format!("body larger than {MAX_BODY} bytes")
                } else {
                    "the request body could not be read".to_owned()
                };
                inner.log(&who, json!({"event": "bad_request", "error": error}));
                return if too_large {
                    jsonrpc_error(
                        http::StatusCode::PAYLOAD_TOO_LARGE,
                        Value::Null,
                        -32600,
                        &format!("Invalid Request: the body is larger than {MAX_BODY} bytes"),
                    )
                } else {
                    jsonrpc_error(
                        http::StatusCode::BAD_REQUEST,
                        Value::Null,
                        -32700,
                        "Parse error: the request body could not be read",
                    )
                };
            }
        };
        if let Err(response) = check_message(&inner, &who, &bytes) {
            return response;
        }
        full(bytes)
    } else {
        full(Bytes::new())
    };
    let response = service.handle(http::Request::from_parts(parts, body)).await;
    response.map(|b| b.map_err(|never| match never {}).boxed())
}

/// At most [`MAX_BODY`] bytes of `body`; `Err(true)` when it is longer,
/// `Err(false)` when it cannot be read. Stops reading at the bound.
async fn read_bounded(mut body: super::http::Body) -> Result<Bytes, bool> {
    let mut out = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return Err(false);
        };
        if let Ok(data) = frame.into_data() {
            if data.len() > MAX_BODY - out.len() {
                return Err(true);
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out.freeze())
}

/// A JSON-RPC message, or the JSON-RPC error saying why not.
#[allow(clippy::result_large_err)]
fn check_message(inner: &Inner, who: &AgentIdentity, bytes: &[u8]) -> Result<(), Response> {
    let fail = |id: Value, code: i64, message: String| {
        inner.log(
            who,
            json!({"event": "bad_request", "error": message.clone()}),
        );
        Err(jsonrpc_error(
            http::StatusCode::BAD_REQUEST,
            id,
            code,
            &message,
        ))
    };
    let value: Value = match serde_json::from_slice(bytes) {
        Ok(v) => v,
        Err(e) => return fail(Value::Null, -32700, format!("Parse error: {e}")),
    };
    let id = value.get("id").cloned().unwrap_or(Value::Null);
    let method = value
        .get("method")
        .and_then(Value::as_str)
        .map(str::to_owned);
    if !value.is_object() || value.get("jsonrpc") != Some(&Value::from("2.0")) {
        return fail(
            Value::Null,
            -32600,
            "Invalid Request: expected one JSON-RPC 2.0 object".into(),
        );
    }
    if let Err(e) = serde_json::from_value::<rmcp::model::ClientJsonRpcMessage>(value) {
        return match method {
            Some(m) => fail(id, -32602, format!("Invalid params for `{m}`: {e}")),
            None => fail(id, -32600, format!("Invalid Request: {e}")),
        };
    }
    if let Some(method) = method {
        inner.log(who, json!({"event": "call", "method": method}));
    }
    Ok(())
}

fn jsonrpc_error(status: http::StatusCode, id: Value, code: i64, message: &str) -> Response {
    let body = json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}});
    let mut response = http::Response::new(full(body.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

impl ExtraEgress for Supervise {
    fn allows(&self, who: &AgentIdentity, host: &str, port: u16) -> bool {
        match self.inner.grants.grant_for(who, host, port) {
            Some((pattern, until)) => {
                self.inner.log(
                    who,
                    json!({"event": "grant_used", "host": host, "port": port,
                           "grant": pattern, "until": until}),
                );
                true
            }
            None => false,
        }
    }
}
