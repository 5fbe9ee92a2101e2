//! The gate process end to end on loopback: the real `bottle gate run`,
//! configured over its control socket, with `curl` as the agent and
//! upstream servers of the test's own (HTTPS with a test CA the gate trusts
//! through `SSL_CERT_FILE`, and clear-text HTTP), all on 127.0.0.1.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bottle::gate::config::{AgentCredentials, BottleGate, CONFIG_FORMAT, GateConfig, GateSecret};
use bottle::gate::control::{self, Health, Request, Response};
use bottle::gate::paths::GatePaths;
use http_body_util::BodyExt;
use tokio_rustls::rustls;

#[path = "support/tls.rs"]
mod tls;

const PROJECT: &str = "gt";
const SECRET: &str = "real-secret-value-0123456789";

fn bottle_exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_bottle"))
}

/// Upstream servers answering every request with what they received:
/// `path=<path> key=<x-api-key header or ->`.
struct Upstream {
    _runtime: tokio::runtime::Runtime,
    /// HTTPS, reached through a tunnel.
    tls: u16,
    /// HTTPS, the host of the secret (intercepted).
    secret: u16,
    /// Clear-text HTTP.
    plain: u16,
    _dir: tempfile::TempDir,
    ca_file: PathBuf,
}

impl Upstream {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (ca_file, mut tls) = tls::localhost_server(dir.path(), "gate test upstream CA");
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tls = Arc::new(tls);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (a, b, c) = runtime.block_on(async {
            let bind = || tokio::net::TcpListener::bind("127.0.0.1:0");
            (
                bind().await.unwrap(),
                bind().await.unwrap(),
                bind().await.unwrap(),
            )
        });
        let port = |l: &tokio::net::TcpListener| l.local_addr().unwrap().port();
        let (tls_port, secret_port, plain_port) = (port(&a), port(&b), port(&c));
        runtime.spawn(serve(a, Some(tls.clone())));
        runtime.spawn(serve(b, Some(tls)));
        runtime.spawn(serve(c, None));
        Self {
            _runtime: runtime,
            tls: tls_port,
            secret: secret_port,
            plain: plain_port,
            _dir: dir,
            ca_file,
        }
    }
}

async fn serve(listener: tokio::net::TcpListener, tls: Option<Arc<rustls::ServerConfig>>) {
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let tls = tls.clone();
        tokio::spawn(async move {
            let service = service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                let key = req
                    .headers()
                    .get("x-api-key")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-")
                    .to_owned();
                let _ = req.into_body().collect().await;
                let body = format!("key={key}");
                Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
                    bytes::Bytes::from(body),
                )))
            });
            let builder = hyper::server::conn::http1::Builder::new();
            match tls {
                Some(tls) => {
                    if let Ok(s) = tokio_rustls::TlsAcceptor::from(tls).accept(stream).await {
                        let _ = builder.serve_connection(TokioIo::new(s), service).await;
                    }
                }
                None => {
                    let _ = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                }
            }
        });
    }
}

/// A gate process of the test's own, in the foreground like a service
/// manager runs it.
struct Gate {
    child: Child,
    state: tempfile::TempDir,
    manifests: tempfile::TempDir,
    paths: GatePaths,
}

impl Gate {
    fn start(upstream: &Upstream) -> Self {
        let manifests = tempfile::tempdir().unwrap();
        std::fs::write(
            manifests.path().join("bottle.toml"),
            format!("[project]\nname = \"{PROJECT}\"\n\n[bottle.dev]\n\n[agent.coder]\nbottle = \"dev\"\n"),
        )
        .unwrap();
        let state = tempfile::tempdir().unwrap();
        let paths = GatePaths::new(state.path(), PROJECT);
        let child = Self::spawn(state.path(), manifests.path(), upstream, &[]);
        let gate = Self {
            child,
            state,
            manifests,
            paths,
        };
        gate.wait_health(|_| true);
        gate
    }

    fn spawn(state: &Path, manifests: &Path, upstream: &Upstream, env: &[(&str, &str)]) -> Child {
        Self::command(state, manifests, upstream, env)
            .spawn()
            .unwrap()
    }

    fn command(
        state: &Path,
        manifests: &Path,
        upstream: &Upstream,
        env: &[(&str, &str)],
    ) -> Command {
        let mut command = Command::new(bottle_exe());
        command
            .arg("--state-dir")
            .arg(state)
            .args(["gate", "run"])
            .arg(manifests)
            .env("SSL_CERT_FILE", &upstream.ca_file)
            .env_remove("SSL_CERT_DIR")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        command
    }

    #[track_caller]
    fn wait_health(&self, ok: impl Fn(&Health) -> bool) -> Health {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Response::Health(h)) = control::call(&self.paths.control(), &Request::Health)
                && ok(&h)
            {
                return h;
            }
            assert!(Instant::now() < deadline, "the gate did not answer in time");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Send a config and its values; the ports each bottle got.
    #[track_caller]
    fn reload(&self, config: &GateConfig, secrets: &[(&str, &str)]) -> BTreeMap<String, u16> {
        let request = Request::Reload {
            config: config.clone(),
            secrets: secrets
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        let answer = control::call(&self.paths.control(), &request).unwrap();
        assert_eq!(answer, Response::Ok);
        let health = self.wait_health(|_| true);
        assert_eq!(health.config_hash, config.hash());
        health.ports
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.paths.log()).unwrap_or_default()
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent(token: &str, placeholder: &str) -> AgentCredentials {
    AgentCredentials {
        proxy_token: token.into(),
        placeholders: [("API_KEY".to_owned(), placeholder.to_owned())].into(),
        ..Default::default()
    }
}

/// `dev` (agents coder and reviewer, loopback allowed, a secret for the
/// `secret` upstream) and `ops` (agent opsagent, no internal addresses).
fn config(up: &Upstream, dev_allow: Vec<String>) -> GateConfig {
    let dev = BottleGate {
        port: 0,
        allow_hosts: dev_allow,
        allow_internal: vec!["127.0.0.0/8".into()],
        secrets: vec![GateSecret {
            name: "API_KEY".into(),
            hosts: vec![
                format!("localhost:{}", up.secret),
                format!("localhost:{}", up.plain),
            ],
            value_key: "TEST_API_KEY".into(),
        }],
        agents: [
            ("coder".to_owned(), agent("coder-token", "ph-coder")),
            (
                "reviewer".to_owned(),
                agent("reviewer-token", "ph-reviewer"),
            ),
        ]
        .into(),
        ..Default::default()
    };
    let ops = BottleGate {
        port: 0,
        allow_hosts: vec![format!("localhost:{}", up.tls)],
        agents: [("opsagent".to_owned(), agent("ops-token", "ph-ops"))].into(),
        ..Default::default()
    };
    GateConfig {
        format_version: CONFIG_FORMAT,
        project: PROJECT.into(),
        bottles: [("dev".to_owned(), dev), ("ops".to_owned(), ops)].into(),
    }
}

fn curl(args: &[&str]) -> Output {
    Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env_remove("HTTPS_PROXY")
        .env_remove("ALL_PROXY")
        .env_remove("all_proxy")
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .env_remove("CURL_CA_BUNDLE")
        .env_remove("SSL_CERT_FILE")
        .stdin(Stdio::null())
        .output()
        .expect("curl is installed (.ci/setup)")
}

fn text(output: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Through bottle `dev`'s listener as `user:token`: (proxy answer to
/// CONNECT, body).
fn through(port: u16, user: &str, ca: &Path, url: &str, extra: &[&str]) -> (String, String) {
    let proxy = format!("http://127.0.0.1:{port}");
    let mut args = vec!["--proxy", &proxy, "--cacert"];
    let ca = ca.to_str().unwrap();
    args.push(ca);
    if !user.is_empty() {
        args.extend(["--proxy-user", user]);
    }
    args.extend(["-w", "\n%{http_connect} %{http_code}"]);
    args.extend(extra);
    args.push(url);
    let out = curl(&args);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, codes) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    (codes.to_owned(), body.to_owned())
}

#[test]
fn egress_is_allowed_denied_and_authenticated_per_bottle() {
    let up = Upstream::start();
    let gate = Gate::start(&up);
    let ports = gate.reload(
        &config(
            &up,
            vec![
                format!("localhost:{}", up.tls),
                format!("localhost:{}", up.plain),
            ],
        ),
        &[("TEST_API_KEY", SECRET)],
    );
    let (dev, ops) = (ports["dev"], ports["ops"]);
    let tls_url = format!("https://localhost:{}/hello", up.tls);

    // Allowed: a tunnel to the HTTPS upstream, verified by curl itself.
    let (codes, body) = through(dev, "coder:coder-token", &up.ca_file, &tls_url, &[]);
    assert_eq!(codes, "200 200", "{body}");
    assert_eq!(body, "key=-");

    // Denied: a host not in allow_hosts, with the rule named.
    let (codes, _) = through(
        dev,
        "coder:coder-token",
        &up.ca_file,
        "https://denied.example:443/",
        &[],
    );
    assert_eq!(codes, "403 000");
    let out = curl(&[
        "--proxy-user",
        "coder:coder-token",
        "--proxy",
        &format!("http://127.0.0.1:{dev}"),
        "http://denied.example/x",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(
            "denied by allow_hosts: denied.example:80 is not in egress.allow_hosts of bottle `dev`"
        ),
        "{}",
        text(&out)
    );

    // No credential, a wrong one, another bottle's agent: 407.
    let (codes, _) = through(dev, "", &up.ca_file, &tls_url, &[]);
    assert_eq!(codes, "407 000");
    let (codes, _) = through(dev, "coder:wrong", &up.ca_file, &tls_url, &[]);
    assert_eq!(codes, "407 000");
    let (codes, _) = through(dev, "opsagent:ops-token", &up.ca_file, &tls_url, &[]);
    assert_eq!(codes, "407 000");
    let (codes, _) = through(dev, "coder:ops-token", &up.ca_file, &tls_url, &[]);
    assert_eq!(codes, "407 000");
    let (codes, _) = through(ops, "coder:coder-token", &up.ca_file, &tls_url, &[]);
    assert_eq!(codes, "407 000");

    // ops allows the host but not internal addresses: localhost is refused.
    let out = curl(&[
        "--proxy-user",
        "opsagent:ops-token",
        "--proxy",
        &format!("http://127.0.0.1:{ops}"),
        &format!("http://localhost:{}/x", up.tls),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("denied by internal address: localhost resolves to")
            && stdout.contains("loopback address outside egress.allow_internal of bottle `ops`"),
        "{}",
        text(&out)
    );
    let (codes, _) = through(ops, "opsagent:ops-token", &up.ca_file, &tls_url, &[]);
    assert_eq!(codes, "403 000");

    // Each decision is a JSON line naming the agent.
    let log = gate.log();
    let events: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).expect("every log line is JSON"))
        .filter(|e: &serde_json::Value| e["kind"] == "egress")
        .collect();
    let find = |decision: &str, agent: serde_json::Value, host: &str| {
        events
            .iter()
            .any(|e| e["decision"] == decision && e["agent"] == agent && e["host"] == host)
    };
    assert!(find("allowed", "coder".into(), "localhost"), "{log}");
    assert!(find("denied", "coder".into(), "denied.example"), "{log}");
    assert!(
        find("denied", serde_json::Value::Null, "localhost"),
        "{log}"
    );
    assert!(find("denied", "opsagent".into(), "localhost"), "{log}");
    assert!(!log.contains(SECRET));
    assert!(!log.contains("coder-token"));

    // `bottle egress-log`: readable, one line per decision, by agent.
    let egress_log = |args: &[&str]| {
        let out = Command::new(bottle_exe())
            .arg("--state-dir")
            .arg(gate.state.path())
            .arg("egress-log")
            .arg(gate.manifests.path())
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8(out.stdout).unwrap()
    };
    let coder = egress_log(&["--agent", "coder"]);
    let lines: Vec<&str> = coder.lines().collect();
    assert!(
        lines.iter().any(|l| l.contains("dev/coder")
            && l.contains("allowed")
            && l.contains(&format!(
                "CONNECT localhost:{}  tunnel (allow_hosts: localhost:{})",
                up.tls, up.tls
            ))),
        "{coder}"
    );
    assert!(
        lines.iter().any(|l| l.contains("denied")
            && l.contains(
                "CONNECT denied.example:443  denied.example:443 is not in egress.allow_hosts"
            )),
        "{coder}"
    );
    assert!(lines.iter().all(|l| l.contains("dev/coder")), "{coder}");
    let ops = egress_log(&["--agent", "opsagent", "--json"]);
    assert!(!ops.is_empty());
    for line in ops.lines() {
        let event: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(event["agent"], "opsagent");
    }
    assert!(egress_log(&[]).lines().count() > coder.lines().count());

    // --follow prints decisions made after it started.
    let mut follow = Command::new(bottle_exe())
        .arg("--state-dir")
        .arg(gate.state.path())
        .args(["egress-log", "--follow", "--agent", "coder"])
        .arg(gate.manifests.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let (send, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if send.send(line.unwrap_or_default()).is_err() {
                break;
            }
        }
    });
    let (codes, _) = through(
        dev,
        "coder:coder-token",
        &up.ca_file,
        "https://later.example/",
        &[],
    );
    assert_eq!(codes, "403 000");
    let deadline = Instant::now() + Duration::from_secs(10);
    let found = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains("later.example") => break true,
            Ok(_) => {}
            Err(_) => break false,
        }
    };
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(found, "egress-log --follow did not print the new decision");
}

#[test]
fn secrets_reach_only_their_hosts_inside_intercepted_tls_for_their_agent() {
    let up = Upstream::start();
    let gate = Gate::start(&up);
    let ports = gate.reload(&config(&up, vec![]), &[("TEST_API_KEY", SECRET)]);
    let dev = ports["dev"];
    let ca = gate.paths.ca_cert();
    let url = format!("https://localhost:{}/v1", up.secret);

    // The agent sends its placeholder; the upstream receives the value.
    // curl trusts the gate's leaf through ca.pem alone (no -k).
    let (codes, body) = through(
        dev,
        "coder:coder-token",
        &ca,
        &url,
        &["-H", "x-api-key: ph-coder"],
    );
    assert_eq!(codes, "200 200", "{body}");
    assert_eq!(body, format!("key={SECRET}"));
    // Inside a longer header value too.
    let (_, body) = through(
        dev,
        "coder:coder-token",
        &ca,
        &url,
        &["-H", "x-api-key: Bearer ph-coder!"],
    );
    assert_eq!(body, format!("key=Bearer {SECRET}!"));

    // Another Host inside the tunnel (a site on the same front end) gets
    // nothing.
    let (codes, body) = through(
        dev,
        "coder:coder-token",
        &ca,
        &url,
        &["-H", "x-api-key: ph-coder", "-H", "Host: elsewhere.example"],
    );
    assert_eq!(codes, "200 403", "{body}");
    assert!(
        body.contains("a request for `elsewhere.example` inside a tunnel to localhost:"),
        "{body}"
    );

    // Another agent's placeholder is not this agent's: left as it is.
    let (codes, body) = through(
        dev,
        "coder:coder-token",
        &ca,
        &url,
        &["-H", "x-api-key: ph-reviewer"],
    );
    assert_eq!(codes, "200 200");
    assert_eq!(body, "key=ph-reviewer");
    let (_, body) = through(
        dev,
        "reviewer:reviewer-token",
        &ca,
        &url,
        &["-H", "x-api-key: ph-reviewer"],
    );
    assert_eq!(body, format!("key={SECRET}"));

    // Clear-text HTTP to a host of the secret: never replaced.
    let plain = format!("http://localhost:{}/v1", up.plain);
    let (codes, body) = through(
        dev,
        "coder:coder-token",
        &ca,
        &plain,
        &["-H", "x-api-key: ph-coder"],
    );
    assert_eq!(codes, "000 200", "{body}");
    assert_eq!(body, "key=ph-coder");

    // Without the project CA the interception is visible, not silent.
    let (codes, _) = through(
        dev,
        "coder:coder-token",
        &up.ca_file,
        &url,
        &["-H", "x-api-key: ph-coder"],
    );
    assert_eq!(codes, "200 000");

    let log = gate.log();
    assert!(!log.contains(SECRET), "{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("\"decision\":\"credential_added\"")
                && l.contains("\"secret\":\"API_KEY\"")
                && l.contains("\"headers\":[\"x-api-key\"]")
                && l.contains("\"agent\":\"coder\"")),
        "{log}"
    );
    assert!(log.contains("\"mode\":\"intercept\""), "{log}");
}

fn basic(user_pass: &str) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in user_pass.as_bytes().chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Read one HTTP response (status line, headers, Content-Length body).
fn read_response(reader: &mut BufReader<TcpStream>) -> (String, String) {
    let mut status = String::new();
    reader.read_line(&mut status).unwrap();
    let mut length = 0;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap();
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    (status.trim().to_owned(), String::from_utf8(body).unwrap())
}

#[test]
fn a_reload_changes_the_rules_and_keeps_open_tunnels() {
    let up = Upstream::start();
    let gate = Gate::start(&up);
    let mut first = config(
        &up,
        vec![
            format!("localhost:{}", up.tls),
            format!("localhost:{}", up.plain),
        ],
    );
    // The clear-text upstream is tunnelled here, not a secret's host.
    first.bottles.get_mut("dev").unwrap().secrets[0]
        .hosts
        .truncate(1);
    let ports = gate.reload(&first, &[("TEST_API_KEY", SECRET)]);
    let (dev, ops) = (ports["dev"], ports["ops"]);
    let pid = gate.wait_health(|_| true).pid;

    // A tunnel to the clear-text upstream, opened before the reload.
    let stream = TcpStream::connect(("127.0.0.1", dev)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    write!(
        writer,
        "CONNECT localhost:{p} HTTP/1.1\r\nHost: localhost:{p}\r\nProxy-Authorization: Basic {}\r\n\r\n",
        basic("coder:coder-token"),
        p = up.plain
    )
    .unwrap();
    let (status, _) = read_response(&mut reader);
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    write!(
        writer,
        "GET /one HTTP/1.1\r\nHost: localhost\r\nx-api-key: a\r\n\r\n"
    )
    .unwrap();
    assert_eq!(read_response(&mut reader).1, "key=a");

    // The reload takes the TLS upstream away and adds nothing else.
    let tls_url = format!("https://localhost:{}/hello", up.tls);
    let (codes, _) = through(dev, "coder:coder-token", &up.ca_file, &tls_url, &[]);
    assert_eq!(codes, "200 200");
    let mut second = first.clone();
    second.bottles.get_mut("dev").unwrap().allow_hosts = vec![];
    second.bottles.remove("ops");
    let ports = gate.reload(&second, &[("TEST_API_KEY", SECRET)]);
    assert_eq!(
        ports,
        [("dev".to_owned(), dev)].into(),
        "dev keeps its listener, ops's closes"
    );
    assert!(
        TcpStream::connect(("127.0.0.1", ops)).is_err(),
        "ops's listener is closed"
    );
    let (codes, _) = through(dev, "coder:coder-token", &up.ca_file, &tls_url, &[]);
    assert_eq!(codes, "403 000");

    // The tunnel opened before still works; the gate did not restart.
    write!(
        writer,
        "GET /two HTTP/1.1\r\nHost: localhost\r\nx-api-key: b\r\n\r\n"
    )
    .unwrap();
    assert_eq!(read_response(&mut reader).1, "key=b");
    assert_eq!(gate.wait_health(|_| true).pid, pid);

    // A bad config is refused whole and the gate serves what it served.
    let mut wrong = second.clone();
    wrong.project = "other".into();
    let answer = control::call(
        &gate.paths.control(),
        &Request::Reload {
            config: wrong,
            secrets: BTreeMap::new(),
        },
    )
    .unwrap();
    assert!(matches!(answer, Response::Error { message } if message.contains("project `gt`")));
    assert_eq!(gate.wait_health(|_| true).config_hash, second.hash());
}

#[test]
fn one_gate_per_project_restarting_from_its_config_and_the_environment() {
    let up = Upstream::start();
    let mut gate = Gate::start(&up);
    let mut cfg = config(&up, vec![]);
    cfg.bottles.remove("ops");
    gate.reload(&cfg, &[("TEST_API_KEY", SECRET)]);
    let pid = gate.wait_health(|_| true).pid;

    // A second gate for the project is refused, naming the first.
    let second = Command::new(bottle_exe())
        .arg("--state-dir")
        .arg(gate.state.path())
        .args(["gate", "run"])
        .arg(gate.manifests.path())
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains(&format!(
            "a gate for project `gt` already runs (pid {pid} since"
        )),
        "{stderr}"
    );

    // Stop: it answers, releases its lock and removes its socket.
    assert!(bottle::gate::server::stop(&gate.paths, Duration::from_secs(10)).unwrap());
    let status = gate.child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(!gate.paths.control().exists());
    assert!(!gate.paths.pid().exists());
    let config_json = std::fs::read_to_string(gate.paths.config()).unwrap();
    assert!(!config_json.contains(SECRET));

    // Run again in the foreground: the config it kept, the value from its
    // environment (named by value_key).
    gate.child = Gate::spawn(
        gate.state.path(),
        gate.manifests.path(),
        &up,
        &[("TEST_API_KEY", "value-from-env")],
    );
    let health = gate.wait_health(|h| h.ports.contains_key("dev"));
    assert_eq!(health.config_hash, cfg.hash());
    let url = format!("https://localhost:{}/v1", up.secret);
    let (_, body) = through(
        health.ports["dev"],
        "coder:coder-token",
        &gate.paths.ca_cert(),
        &url,
        &["-H", "x-api-key: ph-coder"],
    );
    assert_eq!(body, "key=value-from-env");
    assert!(!gate.log().contains("value-from-env"));

    // A service manager stops it with SIGTERM: it ends cleanly.
    // SAFETY: sends a signal to the gate this test started.
    unsafe {
        libc::kill(gate.child.id() as i32, libc::SIGTERM);
    }
    let status = gate.child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(!gate.paths.control().exists());
    assert!(gate.log().contains("\"reason\":\"SIGTERM\""));
}

#[test]
fn the_gate_starts_detached_with_its_values_on_a_pipe() {
    let state = tempfile::tempdir().unwrap();
    let mut cfg = GateConfig {
        format_version: CONFIG_FORMAT,
        project: "detached".into(),
        ..Default::default()
    };
    cfg.bottles.insert(
        "dev".into(),
        BottleGate {
            agents: [("coder".to_owned(), agent("t", "p"))].into(),
            ..Default::default()
        },
    );
    let secrets = [("K".to_owned(), "detached-secret".to_owned())].into();
    let health =
        bottle::gate::server::start_detached(bottle_exe(), state.path(), &cfg, &secrets).unwrap();
    assert_eq!(health.config_hash, cfg.hash());
    let paths = GatePaths::new(state.path(), "detached");
    let port = health.ports["dev"];

    // Origin-form requests: the Host must be the listener's own; the git
    // gateway asks for the agent's credential, supervise knows no token `x`.
    let get = |host: &str, path: &str| {
        curl(&[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            &format!("Host: {host}"),
            &format!("http://127.0.0.1:{port}{path}"),
        ])
    };
    let code = |o: Output| String::from_utf8_lossy(&o.stdout).to_string();
    assert_eq!(
        code(get(&format!("127.0.0.1:{port}"), "/git/app.git/info/refs")),
        "401"
    );
    assert_eq!(
        code(get(&format!("host.smolvm.internal:{port}"), "/mcp/x")),
        "404"
    );
    assert_eq!(code(get("evil.example", "/git/app.git/info/refs")), "403");
    assert_eq!(
        code(get(&format!("localhost:{}", port + 1), "/mcp/x")),
        "403"
    );

    // A second start says why it could not.
    let again = bottle::gate::server::start_detached(bottle_exe(), state.path(), &cfg, &secrets)
        .unwrap_err()
        .to_string();
    assert!(
        again.contains(&format!(
            "a gate for project `detached` already runs (pid {}",
            health.pid
        )),
        "{again}"
    );

    let ps = Command::new("ps")
        .args(["-o", "args=", "-p", &health.pid.to_string()])
        .output()
        .unwrap();
    let args = String::from_utf8_lossy(&ps.stdout);
    assert!(args.contains("gate run --config-from-stdin"), "{args}");
    assert!(!args.contains("detached-secret"));
    assert!(bottle::gate::server::stop(&paths, Duration::from_secs(10)).unwrap());
    assert!(!bottle::gate::server::stop(&paths, Duration::from_secs(1)).unwrap());
}

/// A gate of the test's own with 512 descriptors (soft and hard), serving
/// [`config`] with ops allowed to reach the TLS upstream on loopback.
fn gate_with_few_descriptors(up: &Upstream) -> (Gate, BTreeMap<String, u16>) {
    use std::os::unix::process::CommandExt;
    let manifests = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let paths = GatePaths::new(state.path(), PROJECT);
    std::fs::write(
        manifests.path().join("bottle.toml"),
        format!(
            "[project]\nname = \"{PROJECT}\"\n\n[bottle.dev]\n\n[agent.coder]\nbottle = \"dev\"\n"
        ),
    )
    .unwrap();
    let mut command = Gate::command(state.path(), manifests.path(), up, &[]);
    // SAFETY: setrlimit only, between fork and exec.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 512,
                rlim_max: 512,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let gate = Gate {
        child: command.spawn().unwrap(),
        state,
        manifests,
        paths,
    };
    gate.wait_health(|_| true);
    let mut cfg = config(up, vec![format!("localhost:{}", up.tls)]);
    cfg.bottles.get_mut("ops").unwrap().allow_internal = vec!["127.0.0.0/8".into()];
    let ports = gate.reload(&cfg, &[("TEST_API_KEY", SECRET)]);
    (gate, ports)
}

/// Idle connections to `port` (no request on them), until the listener
/// takes no more (bounded).
fn idle_connections(port: u16) -> Vec<TcpStream> {
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let mut idle = Vec::new();
    let mut failed = 0;
    while idle.len() < 1000 && failed < 3 {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(s) => {
                idle.push(s);
                failed = 0;
            }
            Err(_) => failed += 1,
        }
    }
    idle
}

/// Attack: another bottle's guest (on smolvm every guest reaches every
/// listener), or anything on the host, filled a bottle's listener with
/// idle connections (no credential needed, each re-opened when the header
/// timeout closes it): the bottle's own agents waited for a slot. Now a
/// listener at its bound closes the oldest connection that has not yet
/// shown a credential of the bottle to accept a new one.
#[test]
fn idle_connections_without_a_credential_do_not_lock_the_bottles_agents_out() {
    let up = Upstream::start();
    let (_gate, ports) = gate_with_few_descriptors(&up);
    let idle = idle_connections(ports["dev"]);
    assert!(idle.len() > 16, "{}", idle.len());
    let url = format!("https://localhost:{}/hello", up.tls);
    let (codes, body) = through(ports["dev"], "coder:coder-token", &up.ca_file, &url, &[]);
    assert_eq!(codes, "200 200", "{body}");
    drop(idle);
}

/// Attack: with the usual limit of 1024 descriptors, an agent (no
/// credential needed) opened idle connections to its bottle's listener
/// until the gate had no descriptor left, and another bottle's agents could
/// reach nothing. Now the gate raises its soft limit to the hard one and
/// shares the descriptors it has between its listeners: one bottle's
/// connections wait for that bottle's share only.
#[test]
fn idle_connections_to_one_bottle_leave_the_other_bottles_served() {
    let up = Upstream::start();
    let (_gate, ports) = gate_with_few_descriptors(&up);
    let idle = idle_connections(ports["dev"]);
    assert!(idle.len() > 16, "{}", idle.len());

    // ops's agent still goes through its own listener.
    let url = format!("https://localhost:{}/hello", up.tls);
    let (codes, body) = through(ports["ops"], "opsagent:ops-token", &up.ca_file, &url, &[]);
    assert_eq!(codes, "200 200", "{body}");
    drop(idle);
}

/// Attack: pipelined proxy requests without a credential, each a line in
/// the gate log (1.9 MB/s from one connection, without bound). Now such
/// lines are sampled past a bound a minute (and the log is rotated).
#[test]
fn requests_without_a_credential_do_not_flood_the_log() {
    let up = Upstream::start();
    let gate = Gate::start(&up);
    let ports = gate.reload(&config(&up, vec![]), &[("TEST_API_KEY", SECRET)]);
    let before = gate.log().lines().count();
    let stream = TcpStream::connect(("127.0.0.1", ports["dev"])).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    const SENT: usize = 3000;
    for _ in 0..SENT / 100 {
        let batch = "GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n".repeat(100);
        writer.write_all(batch.as_bytes()).unwrap();
        for _ in 0..100 {
            let (status, _) = read_response(&mut reader);
            assert!(status.starts_with("HTTP/1.1 407"), "{status}");
        }
    }
    let log = gate.log();
    let written = log.lines().count() - before;
    // A minute may turn while it runs: at most twice the bound.
    assert!(
        written <= 2 * (bottle::gate::log::UNIDENTIFIED_PER_MINUTE as usize + 3),
        "{written} lines for {SENT} requests"
    );
    assert!(log.contains("\"similar\":"), "{log}");
}

/// Attack: an agent with its credential opened tunnels until its bottle's
/// listener was full (tunnels have no idle timeout): the other agents of
/// the bottle waited for a slot. Now one agent holds at most half of them.
#[test]
fn one_agents_tunnels_leave_room_for_the_other_agents_of_its_bottle() {
    let up = Upstream::start();
    let (_gate, ports) = gate_with_few_descriptors(&up);
    let mut tunnels = Vec::new();
    let mut refused = None;
    for _ in 0..200 {
        let Ok(stream) = TcpStream::connect(("127.0.0.1", ports["dev"])) else {
            break;
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut writer = stream.try_clone().unwrap();
        let mut reader = BufReader::new(stream);
        write!(
            writer,
            "CONNECT localhost:{p} HTTP/1.1\r\nHost: localhost:{p}\r\nProxy-Authorization: Basic {}\r\n\r\n",
            basic("coder:coder-token"),
            p = up.tls
        )
        .unwrap();
        let mut status = String::new();
        if reader.read_line(&mut status).is_err() || !status.starts_with("HTTP/1.1 200") {
            refused = Some(status);
            break;
        }
        tunnels.push(reader);
    }
    assert!(tunnels.len() >= 4, "{}", tunnels.len());
    assert!(
        refused
            .as_deref()
            .is_some_and(|s| s.starts_with("HTTP/1.1 503")),
        "{refused:?} after {} tunnels",
        tunnels.len()
    );
    let url = format!("https://localhost:{}/hello", up.tls);
    let (codes, body) = through(
        ports["dev"],
        "reviewer:reviewer-token",
        &up.ca_file,
        &url,
        &[],
    );
    assert_eq!(codes, "200 200", "{body}");
    drop(tunnels);
}
