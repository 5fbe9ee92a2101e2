//! The gate process: `bottle gate run`. One per project, holding
//! `gate.lock`; one tokio runtime; one listener per bottle on
//! `127.0.0.1:<port>`; the control socket.
//!
//! # Where its first config comes from
//!
//! - `--config-from-stdin` (how `apply` starts it, through
//!   [`start_detached`]): one JSON line on stdin, a control
//!   [`Request::Reload`] (config and secret values). The values travel
//!   through a pipe, never argv, environment or a file.
//! - Otherwise (a service manager runs `bottle gate run DIR` in the
//!   foreground): `config.json` in the gate's state directory (the gate
//!   writes it on every config it accepts; secret values are never in it),
//!   with each secret's value read by [`secrets_from_env`]: a `value_key`
//!   `file:<path>` from that file, any other from the variable of the
//!   gate's own environment it names (so the reconciler uses a `from_env`
//!   secret's variable name as its key). A value not found is logged (by
//!   key) and that secret is not added. Without a
//!   `config.json` the gate serves nothing until its first reload.
//!
//! Any later config arrives by a control `reload`: listeners of new bottles
//! open, those of removed bottles close, and every connection already open
//! goes on (each request is judged by the config of the moment it arrives).

use std::collections::BTreeMap;
use std::io::{BufRead, Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_rustls::rustls;

use super::ca::{self, CaError, ProjectCa};
use super::config::{CONFIG_FORMAT, GateConfig, GateSecret, GitCredentials};
use super::control::{self, Health, Request, Response};
use super::hosts::HostList;
use super::log::GateLog;
use super::net::Cidr;
use super::paths::GatePaths;
use super::{Endpoints, egress};

#[derive(Debug, thiserror::Error, miette::Diagnostic)]
pub enum GateError {
    #[error("a gate for project `{project}` already runs ({holder})")]
    #[diagnostic(
        code("bottle::gate-running"),
        help(
            "one gate serves a project; stop that one first (`kill` its pid), or leave it running: `bottle apply` reloads it"
        )
    )]
    Running { project: String, holder: String },

    #[error("the gate's {what} {}: {source}", path.display())]
    #[diagnostic(
        code("bottle::gate-io"),
        help("check that the state directory (--state-dir) is writable by you")
    )]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(transparent)]
    #[diagnostic(transparent)]
    Ca(#[from] CaError),

    #[error("the gate cannot serve this config: {0}")]
    #[diagnostic(
        code("bottle::gate-config"),
        help("run `bottle apply` to send the gate a config derived from the manifests")
    )]
    Config(String),

    #[error("the gate did not start: {0}")]
    #[diagnostic(
        code("bottle::gate-start"),
        help(
            "the gate's own messages are in the file named above; fix what it says, then run again"
        )
    )]
    Start(String),
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> GateError {
    let path = path.to_owned();
    move |source| GateError::Io { what, path, source }
}

/// Where the gate's first config comes from (see the module docs).
pub enum Initial {
    /// One JSON control `reload` line on stdin.
    Stdin,
    /// `config.json` and the gate's own environment, if there is one.
    StateDir,
}

/// A config the gate serves, with what it derived from it.
pub(crate) struct Live {
    pub config: Arc<GateConfig>,
    pub hash: String,
    pub secrets: Arc<BTreeMap<String, String>>,
    pub secrets_read_at: u64,
    pub policies: BTreeMap<String, Policy>,
}

/// One bottle's rules, parsed.
pub(crate) struct Policy {
    pub allow: HostList,
    pub internal: Vec<Cidr>,
    pub secrets: Vec<(GateSecret, HostList)>,
}

impl Live {
    fn new(config: GateConfig, secrets: BTreeMap<String, String>) -> Self {
        let policies = config
            .bottles
            .iter()
            .map(|(name, b)| {
                let policy = Policy {
                    allow: HostList::parse(&b.allow_hosts),
                    internal: b
                        .allow_internal
                        .iter()
                        .filter_map(|c| Cidr::parse(c))
                        .collect(),
                    secrets: b
                        .secrets
                        .iter()
                        .map(|s| (s.clone(), HostList::parse(&s.hosts)))
                        .collect(),
                };
                (name.clone(), policy)
            })
            .collect();
        Self {
            hash: config.hash(),
            config: Arc::new(config),
            secrets: Arc::new(secrets),
            secrets_read_at: now(),
            policies,
        }
    }
}

struct ListenerHandle {
    /// The port the config asked for (0: any).
    configured: u16,
    bound: u16,
    task: JoinHandle<()>,
    slots: Arc<egress::Slots>,
}

/// Descriptors the gate keeps for itself: its log, control socket, CA,
/// the state directory's files.
const FD_RESERVE: usize = 64;
/// Descriptors kept per bottle for its git requests (three pipes each).
const FD_PER_BOTTLE: usize = 64;
/// Connections a listener may serve, whatever the descriptors say.
const MIN_CONNECTIONS: usize = 8;

/// Raise this process's soft limit on open descriptors to its hard limit;
/// the soft limit it has then.
fn raise_fd_limit() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain system calls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit.rlim_cur = limit.rlim_max;
            }
        }
    }
    usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX)
}

/// Connections each of `listeners` listeners may serve at once with
/// `fd_limit` descriptors: an equal share of what the gate does not keep
/// for itself, two descriptors a connection (the agent's and upstream's).
fn connections_per_listener(fd_limit: usize, listeners: usize) -> usize {
    let listeners = listeners.max(1);
    let spare = fd_limit.saturating_sub(FD_RESERVE + FD_PER_BOTTLE * listeners);
    (spare / 2 / listeners).clamp(MIN_CONNECTIONS, egress::MAX_CONNECTIONS)
}

/// Everything the running gate shares between its tasks.
pub(crate) struct Gate {
    pub paths: GatePaths,
    pub project: String,
    pub ca: ProjectCa,
    pub log: Arc<GateLog>,
    pub endpoints: Endpoints,
    pub upstream_tls: Arc<rustls::ClientConfig>,
    live: RwLock<Arc<Live>>,
    listeners: tokio::sync::Mutex<BTreeMap<String, ListenerHandle>>,
    /// The soft limit on open descriptors (raised to the hard one).
    fd_limit: usize,
    started_at: u64,
    stop: Notify,
}

impl Gate {
    /// The config of this moment.
    pub fn live(&self) -> Arc<Live> {
        self.live.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Serve `config` from now on (see the module docs).
    async fn reload(
        self: &Arc<Self>,
        config: GateConfig,
        secrets: BTreeMap<String, String>,
    ) -> Result<(), String> {
        if config.project != self.project {
            return Err(format!(
                "this gate serves project `{}`, not `{}`",
                self.project, config.project
            ));
        }
        if config.format_version > CONFIG_FORMAT {
            return Err(format!(
                "config format {} is newer than this gate's ({CONFIG_FORMAT}); restart the gate with this bottle",
                config.format_version
            ));
        }
        // A value the caller could not read (its environment lacks the
        // variable) is not taken away from the agents: the one this gate
        // holds stays while the config still names it.
        let mut secrets = secrets;
        {
            let previous = self.live();
            for key in value_keys(&config) {
                if !secrets.contains_key(key)
                    && let Some(value) = previous.secrets.get(key)
                {
                    secrets.insert(key.to_owned(), value.clone());
                }
            }
        }
        let mut listeners = self.listeners.lock().await;
        // Bind every new listener first: a port in use fails the reload as
        // a whole and the gate goes on serving what it served.
        let mut opened = BTreeMap::new();
        for (bottle, b) in &config.bottles {
            if listeners
                .get(bottle)
                .is_some_and(|l| l.configured == b.port)
            {
                continue;
            }
            let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], b.port)))
                .await
                .map_err(|e| {
                    format!(
                        "bottle `{bottle}`: cannot listen on 127.0.0.1:{}: {e}",
                        b.port
                    )
                })?;
            opened.insert(bottle.clone(), listener);
        }
        // The endpoints learn the config before the first request that
        // sees it (their own file work: off the async workers).
        let problems = tokio::task::block_in_place(|| self.endpoints.configure(&config, &secrets));
        for problem in &problems {
            self.log.event(
                "gate",
                json!({"event": "endpoint_problem", "problem": problem}),
            );
        }
        let live = Arc::new(Live::new(config.clone(), secrets));
        *self.live.write().unwrap_or_else(|e| e.into_inner()) = live.clone();
        let closing: Vec<String> = listeners
            .keys()
            .filter(|b| !config.bottles.contains_key(*b) || opened.contains_key(*b))
            .cloned()
            .collect();
        for bottle in closing {
            if let Some(l) = listeners.remove(&bottle) {
                l.task.abort();
                // Closed once the task is gone, before the answer: a port
                // taken away refuses connections from then on.
                let _ = l.task.await;
            }
        }
        let cap = connections_per_listener(self.fd_limit, config.bottles.len());
        for l in listeners.values() {
            l.slots.set_cap(cap);
        }
        for (bottle, listener) in opened {
            let bound = listener.local_addr().map(|a| a.port()).unwrap_or(0);
            let configured = config.bottles[&bottle].port;
            let slots = egress::Slots::new(cap);
            let task = tokio::spawn(egress::accept_loop(
                self.clone(),
                Arc::from(bottle.as_str()),
                bound,
                listener,
                slots.clone(),
            ));
            listeners.insert(
                bottle,
                ListenerHandle {
                    configured,
                    bound,
                    task,
                    slots,
                },
            );
        }
        let ports: BTreeMap<&String, u16> = listeners.iter().map(|(b, l)| (b, l.bound)).collect();
        let missing: Vec<&str> = missing_secrets(&config, &live.secrets);
        self.log.event(
            "gate",
            json!({"event": "config", "config_hash": live.hash, "ports": ports, "missing_secrets": missing}),
        );
        drop(listeners);
        let text = serde_json::to_vec_pretty(&config).expect("gate configs serialize");
        if let Err(e) = ca::write_atomic(&self.paths.config(), &text, 0o600) {
            eprintln!(
                "bottle gate: cannot write {}: {e}",
                self.paths.config().display()
            );
        }
        Ok(())
    }

    async fn health(&self) -> Health {
        let live = self.live();
        let listeners = self.listeners.lock().await;
        Health {
            pid: std::process::id(),
            config_hash: live.hash.clone(),
            started_at: self.started_at,
            secrets_read_at: live.secrets_read_at,
            missing_secrets: missing_secrets(&live.config, &live.secrets)
                .into_iter()
                .map(str::to_owned)
                .collect(),
            ports: listeners
                .iter()
                .map(|(b, l)| (b.clone(), l.bound))
                .collect(),
        }
    }
}

/// Every `value_key` the config names that has no value.
fn missing_secrets<'a>(config: &'a GateConfig, values: &BTreeMap<String, String>) -> Vec<&'a str> {
    value_keys(config)
        .filter(|k| !values.contains_key(*k))
        .collect()
}

fn value_keys(config: &GateConfig) -> impl Iterator<Item = &str> {
    config.bottles.values().flat_map(|b| {
        b.secrets
            .iter()
            .map(|s| s.value_key.as_str())
            .chain(b.git.iter().filter_map(|r| match &r.credentials {
                Some(GitCredentials::Token { value_key }) => Some(value_key.as_str()),
                _ => None,
            }))
    })
}

/// The values of a config's secrets as a gate run by a service manager
/// finds them: `value_key` `file:<path>` is read from that file (without
/// its final newline); any other key is the name of a variable of this
/// process's environment. Absent ones are left out (and logged by name).
pub fn secrets_from_env(config: &GateConfig) -> BTreeMap<String, String> {
    value_keys(config)
        .filter_map(|k| {
            let value = match k.strip_prefix("file:") {
                Some(path) => std::fs::read_to_string(path)
                    .ok()
                    .map(|v| v.strip_suffix('\n').unwrap_or(&v).to_owned()),
                None => std::env::var(k).ok(),
            };
            value.map(|v| (k.to_owned(), v))
        })
        .collect()
}

/// `bottle gate run`: serve the project until stopped (control `stop`,
/// SIGTERM or SIGINT).
pub fn run(state_dir: &Path, project: Option<&str>, initial: Initial) -> Result<(), GateError> {
    // A peer that closes its socket must not kill the gate (bottle's main
    // restores SIGPIPE's default action for the other commands).
    // SAFETY: sets a signal disposition; no handler code runs.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    let (config, secrets) = match initial {
        Initial::Stdin => {
            let mut line = Vec::new();
            std::io::stdin()
                .lock()
                .take(control::MAX_LINE as u64)
                .read_until(b'\n', &mut line)
                .map_err(|e| GateError::Config(format!("reading stdin: {e}")))?;
            match serde_json::from_slice::<Request>(&line) {
                Ok(Request::Reload { config, secrets }) => (Some(config), secrets),
                Ok(other) => {
                    return Err(GateError::Config(format!(
                        "stdin holds a `{}` request, not a `reload`",
                        other.describe()
                    )));
                }
                Err(e) => {
                    return Err(GateError::Config(format!(
                        "stdin is not a control `reload` line: {e}"
                    )));
                }
            }
        }
        Initial::StateDir => (None, BTreeMap::new()),
    };
    let project = match (&config, project) {
        (Some(c), _) => c.project.clone(),
        (None, Some(p)) => p.to_owned(),
        (None, None) => return Err(GateError::Config("no project named".into())),
    };
    let paths = GatePaths::new(state_dir, &project);
    ca::create_private_dir(&paths.dir).map_err(io_err("directory", &paths.dir))?;
    let _lock = take_lock(&paths, &project)?;
    let pid_path = paths.pid();
    ca::write_atomic(
        &pid_path,
        format!("{}\n", std::process::id()).as_bytes(),
        0o644,
    )
    .map_err(io_err("pid file", &pid_path))?;
    let result = serve(paths.clone(), project, config, secrets);
    let _ = std::fs::remove_file(&pid_path);
    result
}

fn take_lock(paths: &GatePaths, project: &str) -> Result<std::fs::File, GateError> {
    let path = paths.lock();
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_err("lock", &path))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            return Err(GateError::Running {
                project: project.to_owned(),
                holder: if holder.is_empty() {
                    "a gate that is starting".into()
                } else {
                    holder.to_owned()
                },
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io_err("lock", &path)(e)),
    }
    let text = format!(
        "pid {} since {}",
        std::process::id(),
        crate::time::rfc3339(std::time::SystemTime::now())
    );
    file.set_len(0)
        .and_then(|_| file.write_all(text.as_bytes()))
        .map_err(io_err("lock", &path))?;
    Ok(file)
}

fn serve(
    paths: GatePaths,
    project: String,
    config: Option<GateConfig>,
    secrets: BTreeMap<String, String>,
) -> Result<(), GateError> {
    let ca = ProjectCa::load_or_create(&paths)?;
    let log_path = paths.log();
    let log = Arc::new(GateLog::open(&log_path).map_err(io_err("log", &log_path))?);
    let (config, secrets) = match config {
        Some(c) => (c, secrets),
        None => match std::fs::read(paths.config()) {
            Ok(bytes) => {
                let config: GateConfig = serde_json::from_slice(&bytes)
                    .map_err(|e| GateError::Config(format!("{}: {e}", paths.config().display())))?;
                let secrets = secrets_from_env(&config);
                (config, secrets)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (
                GateConfig {
                    format_version: CONFIG_FORMAT,
                    project: project.clone(),
                    bottles: BTreeMap::new(),
                },
                BTreeMap::new(),
            ),
            Err(e) => return Err(io_err("config", &paths.config())(e)),
        },
    };
    let workers = std::thread::available_parallelism()
        .map(|n| n.get().min(4))
        .unwrap_or(2);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .map_err(io_err("runtime", &paths.dir))?;
    let endpoints = super::plugins(&paths, log.clone());
    let gate = Arc::new(Gate {
        upstream_tls: upstream_tls(&log),
        live: RwLock::new(Arc::new(Live::new(GateConfig::default(), BTreeMap::new()))),
        listeners: tokio::sync::Mutex::new(BTreeMap::new()),
        fd_limit: raise_fd_limit(),
        started_at: now(),
        stop: Notify::new(),
        paths,
        project,
        ca,
        log,
        endpoints,
    });
    let result = runtime.block_on(async {
        gate.reload(config, secrets)
            .await
            .map_err(GateError::Config)?;
        let socket = gate.paths.control();
        // The lock is ours: a socket file left here is a dead gate's.
        let _ = std::fs::remove_file(&socket);
        let control = UnixListener::bind(&socket).map_err(io_err("control socket", &socket))?;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
            .map_err(io_err("control socket", &socket))?;
        gate.log.event(
            "gate",
            json!({"event": "started", "pid": std::process::id()}),
        );
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(io_err("signal handler", &socket))?;
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
            .map_err(io_err("signal handler", &socket))?;
        let why = loop {
            tokio::select! {
                accepted = control.accept() => {
                    if let Ok((stream, _)) = accepted {
                        tokio::spawn(control_connection(gate.clone(), stream));
                    }
                }
                _ = gate.stop.notified() => break "stop request",
                _ = term.recv() => break "SIGTERM",
                _ = int.recv() => break "SIGINT",
            }
        };
        let _ = std::fs::remove_file(&socket);
        gate.log
            .event("gate", json!({"event": "stopped", "reason": why}));
        Ok(())
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

/// Upstream TLS is verified against the host's trust store (as
/// `rustls-native-certs` finds it: `SSL_CERT_FILE` and `SSL_CERT_DIR`
/// first, then the system's).
fn upstream_tls(log: &GateLog) -> Arc<rustls::ClientConfig> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 || !found.errors.is_empty() {
        log.event(
            "gate",
            json!({"event": "trust_store", "certificates": added,
                   "errors": found.errors.iter().map(|e| e.to_string()).collect::<Vec<_>>()}),
        );
    }
    let mut config = rustls::ClientConfig::builder_with_provider(ca::crypto())
        .with_safe_default_protocol_versions()
        .expect("the default provider supports the default versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

async fn control_connection(gate: Arc<Gate>, stream: UnixStream) {
    let (read, mut write) = stream.into_split();
    let mut reader = tokio::io::BufReader::new(tokio::io::AsyncReadExt::take(
        read,
        control::MAX_LINE as u64,
    ));
    let mut line = Vec::new();
    let read = tokio::time::timeout(control::TIMEOUT, reader.read_until(b'\n', &mut line)).await;
    if !matches!(read, Ok(Ok(n)) if n > 0) {
        return;
    }
    let mut stop = false;
    let response = match serde_json::from_slice::<Request>(&line) {
        Ok(Request::Health) => Response::Health(gate.health().await),
        Ok(Request::Reload { config, secrets }) => match gate.reload(config, secrets).await {
            Ok(()) => Response::Ok,
            Err(message) => Response::Error { message },
        },
        Ok(Request::Stop) => {
            stop = true;
            Response::Ok
        }
        // Not the parser's message: it could quote a secret value.
        Err(e) => Response::Error {
            message: format!(
                "not a control request (line {}, column {})",
                e.line(),
                e.column()
            ),
        },
    };
    let mut answer = serde_json::to_vec(&response).expect("control responses serialize");
    answer.push(b'\n');
    let _ = write.write_all(&answer).await;
    let _ = write.shutdown().await;
    if stop {
        gate.stop.notify_one();
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Start the project's gate in the background, serving `config` with
/// these secret values, and wait until it answers with that config.
///
/// `bottle` is the bottle executable (`std::env::current_exe()`); the gate
/// runs as `bottle --state-dir STATE gate run --config-from-stdin` in its
/// own session, its stderr appended to `gate.err` beside its log, and
/// outlives the caller. Secret values reach it through a pipe (variables of
/// the caller's environment holding one are not passed on).
///
/// Only when no gate answers on the control socket: a running one (started
/// by a service manager, or an earlier apply) takes a `reload` instead, and
/// a second one would exit at once naming the first (the error says so).
pub fn start_detached(
    bottle: &Path,
    state_dir: &Path,
    config: &GateConfig,
    secrets: &BTreeMap<String, String>,
) -> Result<Health, GateError> {
    use std::os::unix::process::CommandExt;
    let paths = GatePaths::new(state_dir, &config.project);
    ca::create_private_dir(&paths.dir).map_err(io_err("directory", &paths.dir))?;
    let err_path = paths.dir.join("gate.err");
    let stderr = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&err_path)
        .map_err(io_err("stderr file", &err_path))?;
    let err_start = stderr.metadata().map(|m| m.len()).unwrap_or(0);
    let mut command = std::process::Command::new(bottle);
    command
        .arg("--state-dir")
        .arg(state_dir)
        .args(["gate", "run", "--config-from-stdin"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(stderr);
    // The values reach the gate on the pipe only: variables of the
    // caller's environment that hold one are not passed on.
    for (key, value) in std::env::vars_os() {
        if secrets
            .values()
            .any(|s| !s.is_empty() && value == s.as_str())
        {
            command.env_remove(key);
        }
    }
    // SAFETY: setsid is async-signal-safe; nothing else runs in the child.
    unsafe {
        command.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .map_err(|e| GateError::Start(format!("cannot run {}: {e}", bottle.display())))?;
    let request = Request::Reload {
        config: config.clone(),
        secrets: secrets.clone(),
    };
    let mut line = serde_json::to_vec(&request).expect("control requests serialize");
    line.push(b'\n');
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(&line);
    }
    let want = config.hash();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            // What it said, the first lines of this start's messages.
            let said = std::fs::read(&err_path)
                .ok()
                .and_then(|b| b.get(err_start as usize..).map(<[u8]>::to_vec))
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            let said: Vec<&str> = said
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .take(4)
                .collect();
            return Err(GateError::Start(format!(
                "it exited ({status}): {} (in {})",
                said.join(" / "),
                err_path.display()
            )));
        }
        if let Ok(Response::Health(h)) = control::call(&paths.control(), &Request::Health)
            && h.pid == child.id()
            && h.config_hash == want
        {
            // Reap it when it ends, so a long-running caller (`watch`)
            // keeps no zombie.
            std::thread::spawn(move || child.wait());
            return Ok(h);
        }
        if Instant::now() >= deadline {
            return Err(GateError::Start(format!(
                "it did not answer on {} within 15s; see {}",
                paths.control().display(),
                err_path.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Ask the project's gate to stop and wait (up to `wait`) until it has
/// released its lock. `Ok(false)`: no gate was running.
pub fn stop(paths: &GatePaths, wait: Duration) -> Result<bool, GateError> {
    match control::call(&paths.control(), &Request::Stop) {
        Ok(_) => {}
        Err(control::ControlError::NotRunning(_)) => return Ok(false),
        Err(e) => return Err(GateError::Start(e.to_string())),
    }
    let deadline = Instant::now() + wait;
    loop {
        if let Ok(file) = std::fs::File::open(paths.lock())
            && file.try_lock().is_ok()
        {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Err(GateError::Start(format!(
                "the gate was asked to stop but still holds {} after {wait:?}",
                paths.lock().display()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gate::config::BottleGate;

    #[test]
    fn listeners_share_the_descriptors_the_gate_does_not_keep() {
        // 1024 descriptors, two bottles: (1024 - 64 - 128) / 2 / 2.
        assert_eq!(connections_per_listener(1024, 2), 208);
        assert_eq!(
            connections_per_listener(1 << 20, 1),
            egress::MAX_CONNECTIONS
        );
        assert_eq!(connections_per_listener(100, 3), MIN_CONNECTIONS);
        assert_eq!(connections_per_listener(4096, 0), 1984);
    }

    #[test]
    fn a_foreground_gate_reads_values_from_files_and_its_environment() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "from-a-file\n").unwrap();
        let secret = |name: &str, key: String| GateSecret {
            name: name.into(),
            hosts: vec!["api.example.com".into()],
            value_key: key,
        };
        let mut config = GateConfig::default();
        config.bottles.insert(
            "dev".into(),
            BottleGate {
                secrets: vec![
                    secret("A", format!("file:{}", file.display())),
                    secret("B", "BOTTLE_TEST_SURELY_UNSET_VARIABLE".into()),
                    secret("C", "PATH".into()),
                ],
                ..Default::default()
            },
        );
        let values = secrets_from_env(&config);
        assert_eq!(
            values
                .get(&format!("file:{}", file.display()))
                .map(String::as_str),
            Some("from-a-file")
        );
        assert!(!values.contains_key("BOTTLE_TEST_SURELY_UNSET_VARIABLE"));
        assert_eq!(values.get("PATH"), std::env::var("PATH").ok().as_ref());
        assert_eq!(
            missing_secrets(&config, &values),
            vec!["BOTTLE_TEST_SURELY_UNSET_VARIABLE"]
        );
    }
}
