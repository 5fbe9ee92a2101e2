//! A gated bottle end to end, on the local runtime and through the smolvm
//! double (whose gated machines reach the gate at smolvm's gateway
//! `100.96.0.1`, and nothing else); needs root and bwrap. `bottle apply`
//! starts the gate, the guest reaches allowed hosts only through it, holds
//! a placeholder where the real secret would be, trusts the project CA
//! without `-k`; a killed gate is drift that the next apply repairs; an
//! `allow_hosts` edit reaches the running gate without touching the
//! machine; the git gateway (issue 12) and supervise (issue 13) from inside
//! the guest. Each scenario runs on both runtimes. Upstreams are the test's
//! own, on 127.0.0.1.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bottle::runtime::local::LocalRuntime;
use bottle::runtime::{ExecRequest, Runtime};
use tokio_rustls::rustls;

#[path = "support/tls.rs"]
mod tls;

const SECRET: &str = "sk-wiring-e2e-real-value-0123456789";

/// One answer per connection: what the request carried in `x-api-key`.
fn answer(stream: &mut dyn ReadWrite) {
    let mut reader = BufReader::new(&mut *stream);
    let mut key = "-".to_owned();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("x-api-key")
        {
            key = value.trim().to_owned();
        }
    }
    let body = format!("key={key}");
    let _ = write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.flush();
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

struct Upstreams {
    /// HTTPS, certificate for `localhost` from the test's own CA.
    tls: u16,
    /// Clear-text HTTP.
    plain: u16,
    ca_file: PathBuf,
    _dir: tempfile::TempDir,
}

fn upstreams() -> Upstreams {
    let dir = tempfile::tempdir().unwrap();
    let (ca_file, config) = tls::localhost_server(dir.path(), "wiring e2e upstream CA");
    let config = Arc::new(config);
    let tls = TcpListener::bind("127.0.0.1:0").unwrap();
    let plain = TcpListener::bind("127.0.0.1:0").unwrap();
    let ports = (
        tls.local_addr().unwrap().port(),
        plain.local_addr().unwrap().port(),
    );
    std::thread::spawn(move || {
        for conn in tls.incoming().take(64) {
            let Ok(tcp) = conn else { continue };
            let config = config.clone();
            std::thread::spawn(move || {
                let _ = tcp.set_read_timeout(Some(Duration::from_secs(20)));
                let Ok(server) = rustls::ServerConnection::new(config) else {
                    return;
                };
                let mut stream = rustls::StreamOwned::new(server, tcp);
                answer(&mut stream);
                stream.conn.send_close_notify();
                let _ = stream.flush();
            });
        }
    });
    std::thread::spawn(move || {
        for conn in plain.incoming().take(64) {
            let Ok(mut tcp) = conn else { continue };
            let _ = tcp.set_read_timeout(Some(Duration::from_secs(20)));
            answer(&mut tcp);
        }
    });
    Upstreams {
        tls: ports.0,
        plain: ports.1,
        ca_file,
        _dir: dir,
    }
}

mod support;

/// Where a scenario's machines run.
#[derive(Debug, Clone, Copy)]
enum Via {
    /// `bottle --runtime local`.
    Local,
    /// `bottle --smolvm smolvm-double`: smolvm's CLI over the local runtime.
    Double,
}

/// Two `#[test]`s: `scenario` on the local runtime, and through the double.
macro_rules! on_each_runtime {
    ($scenario:ident: $local:ident, $double:ident) => {
        #[test]
        fn $local() {
            $scenario(Via::Local);
        }

        #[test]
        fn $double() {
            $scenario(Via::Double);
        }
    };
}

struct World {
    manifests: tempfile::TempDir,
    state: tempfile::TempDir,
    up: Upstreams,
    /// `Some` when the machines run through the double.
    double: Option<support::Double>,
}

impl World {
    fn new(via: Via) -> Self {
        World {
            manifests: tempfile::tempdir().unwrap(),
            state: tempfile::tempdir().unwrap(),
            up: upstreams(),
            double: match via {
                Via::Local => None,
                Via::Double => Some(support::Double::new()),
            },
        }
    }

    /// `bottle` on this world's runtime and state directory.
    fn bottle_command(&self) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_bottle"));
        match &self.double {
            None => {
                command.args(["--runtime", "local"]);
            }
            Some(double) => {
                command
                    .args(["--runtime", "smolvm", "--smolvm"])
                    .arg(support::Double::binary());
                double.apply_env(&mut command);
            }
        }
        command
            .arg("--state-dir")
            .arg(self.state.path())
            .env_remove("BOTTLE_RUNTIME")
            .env_remove("BOTTLE_SMOLVM")
            .env_remove("BOTTLE_STATE_DIR");
        command
    }

    /// Where what bottle (and the double) keep lives: no secret may be there.
    fn kept_dirs(&self) -> Vec<&Path> {
        let mut dirs = vec![self.state.path()];
        dirs.extend(self.double.as_ref().map(|d| d.home()));
        dirs
    }

    fn write(&self, manifest: &str) {
        std::fs::write(self.manifests.path().join("bottle.toml"), manifest).unwrap();
    }

    fn manifest(&self, allow: &[String]) {
        let hosts: Vec<String> = allow.iter().map(|h| format!("{h:?}")).collect();
        std::fs::write(
            self.manifests.path().join("bottle.toml"),
            format!(
                "[project]\nname = \"gated\"\n\n[bottle.dev]\nuser = \"node\"\n\
                 secrets = {{ API_KEY = {{ from_env = \"WIRING_E2E_KEY\", hosts = [\"localhost:{}\"] }} }}\n\n\
                 [bottle.dev.egress]\nallow_hosts = [{}]\nallow_internal = [\"127.0.0.0/8\"]\n\n\
                 [agent.coder]\nbottle = \"dev\"\nprompt_text = \"You code.\"\n",
                self.up.tls,
                hosts.join(", ")
            ),
        )
        .unwrap();
    }

    fn bottle(&self, args: &[&str]) -> Output {
        let out = self
            .bottle_command()
            .args(args)
            .arg(self.manifests.path())
            .env("WIRING_E2E_KEY", SECRET)
            // The gate (started by apply, with apply's environment)
            // verifies upstream TLS against this.
            .env("SSL_CERT_FILE", &self.up.ca_file)
            .env_remove("SSL_CERT_DIR")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!text.contains(SECRET), "the secret in output:\n{text}");
        out
    }

    /// The local runtime the machines live in (the double's own, through
    /// the double): the test runs its commands in the guest with it, as
    /// the agent user.
    fn runtime(&self) -> LocalRuntime {
        let dir = match &self.double {
            None => self.state.path().join("local"),
            Some(double) => double.home().join("local"),
        };
        LocalRuntime::open(&dir).unwrap()
    }

    /// Run `script` in the guest as the agent user.
    fn guest(&self, script: &str) -> Output {
        self.guest_of("coder", script, &[])
    }

    /// Run `script` (with `args` as `$1`...) as the agent user in the
    /// guest of `agent`.
    fn guest_of(&self, agent: &str, script: &str, args: &[&str]) -> Output {
        let mut argv = vec!["sh", "-c", script, "sh"];
        argv.extend_from_slice(args);
        let out = self
            .runtime()
            .exec(
                &format!("bottle_gated_{agent}"),
                &ExecRequest::new(argv).as_user("node"),
            )
            .unwrap();
        Output {
            status: std::os::unix::process::ExitStatusExt::from_raw(out.status << 8),
            stdout: out.stdout,
            stderr: out.stderr,
        }
    }

    fn gate_pid(&self) -> Option<u32> {
        let paths = bottle::gate::paths::GatePaths::new(self.state.path(), "gated");
        match bottle::gate::reconcile::health(&paths) {
            bottle::gate::reconcile::GateHealth::Running(h) => Some(h.pid),
            _ => None,
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = self
            .bottle_command()
            .args(["destroy", "--yes"])
            .arg(self.manifests.path())
            .output();
        if let Some(pid) = self.gate_pid() {
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

impl World {
    /// `secret` is in no file bottle, its gate or the double keeps.
    fn nowhere_kept(&self, secret: &str) {
        for file in self.kept_dirs().into_iter().flat_map(files_under) {
            let bytes = std::fs::read(&file).unwrap_or_default();
            assert!(
                !text(&bytes).contains(secret),
                "the secret in {}",
                file.display()
            );
        }
    }
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(p),
                Ok(t) if t.is_file() => out.push(p),
                _ => {}
            }
        }
    }
    out
}

on_each_runtime!(a_gated_bottle: a_gated_bottle_on_the_local_runtime, a_gated_bottle_through_the_double);

fn a_gated_bottle(via: Via) {
    let world = World::new(via);
    let (tls, plain) = (world.up.tls, world.up.plain);
    world.manifest(&[format!("localhost:{tls}")]);

    let out = world.bottle(&["apply"]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains("start    gate"),
        "{}",
        text(&out.stdout)
    );
    let out = world.bottle(&["check"]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );

    // Through the proxy (the guest's own HTTPS_PROXY), with the project CA
    // trusted (no -k), the upstream receives the real secret in place of
    // the placeholder the guest sends. NO_PROXY names localhost, so it is
    // dropped for these requests to localhost upstreams.
    let curl = "env -u NO_PROXY -u no_proxy curl -sS --max-time 20";
    let out = world.guest(&format!(
        "{curl} -H \"x-api-key: $API_KEY\" https://localhost:{tls}/"
    ));
    assert_eq!(
        text(&out.stdout),
        format!("key={SECRET}"),
        "{}",
        text(&out.stderr)
    );

    // A host the bottle does not allow: refused by the gate.
    let out = world.guest(&format!(
        "{curl} -o /dev/null -w '%{{http_code}}' http://localhost:{plain}/"
    ));
    assert_eq!(text(&out.stdout), "403", "{}", text(&out.stderr));

    // Around the proxy: nothing is reachable.
    for url in [
        format!("https://localhost:{tls}/"),
        "http://1.1.1.1/".to_owned(),
    ] {
        let out = world.guest(&format!("curl -sS --max-time 5 --noproxy '*' -k {url}"));
        assert!(
            !out.status.success(),
            "{url} reached directly: {}",
            text(&out.stdout)
        );
    }

    // The guest holds the placeholder only: in its environment and files.
    let env = world.guest("env");
    let env = text(&env.stdout);
    assert!(env.contains("API_KEY=bottle-placeholder-"), "{env}");
    assert!(!env.contains(SECRET));
    let grep = world.runtime().exec(
        "bottle_gated_coder",
        &ExecRequest::new([
            "sh",
            "-c",
            "grep -rl -s -F -- \"$1\" /etc /home /var /tmp /opt /root; echo done",
            "sh",
            SECRET,
        ]),
    );
    assert_eq!(text(&grep.unwrap().stdout), "done\n");
    world.nowhere_kept(SECRET);

    // A killed gate is drift, and the next apply starts it again.
    let pid = world.gate_pid().expect("the gate runs");
    assert!(
        Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    std::thread::sleep(Duration::from_millis(200));
    let out = world.bottle(&["check"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stdout));
    assert!(
        text(&out.stdout).contains("gate not running"),
        "{}",
        text(&out.stdout)
    );
    let out = world.bottle(&["apply"]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert_ne!(world.gate_pid(), Some(pid));
    let out = world.guest(&format!(
        "{curl} -H \"x-api-key: $API_KEY\" https://localhost:{tls}/"
    ));
    assert_eq!(
        text(&out.stdout),
        format!("key={SECRET}"),
        "{}",
        text(&out.stderr)
    );

    // allow_hosts edited: the running gate is reloaded, no machine is
    // touched, and the new host is reachable at once.
    let init = world.runtime().record("bottle_gated_coder").unwrap().init;
    world.manifest(&[format!("localhost:{tls}"), format!("localhost:{plain}")]);
    let out = world.bottle(&["plan"]);
    let plan = text(&out.stdout);
    assert!(plan.contains("reload   gate"), "{plan}");
    assert!(plan.contains("Plan: 1 gate to reload."), "{plan}");
    let out = world.bottle(&["apply"]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert_eq!(
        world.runtime().record("bottle_gated_coder").unwrap().init,
        init
    );
    let out = world.guest(&format!("{curl} http://localhost:{plain}/"));
    assert_eq!(text(&out.stdout), "key=-", "{}", text(&out.stderr));
    let out = world.bottle(&["check"]);
    assert!(out.status.success(), "{}", text(&out.stdout));
}

/// On smolvm (the double): the create flags, the guest's environment and
/// the CA, and the gateway: the gate answers at `100.96.0.1` inside the
/// guest, so does any host-loopback port, nothing else is reachable.
#[test]
fn a_gated_machine_on_the_double() {
    const REAL: &str = "sk-wiring-double-real-value-987";
    let p = support::project::Project::with_double(
        "gated",
        support::Double::new()
            .with_env("WIRING_DOUBLE_KEY", REAL)
            .with_env("WIRING_DOUBLE_PLAIN", "plain-value"),
    );
    let run = p.bottle(&["apply"]);
    run.success();
    let paths = bottle::gate::paths::GatePaths::new(p.state_dir(), "gated");
    let stop_gate = scopeguard(paths.clone());
    let port = match bottle::gate::reconcile::health(&paths) {
        bottle::gate::reconcile::GateHealth::Running(h) => h.ports["dev"],
        other => panic!("the gate does not run: {other:?}\n{}", run.all()),
    };
    let create = p
        .double
        .calls()
        .into_iter()
        .find(|c| c.verb == "create")
        .unwrap()
        .args
        .join(" ");
    assert!(
        create.contains("--allow-cidr 100.96.0.1/32 --allow-cidr 10.8.0.0/16"),
        "{create}"
    );
    assert!(!create.contains("--allow-host"), "{create}");
    assert!(!create.contains(REAL), "{create}");
    assert!(
        !create.contains("WIRING_DOUBLE_KEY"),
        "a secret with hosts is not the guest's: {create}"
    );
    assert!(
        create.contains("--secret-env PLAIN=WIRING_DOUBLE_PLAIN"),
        "{create}"
    );

    let machine = "bottle_gated_coder";
    let env = p.double.sh(machine, "env");
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(paths.state()).unwrap()).unwrap();
    let creds = &state["agents"]["coder"];
    let proxy = format!(
        "http://coder:{}@100.96.0.1:{port}",
        creds["proxy_token"].as_str().unwrap()
    );
    for var in ["HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"] {
        assert!(env.contains(&format!("{var}={proxy}\n")), "{var}:\n{env}");
    }
    assert!(
        env.contains("NO_PROXY=localhost,127.0.0.1,::1,100.96.0.1,host.smolvm.internal\n"),
        "{env}"
    );
    for var in [
        "NODE_EXTRA_CA_CERTS",
        "SSL_CERT_FILE",
        "REQUESTS_CA_BUNDLE",
        "GIT_SSL_CAINFO",
    ] {
        assert!(
            env.contains(&format!("{var}=/etc/ssl/certs/ca-certificates.crt\n")),
            "{var}:\n{env}"
        );
    }
    let placeholder = creds["placeholders"]["API_KEY"].as_str().unwrap();
    assert!(env.contains(&format!("API_KEY={placeholder}\n")), "{env}");
    assert!(env.contains("PLAIN=plain-value\n"), "{env}");
    assert!(!env.contains(REAL));

    // The project CA, installed and in the trust bundle.
    let ca = std::fs::read_to_string(paths.ca_cert()).unwrap();
    let installed = p.double.sh(
        machine,
        "cat /usr/local/share/ca-certificates/bottle-dev-gate.crt",
    );
    assert_eq!(installed, ca);
    let last = ca.lines().rev().nth(1).unwrap();
    let bundle = p
        .double
        .sh(machine, "cat /etc/ssl/certs/ca-certificates.crt");
    assert!(bundle.contains(last), "the CA is not in the trust bundle");

    // The gate at the gateway, through the guest's own proxy variables: it
    // answers (refusing a host the bottle does not allow) with its CA.
    let refused = p.double.sh(
        machine,
        "curl -sS --max-time 20 -o /dev/null -w '%{http_code}' http://example.invalid/",
    );
    assert_eq!(refused, "403");
    // As on smolvm, any port of the gateway leads to the host's loopback:
    // here a server of the test's own, not the gate.
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let other = server.local_addr().unwrap().port();
    let serving = std::thread::spawn(move || {
        if let Some(Ok(mut tcp)) = server.incoming().next() {
            let _ = tcp.set_read_timeout(Some(Duration::from_secs(20)));
            let _ = tcp.read(&mut [0; 1024]);
            let _ = tcp.write_all(b"HTTP/1.0 200 OK\r\n\r\nhost loopback");
        }
    });
    let url = format!("http://100.96.0.1:{other}/");
    let said = p.double.sh(
        machine,
        &format!("curl -sS --max-time 20 --noproxy '*' {url}"),
    );
    assert_eq!(said, "host loopback");
    serving.join().unwrap();
    // Around it: nothing.
    for url in [
        format!("http://127.0.0.1:{port}/"),
        "http://1.1.1.1/".to_owned(),
    ] {
        let out = p.double.exec(
            machine,
            &["curl", "-sS", "--max-time", "5", "--noproxy", "*", &url],
        );
        assert!(!out.status.success(), "{url} reached directly");
    }
    p.bottle(&["check"]).success();
    drop(stop_gate);
}

/// Stops the gate when the test ends, pass or fail.
struct StopGate(bottle::gate::paths::GatePaths);

fn scopeguard(paths: bottle::gate::paths::GatePaths) -> StopGate {
    StopGate(paths)
}

impl Drop for StopGate {
    fn drop(&mut self) {
        let _ = bottle::gate::reconcile::stop(&self.0);
    }
}

/// `bottle watch` starts a gate that died again, without waiting for its
/// resync (disabled here).
#[test]
fn watch_restarts_a_gate_that_died() {
    let world = World::new(Via::Local);
    world.manifest(&[format!("localhost:{}", world.up.tls)]);
    let out = world.bottle(&["apply"]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let mut watch = world
        .bottle_command()
        .args(["watch", "--resync", "0"])
        .arg(world.manifests.path())
        .env("WIRING_E2E_KEY", SECRET)
        .env("SSL_CERT_FILE", &world.up.ca_file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _ = watch.stdin.take();
    let watch = Kill(watch);
    let pid = world.gate_pid().expect("the gate runs");
    assert!(
        Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let restarted = loop {
        match world.gate_pid() {
            Some(new) if new != pid => break Some(new),
            _ if std::time::Instant::now() > deadline => break None,
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    assert!(restarted.is_some(), "watch did not start the gate again");

    // An allow_hosts edit reaches the running gate: the new host answers,
    // the machine was not restarted.
    let init = world.runtime().record("bottle_gated_coder").unwrap().init;
    let plain = world.up.plain;
    world.manifest(&[
        format!("localhost:{}", world.up.tls),
        format!("localhost:{plain}"),
    ]);
    let curl =
        format!("env -u NO_PROXY -u no_proxy curl -sS --max-time 10 http://localhost:{plain}/");
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let out = world.guest(&curl);
        if text(&out.stdout) == "key=-" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the edit never reached the gate: {}",
            text(&out.stdout)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(
        world.runtime().record("bottle_gated_coder").unwrap().init,
        init
    );
    drop(watch);
}

/// From inside a guest: JSON-RPC over HTTP (curl) to the supervise URL the
/// `supervise` step wrote in `~/.claude.json`, served by the bottle's gate.
/// Prints the body, then the HTTP status on a line of its own.
const MCP: &str = r#"home=${HOME:-$(getent passwd "$(id -un)" | cut -d: -f6)}
url=$(sed -n 's/.*"url": *"\([^"]*\)".*/\1/p' "$home/.claude.json")
[ -n "$url" ] || { echo "no supervise url in $home/.claude.json" >&2; exit 9; }
[ -z "$2" ] || url="${url%/*}/$2"
curl -sS --max-time 20 -w '\n%{http_code}' \
  -H 'content-type: application/json' \
  -H 'accept: application/json, text/event-stream' \
  -H 'mcp-protocol-version: 2025-06-18' \
  --data-binary "$1" "$url""#;

impl World {
    /// POST `body` to the agent's supervise URL from inside its guest
    /// (`token`: another token in its place): the status and the body.
    fn mcp_raw(&self, agent: &str, body: &str, token: Option<&str>) -> (u16, String) {
        let out = self.guest_of(agent, MCP, &[body, token.unwrap_or("")]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let stdout = text(&out.stdout);
        let (body, status) = stdout.rsplit_once('\n').unwrap();
        (status.trim().parse().unwrap(), body.to_owned())
    }

    /// One JSON-RPC request from `agent`'s guest; the parsed answer.
    fn mcp(&self, agent: &str, method: &str, params: serde_json::Value) -> serde_json::Value {
        let body =
            serde_json::json!({"jsonrpc": "2.0", "id": 7, "method": method, "params": params});
        let (status, text) = self.mcp_raw(agent, &body.to_string(), None);
        assert_eq!(status, 200, "{method}: {text}");
        let value: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert_eq!(value["id"], 7, "{text}");
        value
    }

    /// `tools/call` from `agent`'s guest: (is_error, structured or text content).
    fn tool(
        &self,
        agent: &str,
        tool: &str,
        arguments: serde_json::Value,
    ) -> (bool, serde_json::Value) {
        let answer = self.mcp(
            agent,
            "tools/call",
            serde_json::json!({"name": tool, "arguments": arguments}),
        );
        let result = &answer["result"];
        let content = if result["structuredContent"].is_null() {
            result["content"][0]["text"].clone()
        } else {
            result["structuredContent"].clone()
        };
        (result["isError"].as_bool().unwrap_or(false), content)
    }

    /// The HTTP status of a GET through `agent`'s proxy, and the body.
    fn through_proxy(&self, agent: &str, url: &str) -> (String, String) {
        let out = self.guest_of(
            agent,
            "env -u NO_PROXY -u no_proxy curl -sS --max-time 20 -w '\n%{http_code}' \"$1\"",
            &[url],
        );
        let stdout = text(&out.stdout);
        let (body, status) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
        (status.to_owned(), body.to_owned())
    }
}

on_each_runtime!(supervise_from_inside_a_guest: supervise_from_inside_a_guest_on_the_local_runtime, supervise_from_inside_a_guest_through_the_double);

/// Issue 13 end to end, on each runtime: an agent asks for a host
/// through its gate's supervise endpoint from inside its guest, the
/// operator approves, the agent (and only it) gets through, `check` names
/// the grant, `revoke` closes it; a second agent cannot see or answer the
/// first one's requests; bad bodies get JSON-RPC errors.
fn supervise_from_inside_a_guest(via: Via) {
    let world = World::new(via);
    let (tls, plain) = (world.up.tls, world.up.plain);
    world.write(&format!(
        "[project]\nname = \"gated\"\n\n[bottle.dev]\nuser = \"node\"\n\n\
         [bottle.dev.egress]\nallow_hosts = [\"localhost:{tls}\"]\nallow_internal = [\"127.0.0.0/8\"]\n\n\
         [bottle.dev.supervise]\n\n\
         [agent.coder]\nbottle = \"dev\"\n\n[agent.other]\nbottle = \"dev\"\n"
    ));
    let out = world.bottle(&["apply"]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let paths = bottle::gate::paths::GatePaths::new(world.state.path(), "gated");
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(paths.state()).unwrap()).unwrap();
    let coder_token = state["agents"]["coder"]["mcp_token"].as_str().unwrap();
    let other_token = state["agents"]["other"]["mcp_token"].as_str().unwrap();
    let config = world.guest_of("coder", "cat ~/.claude.json", &[]);
    assert!(
        text(&config.stdout).contains(&format!("/mcp/{coder_token}")),
        "{}",
        text(&config.stdout)
    );
    assert_ne!(coder_token, other_token);
    assert!(!text(&config.stdout).contains(other_token));

    // The MCP handshake and the tools, as Claude Code's client asks.
    let init = world.mcp(
        "coder",
        "initialize",
        serde_json::json!({"protocolVersion": "2025-06-18", "capabilities": {},
                           "clientInfo": {"name": "curl", "version": "1"}}),
    );
    assert_eq!(init["result"]["serverInfo"]["name"], "bottle-supervise");
    let (status, _) = world.mcp_raw(
        "coder",
        r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
        None,
    );
    assert_eq!(status, 202);
    let tools = world.mcp("coder", "tools/list", serde_json::json!({}));
    let names: Vec<&str> = tools["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"request_egress"), "{names:?}");

    // Before any request: the host is refused through the proxy.
    let wanted = format!("http://localhost:{plain}/");
    assert_eq!(world.through_proxy("coder", &wanted).0, "403");

    // The agent asks; the operator sees the request.
    let (is_error, asked) = world.tool(
        "coder",
        "request_egress",
        serde_json::json!({"host": format!("localhost:{plain}"), "reason": "fetch the fixtures"}),
    );
    assert!(!is_error, "{asked}");
    assert_eq!(asked["state"], "pending", "{asked}");
    let id = asked["id"].as_str().unwrap().to_owned();
    let out = world.bottle(&["supervise", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let listed: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let request = listed
        .iter()
        .find(|r| r["id"] == id.as_str())
        .unwrap_or_else(|| panic!("{listed:?}"));
    assert_eq!(request["agent"], "coder");
    assert_eq!(request["host"], format!("localhost:{plain}"));
    assert_eq!(request["reason"], "fetch the fixtures");
    assert_eq!(request["state"], "pending");
    assert_eq!(world.through_proxy("coder", &wanted).0, "403");

    // The second agent, with its own token, cannot see or answer it.
    let (is_error, answer) = world.tool("other", "request_status", serde_json::json!({"id": id}));
    assert!(is_error, "{answer}");
    let (_, theirs) = world.tool("other", "list_egress", serde_json::json!({}));
    assert!(!theirs.to_string().contains(&id), "{theirs}");
    // A token that names no agent of the bottle gets nothing.
    let (status, _) = world.mcp_raw(
        "other",
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{}}"#,
        Some("not-a-token"),
    );
    assert_eq!(status, 404);

    // Approved: the agent gets through at once, the other agent does not.
    let out = world.bottle(&["supervise", "approve", &id]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let (status, body) = world.through_proxy("coder", &wanted);
    assert_eq!((status.as_str(), body.as_str()), ("200", "key=-"));
    assert_eq!(world.through_proxy("other", &wanted).0, "403");
    let (is_error, answer) = world.tool("other", "request_status", serde_json::json!({"id": id}));
    assert!(is_error, "{answer}");
    let (_, status) = world.tool("coder", "request_status", serde_json::json!({"id": id}));
    assert_eq!(status["state"], "approved", "{status}");

    // The running world is wider than the declared one: check says so.
    let out = world.bottle(&["check"]);
    let report = text(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{report}{}", text(&out.stderr));
    assert!(report.contains(&format!("localhost:{plain}")), "{report}");

    // Revoked: closed again, and check is back in sync.
    let out = world.bottle(&["supervise", "revoke", &id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(world.through_proxy("coder", &wanted).0, "403");
    let out = world.bottle(&["check"]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );

    // Malformed and oversized bodies: JSON-RPC errors, and the endpoint
    // answers on.
    let (status, body) = world.mcp_raw("coder", "{not json", None);
    assert_eq!(status, 400, "{body}");
    let error: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error["error"]["code"], -32700, "{body}");
    let big = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{{"pad":"{}"}}}}"#,
        "x".repeat(70 * 1024)
    );
    let (status, body) = world.mcp_raw("coder", &big, None);
    assert_eq!(status, 413, "{body}");
    let error: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error["error"]["code"], -32600, "{body}");
    let init = world.mcp(
        "coder",
        "initialize",
        serde_json::json!({"protocolVersion": "2025-06-18", "capabilities": {},
                           "clientInfo": {"name": "curl", "version": "1"}}),
    );
    assert_eq!(init["result"]["serverInfo"]["name"], "bottle-supervise");
}

/// `git` run on the host by the test, without any user configuration.
fn host_git(cwd: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        // The upstream belongs to the gate's git user.
        .args(["-c", "safe.directory=*"])
        .args(args)
        .current_dir(cwd)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "Up Stream")
        .env("GIT_AUTHOR_EMAIL", "up@example.com")
        .env("GIT_COMMITTER_NAME", "Up Stream")
        .env("GIT_COMMITTER_EMAIL", "up@example.com")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout).trim().to_owned()
}

on_each_runtime!(git_through_the_gate: git_through_the_gate_from_inside_a_guest, git_through_the_gate_from_inside_a_guest_through_the_double);

/// Issue 12 end to end, on each runtime: the `git` step rewrites a
/// remote's upstream to the gate (`<gate>/git/<name>.git`, the agent's git
/// credential as Basic auth), and from inside the guest, as the agent user,
/// cloning the upstream's URL yields its commits through the gate; a push
/// to a branch the manifest allows arrives upstream, one to `main` is
/// refused naming the rule, a force push is refused; a remote the bottle
/// does not declare is not served; a new upstream commit reaches the next
/// fetch, and with the upstream gone the gate serves its mirror; the
/// upstream credential stays on the host.
fn git_through_the_gate(via: Via) {
    use std::os::unix::fs::PermissionsExt;
    const TOKEN: &str = "ghp_wiring_e2e_upstream_token_0123456789";
    let world = World::new(via);
    // The upstream: a bare repository on the host (not in the guest), given
    // to the user the gate runs git as (it runs as root here).
    let host = tempfile::Builder::new()
        .prefix("bottle-gated-git-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(host.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bare = host.path().join("app.git");
    let seed = host.path().join("seed");
    host_git(
        host.path(),
        &["init", "-q", "--bare", "-b", "main", "app.git"],
    );
    host_git(host.path(), &["init", "-q", "-b", "main", "seed"]);
    std::fs::write(seed.join("README"), "hello from upstream\n").unwrap();
    host_git(&seed, &["add", "README"]);
    host_git(&seed, &["commit", "-q", "-m", "first"]);
    host_git(&seed, &["push", "-q", &bare.to_string_lossy(), "main"]);
    let upstream_head = host_git(&bare, &["rev-parse", "main"]);
    if let Some(r) = bottle::gate::git::RunAs::for_this_process() {
        let out = Command::new("chown")
            .arg("-R")
            .arg(format!("{}:{}", r.uid, r.gid))
            .arg(&bare)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    // A credential the gate holds for another remote: never the guest's.
    let token_file = host.path().join("docs-token");
    std::fs::write(&token_file, TOKEN).unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    // A `file://` URL: git clones a plain path that does not exist in the
    // guest without looking at its URL rewrites.
    let upstream = format!("file://{}", bare.to_string_lossy());
    world.write(&format!(
        "[project]\nname = \"gated\"\n\n[bottle.dev]\nuser = \"node\"\n\n\
         [bottle.dev.git.user]\nname = \"Coder\"\nemail = \"coder@example.com\"\n\n\
         [[bottle.dev.git.remote]]\nname = \"app\"\nupstream = {upstream:?}\npush = [\"agent/*\"]\n\n\
         [[bottle.dev.git.remote]]\nname = \"docs\"\nupstream = \"https://git.example.invalid/acme/docs.git\"\n\
         credentials = {{ token = {{ from_file = {:?} }} }}\n\n\
         [agent.coder]\nbottle = \"dev\"\n",
        token_file.to_string_lossy()
    ));
    let out = world.bottle(&["apply"]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let out = world.bottle(&["check"]);
    assert!(out.status.success(), "{}", text(&out.stdout));

    // The guest cannot see the upstream: what it gets comes through the gate.
    let out = world.guest_of("coder", "test ! -e \"$1\"", &[&bare.to_string_lossy()]);
    assert!(out.status.success(), "the upstream is visible in the guest");

    // Clone by the upstream's own URL, as the agent user.
    let out = world.guest_of(
        "coder",
        "cd && git clone -q \"$1\" app && git -C app rev-parse HEAD && cat app/README",
        &[&upstream],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        format!("{upstream_head}\nhello from upstream\n")
    );
    let remote_url = world.guest_of("coder", "git -C ~/app remote get-url --push origin", &[]);
    assert!(
        text(&remote_url.stdout).contains("/git/app.git"),
        "{}",
        text(&remote_url.stdout)
    );

    // A push to a branch the manifest allows arrives upstream.
    let out = world.guest_of(
        "coder",
        "cd ~/app && echo change > NOTES && git add NOTES && git commit -q -m change \
         && git push -q origin HEAD:agent/x 2>&1 && git rev-parse HEAD",
        &[],
    );
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let pushed = text(&out.stdout).trim().to_owned();
    assert_eq!(host_git(&bare, &["rev-parse", "agent/x"]), pushed);
    assert_eq!(
        host_git(&bare, &["log", "-1", "--format=%an <%ae>", "agent/x"]),
        "Coder <coder@example.com>"
    );

    // A push to main is refused, naming the rule; upstream's main is as it was.
    let out = world.guest_of("coder", "cd ~/app && git push origin HEAD:main 2>&1", &[]);
    let said = text(&out.stdout);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains(
            "push to main refused: remote app allows pushes only to branches matching: agent/*"
        ),
        "{said}"
    );
    assert_eq!(host_git(&bare, &["rev-parse", "main"]), upstream_head);

    // A force push (agent/x rewritten) is refused; upstream keeps its branch.
    let out = world.guest_of(
        "coder",
        "cd ~/app && git commit -q --amend -m rewritten && git push -f origin HEAD:agent/x 2>&1",
        &[],
    );
    let said = text(&out.stdout);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("agent/x: not a fast-forward; force pushes are refused"),
        "{said}"
    );
    assert_eq!(host_git(&bare, &["rev-parse", "agent/x"]), pushed);

    // A remote the bottle does not declare: not served, even with the
    // agent's own credential in the URL.
    let out = world.guest_of(
        "coder",
        "url=$(git -C ~/app remote get-url origin) && \
         git clone -q \"${url%/app.git}/nope.git\" ~/nope 2>&1",
        &[],
    );
    let said = text(&out.stdout);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("404") || said.contains("not found"), "{said}");
    let out = world.guest_of("coder", "test ! -e ~/nope", &[]);
    assert!(out.status.success(), "an undeclared remote was cloned");
    // A declared one without the agent's credential: 401.
    for userinfo in ["", "coder:not-the-token@"] {
        let out = world.guest_of(
            "coder",
            "url=$(git -C ~/app remote get-url origin) && \
             url=$(printf %s \"$url\" | sed \"s#//[^@/]*@#//$1#\") && \
             GIT_TERMINAL_PROMPT=0 git clone -q \"$url\" ~/anon 2>&1; test ! -e ~/anon",
            &[userinfo],
        );
        let said = text(&out.stdout);
        assert!(out.status.success(), "cloned without a credential: {said}");
        assert!(
            said.contains("401")
                || said.contains("Authentication failed")
                || said.contains("could not read Username"),
            "{said}"
        );
    }

    // A new upstream commit reaches the guest's next fetch.
    std::fs::write(seed.join("README"), "hello again\n").unwrap();
    host_git(&seed, &["commit", "-q", "-am", "second"]);
    host_git(
        &seed,
        &[
            "push",
            "-q",
            // The upstream is the gate's git user's now.
            "--receive-pack=git -c safe.directory=* receive-pack",
            &bare.to_string_lossy(),
            "main",
        ],
    );
    let second = host_git(&bare, &["rev-parse", "main"]);
    assert_ne!(second, upstream_head);
    let fetch_sees = |head: &str| {
        let fetch = "cd ~/app && git fetch -q origin 2>&1 && git rev-parse origin/main";
        let out = world.guest_of("coder", fetch, &[]);
        assert_eq!(
            text(&out.stdout),
            format!("{head}\n"),
            "{}",
            text(&out.stderr)
        );
    };
    fetch_sees(&second);

    // Upstream gone (its repository moved away): the fetch still works from
    // the gate's mirror, a fresh clone too, and the gate log says so.
    let away = host.path().join("app.git.stopped");
    std::fs::rename(&bare, &away).unwrap();
    fetch_sees(&second);
    let out = world.guest_of(
        "coder",
        "cd && git clone -q \"$1\" again 2>&1 && cat again/README",
        &[&upstream],
    );
    assert_eq!(text(&out.stdout), "hello again\n", "{}", text(&out.stderr));
    let paths = bottle::gate::paths::GatePaths::new(world.state.path(), "gated");
    let log = std::fs::read_to_string(paths.log()).unwrap();
    assert!(
        log.contains("failed: serving the mirror as it is"),
        "the gate log:\n{log}"
    );
    std::fs::rename(&away, &bare).unwrap();

    // The upstream credential is nowhere in the guest.
    let grep = world.runtime().exec(
        "bottle_gated_coder",
        &ExecRequest::new([
            "sh",
            "-c",
            "grep -rl -s -F -- \"$1\" /etc /home /var /tmp /opt /root /usr/local; env | grep -c -F -- \"$1\"; echo done",
            "sh",
            TOKEN,
        ]),
    );
    assert_eq!(text(&grep.unwrap().stdout), "0\ndone\n");
    // Nor in what bottle, the gate (which reads it when told to) and the
    // double keep.
    world.nowhere_kept(TOKEN);
    let out = world.bottle(&["check"]);
    assert!(out.status.success(), "{}", text(&out.stdout));
}
