//! What a listener does with each request: egress (CONNECT and
//! absolute-form proxy requests) and the origin-form endpoints.
//!
//! Egress, in order: the agent is resolved from `Proxy-Authorization:
//! Basic` (user: agent name, password: its proxy token), else 407; the
//! host must be allowed (`allow_hosts`, a secret's `hosts`, or a run-time
//! grant), else 403; its name is resolved once and every internal address
//! outside `allow_internal` is dropped (none left: 403); the gate dials the
//! address that passed. CONNECT to a host that carries a secret is
//! intercepted: the gate terminates TLS with a leaf of the project CA, puts
//! the real value in place of this agent's placeholder in the request
//! headers, and forwards over TLS verified against the host's trust store.
//! Every other CONNECT is a byte tunnel; absolute-form `http://` requests
//! are forwarded as they are (never a secret on clear text).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::http::{Body, BoxError, Response, text};
use super::net;
use super::server::{Gate, Live, Policy};
use super::{AgentIdentity, EndpointContext};

/// How long a dial may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send a request's headers, or to finish a
/// TLS handshake the gate intercepts.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections one listener serves at once, at most; more wait to be
/// accepted. The gate gives each listener a share of its descriptors
/// ([`Slots::set_cap`]), which may be fewer.
pub(crate) const MAX_CONNECTIONS: usize = 4096;
/// Connections an agent may hold at once, whatever its listener's share.
const MIN_PER_AGENT: usize = 4;

/// How many connections a listener serves at once: a share of the gate's
/// descriptors, so that one bottle's connections (an agent needs no
/// credential to open one) never take another bottle's.
///
/// A connection counts from its accept until it closes (a CONNECT tunnel
/// until the tunnel ends). At the bound, the listener closes the oldest
/// connection that has not yet shown a credential of the bottle and
/// accepts the next: connections anyone can open (on smolvm every guest
/// reaches every listener) never lock the bottle's own agents out.
pub(crate) struct Slots {
    active: AtomicUsize,
    cap: AtomicUsize,
    freed: tokio::sync::Notify,
    /// Connections not yet identified, oldest first: (id, how to close it).
    unidentified: std::sync::Mutex<std::collections::VecDeque<(u64, Arc<tokio::sync::Notify>)>>,
    next_id: std::sync::atomic::AtomicU64,
    /// Identified connections per agent.
    per_agent: std::sync::Mutex<std::collections::HashMap<String, usize>>,
}

impl Slots {
    pub(crate) fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self {
            active: AtomicUsize::new(0),
            cap: AtomicUsize::new(cap),
            freed: tokio::sync::Notify::new(),
            unidentified: Default::default(),
            next_id: Default::default(),
            per_agent: Default::default(),
        })
    }

    /// Connections one agent may hold at once: half the listener's, so
    /// that an agent's tunnels leave room for the other agents of its
    /// bottle.
    fn per_agent_cap(&self) -> usize {
        (self.cap.load(Ordering::SeqCst) / 2).max(MIN_PER_AGENT)
    }

    /// Serve at most `cap` connections from now on (those open stay).
    pub(crate) fn set_cap(&self, cap: usize) {
        self.cap.store(cap, Ordering::SeqCst);
        self.freed.notify_one();
    }

    fn queue(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::VecDeque<(u64, Arc<tokio::sync::Notify>)>>
    {
        self.unidentified.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wait until a connection may be accepted (closing the oldest
    /// unidentified one if the listener is at its bound), and count it.
    async fn take(self: &Arc<Self>) -> Conn {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if self.active.load(Ordering::SeqCst) < self.cap.load(Ordering::SeqCst) {
                self.active.fetch_add(1, Ordering::SeqCst);
                let id = self.next_id.fetch_add(1, Ordering::SeqCst);
                let close = Arc::new(tokio::sync::Notify::new());
                self.queue().push_back((id, close.clone()));
                return Conn {
                    slots: self.clone(),
                    id,
                    close,
                    agent: std::sync::OnceLock::new(),
                };
            }
            let oldest = self.queue().pop_front();
            if let Some((_, close)) = oldest {
                close.notify_one();
            }
            freed.await;
        }
    }
}

/// One accepted connection, counted by its listener's [`Slots`] while it
/// lives (a tunnel holds it too).
pub(crate) struct Conn {
    slots: Arc<Slots>,
    id: u64,
    /// Notified when the listener closes it to make room.
    close: Arc<tokio::sync::Notify>,
    /// The agent whose credential it showed first.
    agent: std::sync::OnceLock<String>,
}

impl Conn {
    /// It showed `agent`'s credential: never closed to make room, and
    /// counted as that agent's. `Err(cap)`: the agent already holds as many
    /// connections as it may.
    fn identify(&self, agent: &str) -> Result<(), usize> {
        if self.agent.get().is_some() {
            return Ok(());
        }
        let cap = self.slots.per_agent_cap();
        let mut per_agent = self
            .slots
            .per_agent
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let held = per_agent.entry(agent.to_owned()).or_default();
        if *held >= cap {
            return Err(cap);
        }
        *held += 1;
        drop(per_agent);
        let _ = self.agent.set(agent.to_owned());
        self.slots.queue().retain(|(id, _)| *id != self.id);
        Ok(())
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        match self.agent.get() {
            Some(agent) => {
                let mut per_agent = self
                    .slots
                    .per_agent
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                if let Some(held) = per_agent.get_mut(agent) {
                    *held = held.saturating_sub(1);
                    if *held == 0 {
                        per_agent.remove(agent);
                    }
                }
            }
            None => self.slots.queue().retain(|(id, _)| *id != self.id),
        }
        self.slots.active.fetch_sub(1, Ordering::SeqCst);
        self.slots.freed.notify_one();
    }
}

pub(crate) async fn accept_loop(
    gate: Arc<Gate>,
    bottle: Arc<str>,
    port: u16,
    listener: TcpListener,
    slots: Arc<Slots>,
) {
    loop {
        let conn = Arc::new(slots.take().await);
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                // Out of descriptors, most likely: let some close.
                drop(conn);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let gate = gate.clone();
        let bottle = bottle.clone();
        tokio::spawn(async move {
            let close = conn.close.clone();
            let service = service_fn(move |req| {
                let gate = gate.clone();
                let bottle = bottle.clone();
                let conn = conn.clone();
                async move { Ok::<_, Infallible>(handle(gate, bottle, port, conn, req).await) }
            });
            let serving = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::select! {
                _ = serving => {}
                _ = close.notified() => {}
            }
        });
    }
}

/// Whether `req` carries a credential of one of `bottle`'s agents: its
/// proxy token, git token (HTTP Basic) or MCP token (the path).
fn identifies(live: &Live, bottle: &str, req: &http::Request<Incoming>) -> Option<String> {
    if let Ok(agent) = proxy_agent(live, bottle, req.headers()) {
        return Some(agent);
    }
    let b = live.config.bottles.get(bottle)?;
    let eq = |a: &str, b: &str| {
        !a.is_empty() && super::config::constant_time_eq(a.as_bytes(), b.as_bytes())
    };
    if let Some((user, password)) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| basic_credentials(v).ok())
        && b.agents
            .get(&user)
            .is_some_and(|c| eq(&c.git_token, &password))
    {
        return Some(user);
    }
    let token = req
        .uri()
        .path()
        .strip_prefix("/mcp/")?
        .trim_end_matches('/');
    b.agents
        .iter()
        .find(|(_, c)| eq(&c.mcp_token, token))
        .map(|(name, _)| name.clone())
}

fn boxed(req: http::Request<Incoming>) -> http::Request<Body> {
    req.map(|b| b.map_err(|e| -> BoxError { Box::new(e) }).boxed())
}

fn boxed_response(res: http::Response<Incoming>) -> Response {
    res.map(|b| b.map_err(|e| -> BoxError { Box::new(e) }).boxed())
}

async fn handle(
    gate: Arc<Gate>,
    bottle: Arc<str>,
    port: u16,
    conn: Arc<Conn>,
    req: http::Request<Incoming>,
) -> Response {
    if conn.agent.get().is_none()
        && let Some(agent) = identifies(&gate.live(), &bottle, &req)
        && let Err(cap) = conn.identify(&agent)
    {
        gate.log.event(
            "egress",
            json!({"bottle": &*bottle, "agent": agent, "decision": "denied",
                   "rule": "connections", "reason": format!("more than {cap} connections open")}),
        );
        let mut response = text(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!(
                "bottle gate: agent `{agent}` already has {cap} connections open to bottle `{bottle}`'s gate; close some"
            ),
        );
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return response;
    }
    if req.method() == Method::CONNECT {
        connect(gate, bottle, conn, req).await
    } else if req.uri().scheme().is_some() {
        forward_plain(gate, bottle, req).await
    } else {
        origin(gate, bottle, port, boxed(req)).await
    }
}

/// A request to `host:port` by an identified agent, and what was decided.
struct Target<'a> {
    gate: &'a Gate,
    bottle: &'a str,
    agent: Option<&'a str>,
    method: &'a str,
    host: String,
    port: u16,
}

impl Target<'_> {
    fn log(&self, decision: &str, fields: Value) {
        let mut event = json!({
            "bottle": self.bottle,
            "agent": self.agent,
            "decision": decision,
            "method": self.method,
            "host": self.host,
            "port": self.port,
        });
        if let (Value::Object(e), Value::Object(f)) = (&mut event, fields) {
            e.extend(f);
        }
        if self.agent.is_some() {
            self.gate.log.event("egress", event);
        } else {
            self.gate.log.unidentified("egress", event);
        }
    }

    fn deny(&self, status: StatusCode, rule: &str, message: String) -> Response {
        self.log("denied", json!({"rule": rule, "reason": message}));
        let mut response = text(status, &format!("bottle gate: denied by {rule}: {message}"));
        if status == StatusCode::PROXY_AUTHENTICATION_REQUIRED {
            response.headers_mut().insert(
                header::PROXY_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"bottle gate\""),
            );
        }
        response
    }
}

/// Which rule lets `host:port` through for `who`, and whether its TLS is
/// intercepted (a secret's host).
fn decide(
    gate: &Gate,
    policy: &Policy,
    who: &AgentIdentity,
    host: &str,
    port: u16,
) -> Option<(String, bool)> {
    if let Some((secret, pattern)) = policy
        .secrets
        .iter()
        .find_map(|(s, hosts)| hosts.matching(host, port).map(|p| (s, p)))
    {
        return Some((format!("secret {} hosts: {pattern}", secret.name), true));
    }
    if let Some(pattern) = policy.allow.matching(host, port) {
        return Some((format!("allow_hosts: {pattern}"), false));
    }
    if gate.endpoints.grants.allows(who, host, port) {
        return Some(("supervise grant".into(), false));
    }
    None
}

/// The agent a proxy request's `Proxy-Authorization` names, checked
/// against its token; the error is what to say.
fn proxy_agent(live: &Live, bottle: &str, headers: &HeaderMap) -> Result<String, &'static str> {
    let Some(value) = headers.get(header::PROXY_AUTHORIZATION) else {
        return Err(
            "no proxy credential (use the proxy URL bottle gave this agent, with its user and password)",
        );
    };
    let invalid = "invalid proxy credential";
    let (user, password) = basic_credentials(value).map_err(|()| invalid)?;
    let gate = live.config.bottles.get(bottle).ok_or(invalid)?;
    match gate.agents.get(&user) {
        Some(c)
            if super::config::constant_time_eq(c.proxy_token.as_bytes(), password.as_bytes()) =>
        {
            Ok(user.to_owned())
        }
        _ => Err(invalid),
    }
}

/// The user and password of an HTTP `Basic` credential.
fn basic_credentials(value: &HeaderValue) -> Result<(String, String), ()> {
    let value = value.to_str().map_err(|_| ())?;
    let (scheme, encoded) = value.trim().split_once(' ').ok_or(())?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(());
    }
    let decoded = crate::base64::decode_optional(encoded.trim()).ok_or(())?;
    let decoded = String::from_utf8(decoded).map_err(|_| ())?;
    let (user, password) = decoded.split_once(':').ok_or(())?;
    Ok((user.to_owned(), password.to_owned()))
}

/// Authenticate, decide and resolve a proxy request to `host:port`.
/// `Ok`: the agent, the rule, whether to intercept, and the addresses the
/// gate may dial; `Err`: the answer to send.
#[allow(clippy::result_large_err)]
async fn admit(
    gate: &Gate,
    live: &Live,
    bottle: &str,
    method: &str,
    headers: &HeaderMap,
    host: String,
    port: u16,
) -> Result<(String, String, bool, Vec<SocketAddr>), Response> {
    let mut target = Target {
        gate,
        bottle,
        agent: None,
        method,
        host,
        port,
    };
    let agent = proxy_agent(live, bottle, headers).map_err(|why| {
        target.deny(
            StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            "proxy authentication",
            format!("{why} for bottle `{bottle}`"),
        )
    })?;
    target.agent = Some(&agent);
    let policy = live.policies.get(bottle).ok_or_else(|| {
        target.deny(
            StatusCode::FORBIDDEN,
            "config",
            "this bottle has no rules".into(),
        )
    })?;
    let who = AgentIdentity {
        bottle: bottle.to_owned(),
        agent: agent.clone(),
    };
    let Some((rule, intercept)) = decide(gate, policy, &who, &target.host, target.port) else {
        return Err(target.deny(
            StatusCode::FORBIDDEN,
            "allow_hosts",
            format!(
                "{}:{} is not in egress.allow_hosts of bottle `{bottle}`",
                target.host, target.port
            ),
        ));
    };
    let resolved = match net::resolve(&target.host, target.port, &policy.internal).await {
        Ok(r) => r,
        Err(e) => {
            let message = format!("cannot resolve {}: {e}", target.host);
            target.log("failed", json!({"rule": rule, "reason": message}));
            return Err(text(
                StatusCode::BAD_GATEWAY,
                &format!("bottle gate: {message}"),
            ));
        }
    };
    if resolved.allowed.is_empty() {
        let why = match resolved.refused.first() {
            Some((ip, kind)) => format!(
                "{} resolves to {ip}, a {kind} address outside egress.allow_internal of bottle `{bottle}`",
                target.host
            ),
            None => format!("{} resolves to no address", target.host),
        };
        return Err(target.deny(StatusCode::FORBIDDEN, "internal address", why));
    }
    Ok((agent, rule, intercept, resolved.allowed))
}

async fn dial(addrs: &[SocketAddr]) -> std::io::Result<TcpStream> {
    let mut last = std::io::Error::other("no address");
    for addr in addrs {
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Ok(Err(e)) => last = e,
            Err(_) => {
                last = std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("connecting to {addr} took longer than {CONNECT_TIMEOUT:?}"),
                )
            }
        }
    }
    Err(last)
}

fn split_authority(authority: &str, default_port: u16) -> Option<(String, u16)> {
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') || h.ends_with(']') => (h, p.parse().ok()?),
        _ => (authority, default_port),
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    (!host.is_empty() && port != 0).then_some((host, port))
}

async fn connect(
    gate: Arc<Gate>,
    bottle: Arc<str>,
    conn: Arc<Conn>,
    mut req: http::Request<Incoming>,
) -> Response {
    let Some((host, port)) = req
        .uri()
        .authority()
        .and_then(|a| split_authority(a.as_str(), 443))
    else {
        return text(
            StatusCode::BAD_REQUEST,
            "bottle gate: CONNECT needs host:port",
        );
    };
    let live = gate.live();
    let admitted = admit(
        &gate,
        &live,
        &bottle,
        "CONNECT",
        req.headers(),
        host.clone(),
        port,
    )
    .await;
    let (agent, rule, intercept, addrs) = match admitted {
        Ok(a) => a,
        Err(response) => return response,
    };
    let target = Target {
        gate: &gate,
        bottle: &bottle,
        agent: Some(&agent),
        method: "CONNECT",
        host: host.clone(),
        port,
    };
    let upstream = if intercept {
        None
    } else {
        match dial(&addrs).await {
            Ok(s) => Some(s),
            Err(e) => {
                let message = format!("cannot connect to {host}:{port}: {e}");
                target.log("failed", json!({"rule": rule, "reason": message}));
                return text(StatusCode::BAD_GATEWAY, &format!("bottle gate: {message}"));
            }
        }
    };
    let mode = if intercept { "intercept" } else { "tunnel" };
    let address = match &upstream {
        Some(s) => s.peer_addr().ok(),
        None => addrs.first().copied(),
    };
    target.log(
        "allowed",
        json!({"rule": rule, "mode": mode, "address": address.map(|a| a.ip().to_string())}),
    );
    let on_upgrade = hyper::upgrade::on(&mut req);
    let gate = gate.clone();
    tokio::spawn(async move {
        // The tunnel is the connection's: it counts until it ends.
        let _conn = conn;
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut client = TokioIo::new(upgraded);
        match upstream {
            Some(mut upstream) => {
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            }
            None => {
                let session = Intercepted {
                    gate,
                    bottle,
                    agent: agent.into(),
                    host,
                    port,
                    addrs,
                };
                session.serve(client).await;
            }
        }
    });
    http::Response::new(super::http::full(""))
}

/// One intercepted CONNECT: TLS terminated with a leaf of the project CA,
/// each request forwarded upstream with the agent's placeholders replaced.
struct Intercepted {
    gate: Arc<Gate>,
    bottle: Arc<str>,
    agent: Arc<str>,
    host: String,
    port: u16,
    addrs: Vec<SocketAddr>,
}

impl Intercepted {
    async fn serve(self, client: TokioIo<hyper::upgrade::Upgraded>) {
        let Ok(config) = self.gate.ca.server_config(&self.host) else {
            return;
        };
        let accept = TlsAcceptor::from(config).accept(client);
        let Ok(Ok(tls)) = tokio::time::timeout(HEADER_TIMEOUT, accept).await else {
            return;
        };
        let session = Arc::new(self);
        let upstream: Arc<tokio::sync::Mutex<Option<SendRequest<Body>>>> = Arc::default();
        let service = service_fn(move |req| {
            let session = session.clone();
            let upstream = upstream.clone();
            async move { Ok::<_, Infallible>(session.forward(&upstream, boxed(req)).await) }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .serve_connection(TokioIo::new(tls), service)
            .await;
    }

    async fn forward(
        &self,
        upstream: &tokio::sync::Mutex<Option<SendRequest<Body>>>,
        mut req: http::Request<Body>,
    ) -> Response {
        let live = self.gate.live();
        let method = req.method().to_string();
        let target = Target {
            gate: &self.gate,
            bottle: &self.bottle,
            agent: Some(&self.agent),
            method: &method,
            host: self.host.clone(),
            port: self.port,
        };
        // Judged again by the config of this moment: a reload that took
        // the host away stops the requests of a connection already open.
        let who = AgentIdentity {
            bottle: self.bottle.to_string(),
            agent: self.agent.to_string(),
        };
        let Some(policy) = live.policies.get(&*self.bottle) else {
            return target.deny(
                StatusCode::FORBIDDEN,
                "config",
                "this bottle has no rules".into(),
            );
        };
        if decide(&self.gate, policy, &who, &self.host, self.port).is_none() {
            return target.deny(
                StatusCode::FORBIDDEN,
                "allow_hosts",
                format!(
                    "{}:{} is not in egress.allow_hosts of bottle `{}`",
                    self.host, self.port, self.bottle
                ),
            );
        }
        // The Host inside must be the tunnel's: on a shared front end
        // (a CDN) another Host would carry the secret to another site.
        if let Some(other) = self.foreign_host(&req) {
            return target.deny(
                StatusCode::FORBIDDEN,
                "intercepted host",
                format!(
                    "a request for `{other}` inside a tunnel to {}:{}",
                    self.host, self.port
                ),
            );
        }
        strip_hop_by_hop(req.headers_mut());
        let added = replace_placeholders(
            &live,
            policy,
            &self.bottle,
            &self.agent,
            &self.host,
            self.port,
            req.headers_mut(),
        );
        for (secret, headers) in &added {
            target.log(
                "credential_added",
                json!({"secret": secret, "headers": headers, "path": req.uri().path()}),
            );
        }
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".into());
        *req.uri_mut() = path.parse().unwrap_or_default();
        if !req.headers().contains_key(header::HOST) {
            let host = if self.port == 443 {
                self.host.clone()
            } else {
                format!("{}:{}", self.host, self.port)
            };
            if let Ok(v) = HeaderValue::from_str(&host) {
                req.headers_mut().insert(header::HOST, v);
            }
        }
        let mut sender = upstream.lock().await;
        let fresh = match sender.as_mut() {
            Some(s) => s.ready().await.is_err(),
            None => true,
        };
        if fresh {
            match self.connect_upstream().await {
                Ok(s) => *sender = Some(s),
                Err(message) => {
                    target.log("failed", json!({"reason": message}));
                    return text(StatusCode::BAD_GATEWAY, &format!("bottle gate: {message}"));
                }
            }
        }
        let Some(s) = sender.as_mut() else {
            return text(
                StatusCode::BAD_GATEWAY,
                "bottle gate: no upstream connection",
            );
        };
        match s.send_request(req).await {
            Ok(response) => boxed_response(response),
            Err(e) => {
                *sender = None;
                let message = format!("{}:{}: {e}", self.host, self.port);
                target.log("failed", json!({"reason": message}));
                text(StatusCode::BAD_GATEWAY, &format!("bottle gate: {message}"))
            }
        }
    }

    /// The host a request names (its `Host`, or the authority of an
    /// absolute URI) when that is not the tunnel's own.
    fn foreign_host(&self, req: &http::Request<Body>) -> Option<String> {
        let named = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .into_iter()
            .chain(
                req.headers()
                    .get_all(header::HOST)
                    .iter()
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
            );
        for name in named {
            match split_authority(name.trim(), self.port) {
                Some((host, port)) if host == self.host && port == self.port => {}
                _ => return Some(name),
            }
        }
        None
    }

    async fn connect_upstream(&self) -> Result<SendRequest<Body>, String> {
        let tcp = dial(&self.addrs)
            .await
            .map_err(|e| format!("cannot connect to {}:{}: {e}", self.host, self.port))?;
        let name = ServerName::try_from(self.host.clone())
            .map_err(|e| format!("{} is not a TLS server name: {e}", self.host))?;
        let connector = TlsConnector::from(self.gate.upstream_tls.clone());
        let tls = tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, tcp))
            .await
            .map_err(|_| {
                format!(
                    "TLS with {}:{} took longer than {CONNECT_TIMEOUT:?}",
                    self.host, self.port
                )
            })?
            .map_err(|e| format!("TLS with {}:{}: {e}", self.host, self.port))?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| format!("HTTP with {}:{}: {e}", self.host, self.port))?;
        tokio::spawn(connection);
        Ok(sender)
    }
}

/// Put the real value in place of `agent`'s placeholder, in the headers of
/// a request to `host:port`, for each secret of the bottle that may go
/// there. Returns each secret added, with the headers it went into.
fn replace_placeholders(
    live: &Live,
    policy: &Policy,
    bottle: &str,
    agent: &str,
    host: &str,
    port: u16,
    headers: &mut HeaderMap,
) -> Vec<(String, Vec<String>)> {
    let Some(creds) = live
        .config
        .bottles
        .get(bottle)
        .and_then(|b| b.agents.get(agent))
    else {
        return Vec::new();
    };
    let mut added = Vec::new();
    for (secret, hosts) in &policy.secrets {
        if hosts.matching(host, port).is_none() {
            continue;
        }
        let (Some(placeholder), Some(value)) = (
            creds.placeholders.get(&secret.name),
            live.secrets.get(&secret.value_key),
        ) else {
            continue;
        };
        if placeholder.is_empty() {
            continue;
        }
        let mut names = Vec::new();
        for (name, v) in headers.iter_mut() {
            let Ok(s) = v.to_str() else { continue };
            if !s.contains(placeholder.as_str()) {
                continue;
            }
            if let Ok(new) = HeaderValue::from_str(&s.replace(placeholder.as_str(), value)) {
                let mut new = new;
                new.set_sensitive(true);
                *v = new;
                names.push(name.as_str().to_owned());
            }
        }
        if !names.is_empty() {
            names.dedup();
            added.push((secret.name.clone(), names));
        }
    }
    added
}

/// Headers for one hop only (and the proxy's own credential).
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect();
    for name in listed {
        headers.remove(name.as_str());
    }
    for name in [
        "connection",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "upgrade",
    ] {
        headers.remove(name);
    }
}

/// An absolute-form request (`GET http://host/path`): forwarded on clear
/// text, unchanged but for the proxy's own headers.
async fn forward_plain(
    gate: Arc<Gate>,
    bottle: Arc<str>,
    req: http::Request<Incoming>,
) -> Response {
    if req.uri().scheme_str() != Some("http") {
        return text(
            StatusCode::BAD_REQUEST,
            "bottle gate: only http:// URLs go through as proxy requests; use CONNECT for https",
        );
    }
    let Some((host, port)) = req
        .uri()
        .authority()
        .and_then(|a| split_authority(a.as_str(), 80))
    else {
        return text(StatusCode::BAD_REQUEST, "bottle gate: the URL has no host");
    };
    let live = gate.live();
    let method = req.method().to_string();
    let admitted = admit(
        &gate,
        &live,
        &bottle,
        &method,
        req.headers(),
        host.clone(),
        port,
    )
    .await;
    let (agent, rule, _intercept, addrs) = match admitted {
        Ok(a) => a,
        Err(response) => return response,
    };
    let target = Target {
        gate: &gate,
        bottle: &bottle,
        agent: Some(&agent),
        method: &method,
        host: host.clone(),
        port,
    };
    let mut req = boxed(req);
    strip_hop_by_hop(req.headers_mut());
    // The Host is the URL's: another one would reach another site behind
    // the same address than the one allowed.
    let authority = req.uri().authority().map(|a| a.as_str().to_owned());
    if let Some(v) = authority.and_then(|a| HeaderValue::from_str(&a).ok()) {
        req.headers_mut().insert(header::HOST, v);
    }
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    *req.uri_mut() = path.parse().unwrap_or_default();
    let failed = |message: String| {
        target.log("failed", json!({"rule": rule, "reason": message}));
        text(StatusCode::BAD_GATEWAY, &format!("bottle gate: {message}"))
    };
    let tcp = match dial(&addrs).await {
        Ok(s) => s,
        Err(e) => return failed(format!("cannot connect to {host}:{port}: {e}")),
    };
    target.log("allowed", json!({"rule": rule, "mode": "http"}));
    let (mut sender, connection) =
        match hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await {
            Ok(pair) => pair,
            Err(e) => return failed(format!("HTTP with {host}:{port}: {e}")),
        };
    tokio::spawn(connection);
    match sender.send_request(req).await {
        Ok(response) => boxed_response(response),
        Err(e) => failed(format!("{host}:{port}: {e}")),
    }
}

/// The names a guest reaches its gate by (the local runtime's loopback,
/// smolvm's gateway address and name); supervise's MCP service accepts
/// each of them as `Host` too ([`super::supervise::ALLOWED_HOSTS`]).
const OWN_HOSTS: [&str; 4] = [
    "127.0.0.1",
    "localhost",
    "100.96.0.1",
    "host.smolvm.internal",
];

/// The addresses a listener on `port` answers to as itself.
fn own_host(host: &str, port: u16) -> bool {
    let host = host.to_ascii_lowercase();
    OWN_HOSTS
        .iter()
        .any(|name| host == format!("{name}:{port}"))
}

/// An origin-form request: the git gateway, supervise, or 404.
async fn origin(
    gate: Arc<Gate>,
    bottle: Arc<str>,
    port: u16,
    req: http::Request<Body>,
) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if !own_host(host, port) {
        let message = format!(
            "Host `{host}` is not this gate (127.0.0.1:{port}, localhost:{port}, 100.96.0.1:{port} or host.smolvm.internal:{port})"
        );
        gate.log.unidentified(
            "gate",
            json!({"event": "wrong_host", "bottle": &*bottle, "host": host, "path": req.uri().path()}),
        );
        return text(StatusCode::FORBIDDEN, &format!("bottle gate: {message}"));
    }
    let path = req.uri().path();
    let endpoint = if path.starts_with("/git/") {
        gate.endpoints.git.clone()
    } else if path.starts_with("/mcp/") {
        gate.endpoints.mcp.clone()
    } else {
        None
    };
    let Some(endpoint) = endpoint else {
        return text(StatusCode::NOT_FOUND, "bottle gate: nothing is served here");
    };
    let live = gate.live();
    let context = EndpointContext {
        bottle: bottle.to_string(),
        config: live.config.clone(),
        secrets: live.secrets.clone(),
        log: gate.log.clone(),
        paths: gate.paths.clone(),
    };
    endpoint.serve(context, req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_decodes_basic_credentials() {
        assert_eq!(
            crate::base64::decode_optional("Y29kZXI6dDE=").unwrap(),
            b"coder:t1"
        );
        assert_eq!(crate::base64::decode_optional("YWI6Yw").unwrap(), b"ab:c");
        assert_eq!(crate::base64::decode_optional("").unwrap(), b"");
        assert!(crate::base64::decode_optional("a").is_none());
        assert!(crate::base64::decode_optional("Y29k*").is_none());
    }

    #[test]
    fn authorities_split_into_host_and_port() {
        assert_eq!(
            split_authority("Api.X.com:8443", 443),
            Some(("api.x.com".into(), 8443))
        );
        assert_eq!(
            split_authority("api.x.com", 80),
            Some(("api.x.com".into(), 80))
        );
        assert_eq!(
            split_authority("[::1]:443", 80),
            Some(("[::1]".into(), 443))
        );
        assert_eq!(split_authority("x:0", 80), None);
        assert_eq!(split_authority("x:y", 80), None);
    }

    #[test]
    fn only_the_listeners_own_addresses_are_its_host() {
        assert!(own_host("127.0.0.1:9000", 9000));
        assert!(own_host("LOCALHOST:9000", 9000));
        assert!(own_host("host.smolvm.internal:9000", 9000));
        assert!(own_host("100.96.0.1:9000", 9000));
        assert!(!own_host("evil.example:9000", 9000));
        assert!(!own_host("127.0.0.1:9001", 9000));
        assert!(!own_host("127.0.0.1", 9000));
    }

    /// A request the listener passes to supervise is never refused there
    /// for its `Host` (rmcp compares names without the port when the
    /// allowed name has none, case-insensitively).
    #[test]
    fn supervise_accepts_every_name_the_listener_answers_to() {
        for name in OWN_HOSTS {
            assert!(
                super::super::supervise::ALLOWED_HOSTS.contains(&name),
                "{name}"
            );
        }
    }
}
