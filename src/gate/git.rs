//! The git gateway: the agent's only path to its repositories (issue 12).
//!
//! The gate keeps one bare mirror per declared remote and serves git's smart
//! HTTP protocol from it through git's own `git http-backend`. It holds the
//! upstream credentials; the agent holds only its own git token.
//!
//! # How the listener calls it
//!
//! ```ignore
//! let git = Arc::new(GitGateway::new(&paths, log.clone()));
//! // At start and on every reload (secrets: value_key -> value):
//! let problems: Vec<String> = git.reload(&config, &secrets);
//! // or per bottle: git.configure(bottle, &b.git, &b.agents, &secrets);
//! // For every origin-form request whose path starts with `/git/`, after
//! // the listener checked the Host header (it does not resolve the agent:
//! // the gateway checks the git credential itself):
//! let response: gate::http::Response = git.handle(bottle, request).await;
//! ```
//!
//! [`GitGateway::handle`] answers everything itself: 401 (with
//! `WWW-Authenticate: Basic`) without HTTP Basic credentials `agent:git_token`
//! valid for *this* bottle, 404 for a path that is not
//! `/git/<remote>.git/{info/refs,git-upload-pack,git-receive-pack}` or a
//! remote the bottle does not declare, 403 for a push to a read-only remote.
//! The guest's rewrite (the `git` step) is
//! `http://<agent>:<git_token>@<gate>/git/<remote>.git`.
//!
//! The listener must set `TCP_NODELAY` on accepted connections: git's
//! small request/answer exchanges otherwise stall ~40 ms each on delayed
//! ACKs.
//!
//! # What the reconciler provides
//!
//! Per bottle, in [`super::config::BottleGate`]: `git` (one
//! [`GateRemote`] per remote served by the gate: `name` (`[A-Za-z0-9._-]`,
//! not starting with `.`/`-`, not ending in `.git`), `upstream`,
//! `credentials` (`SshKey { path }`: a key file on the host without a
//! passphrase, or `Token { value_key }` for an `https://` upstream),
//! `push` (branch globs of `[A-Za-z0-9._/-]` and `*`; empty: read-only),
//! `host_key` (a `known_hosts` line, or `type base64`; else the gate user's
//! `~/.ssh/known_hosts` is used)) and `agents` (each agent's `git_token`).
//! In the reload's `secrets`: the token's value under its `value_key`.
//! The `git` step writes the guest's `insteadOf` rewrite of `upstream` to
//! `http://<agent>:<git_token>@<gate address>:<port>/git/<name>.git`.
//!
//! # What it does
//!
//! - **Fetch and clone**: before refs are advertised the mirror is brought
//!   up to date from upstream (`git fetch --prune` of branches and tags; the
//!   first request clones it). With protocol v2 (git's default) the
//!   `info/refs` answer holds no refs, so the fetch runs while it is
//!   answered and the `ls-refs`/`fetch` requests wait for it; with v0/v1 it
//!   runs first. If upstream cannot be reached the mirror is served as it
//!   is and the gate log says so; only a mirror never cloned answers 502.
//! - **Push**: accepted only for branches matching the remote's `push`
//!   patterns (`*` matches any characters, `/` included), only as
//!   fast-forwards (no deletion, no force), and only once upstream took the
//!   same refs: the mirror's `pre-receive` hook (written by the gate, outside
//!   the mirror, named by `core.hooksPath` in the gate's environment) checks
//!   the rules and runs `git push` to upstream before receive-pack updates
//!   any ref; upstream's refusal reaches the agent as `remote:` lines. The
//!   mirror is locked against fetches while a push runs.
//! - **Log**: every decision is a `kind: "git"` line in the gate log, with
//!   `bottle`, `agent`, `remote`, and for pushes `ref`, `old`, `new`,
//!   `decision` and `reason`.
//!
//! # Privileges
//!
//! Pack data comes from the agent, so no git process of the gateway runs as
//! root. When the gate runs as root, every git process (http-backend and
//! what it starts, the upstream fetch, the hook's upstream push, ssh) runs as
//! the user `bottle-git` if it exists, else `nobody` (setgroups/setgid/setuid
//! in the child before exec), and the mirrors are owned by that user. The
//! gate enters the mirror directory before dropping privileges, so the git
//! user needs no access to the state directory itself. Consequences:
//! - a local upstream (`file://` or a path) must be readable by that user,
//!   and writable for pushes;
//! - an ssh key is read by the gate (root) and handed to an `ssh-agent`
//!   running as the git user, one per remote: the key is never copied to a
//!   file, and git reaches it through the agent's socket (keys with a
//!   passphrase are not supported);
//! - an https token is given to git through a credential helper that reads
//!   it from the environment of the git processes that talk to upstream
//!   (never argv, never a file, never the upload-pack processes). Other
//!   processes of the same user can read that environment: create a
//!   dedicated `bottle-git` user rather than sharing `nobody`.
//!
//! When the gate does not run as root, git runs as the gate's user and ssh
//! reads the key file itself.
//!
//! Git's own limits apply to what the agent sends: `receive.fsckObjects`,
//! `receive.maxInputSize` ([`MAX_PACK`]), bounded memory for git reading a
//! push ([`MAX_PUSH_MEMORY`]), a bounded request body, an idle
//! timeout on every pipe (a vanished or silent client kills the request's
//! whole process group), and at most [`MAX_CONCURRENT`] requests running
//! git at once per bottle, [`MAX_PER_AGENT`] per agent (an agent that
//! holds its requests open stalls nobody else). All security settings reach git as command-line
//! configuration in its environment (`GIT_CONFIG_COUNT`), so nothing in a
//! mirror's own config can weaken them; transports other than file, git,
//! ssh and https are off (`protocol.allow=never`).

mod cgi;
mod mirror;
mod upstream;

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde_json::json;
use tokio::sync::Semaphore;

use super::config::{AgentCredentials, GateConfig, GateRemote, GitCredentials, constant_time_eq};
use super::http::{Request, Response, text};
use super::log::GateLog;
use super::paths::GatePaths;
use mirror::Layout;
use upstream::{SshIdentity, Transport};

/// The largest pack an agent may push.
pub const MAX_PACK: u64 = 512 << 20;
/// The most memory (`RLIMIT_DATA`) git may take while it reads an agent's
/// push (receive-pack, index-pack or unpack-objects, the hook and its
/// upstream push): a pack inflates far beyond its size (a delta of one-byte
/// copies grows 65536-fold), and `receive.maxInputSize` counts packed bytes.
pub const MAX_PUSH_MEMORY: u64 = 1 << 30;
/// The largest fetch negotiation an agent may send.
const MAX_UPLOAD_REQUEST: u64 = 64 << 20;
/// At most this many git requests of one bottle run at once (others wait
/// up to 30 seconds, then get 503).
pub const MAX_CONCURRENT: usize = 16;
/// At most this many git requests of one agent run at once (likewise).
pub const MAX_PER_AGENT: usize = 4;
const QUEUE_WAIT: Duration = Duration::from_secs(30);
/// ssh's connect timeout to an upstream.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The unprivileged user git runs as when the gate runs as root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
}

impl RunAs {
    /// `None` when this process is not root (git runs as its user);
    /// else `bottle-git` if that user exists, else `nobody`.
    pub fn for_this_process() -> Option<RunAs> {
        if !rustix::process::geteuid().is_root() {
            return None;
        }
        Some(
            Self::lookup("bottle-git")
                .or_else(|| Self::lookup("nobody"))
                .unwrap_or(RunAs {
                    uid: 65534,
                    gid: 65534,
                }),
        )
    }

    /// A user's uid and primary gid from the password database.
    pub fn lookup(name: &str) -> Option<RunAs> {
        let cname = CString::new(name).ok()?;
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut buf = vec![0 as libc::c_char; 16 << 10];
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call; `buf` outlives it.
        let rc = unsafe {
            libc::getpwnam_r(
                cname.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr(),
                buf.len(),
                &mut result,
            )
        };
        if rc != 0 || result.is_null() || pwd.pw_uid == 0 {
            return None;
        }
        Some(RunAs {
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
        })
    }
}

/// How a child process of the gateway is confined: optionally a private
/// mount namespace with the bottle's directory bound at the gateway's view
/// point, then its working directory, then (when the gate is root) the git
/// user's identity without supplementary groups.
#[derive(Debug, Clone)]
pub(crate) struct Confine {
    run_as: Option<RunAs>,
    /// `(real, view)`: bind `real` at `view` in a new mount namespace.
    bind: Option<(PathBuf, PathBuf)>,
    /// Entered after the bind, before dropping privileges.
    cwd: PathBuf,
    /// The most memory (`RLIMIT_DATA`) the process and its children may
    /// use; `None`: no limit of the gate's own.
    max_data: Option<u64>,
}

fn cstring(p: &Path) -> CString {
    use std::os::unix::ffi::OsStrExt;
    CString::new(p.as_os_str().as_bytes()).unwrap_or_default()
}

/// Apply `c` to `cmd` in the child between fork and exec.
fn confine(cmd: &mut std::process::Command, c: &Confine) {
    use std::os::unix::process::CommandExt;
    let run_as = c.run_as;
    let bind = c.bind.as_ref().map(|(r, v)| (cstring(r), cstring(v)));
    let cwd = cstring(&c.cwd);
    let max_data = c.max_data;
    // SAFETY: only async-signal-safe system calls between fork and exec;
    // the strings were allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let fail = || Err(std::io::Error::last_os_error());
            if let Some((real, view)) = &bind {
                if libc::unshare(libc::CLONE_NEWNS) != 0 {
                    return fail();
                }
                let root = c"/";
                if libc::mount(
                    std::ptr::null(),
                    root.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) != 0
                {
                    return fail();
                }
                if libc::mount(
                    real.as_ptr(),
                    view.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                ) != 0
                {
                    return fail();
                }
            }
            if libc::chdir(cwd.as_ptr()) != 0 {
                return fail();
            }
            if let Some(max) = max_data {
                let limit = libc::rlimit {
                    rlim_cur: max,
                    rlim_max: max,
                };
                if libc::setrlimit(libc::RLIMIT_DATA, &limit) != 0 {
                    return fail();
                }
            }
            if let Some(RunAs { uid, gid }) = run_as
                && (libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0)
            {
                return fail();
            }
            Ok(())
        });
    }
}

/// The git gateway of one gate: every bottle's remotes.
pub struct GitGateway {
    mirrors: PathBuf,
    ctx: Ctx,
    bottles: RwLock<BTreeMap<String, Arc<BottleGit>>>,
    /// Per (bottle, remote), kept across reloads: serializes the upstream
    /// sync and pushes, and holds the remote's ssh-agent.
    states: Mutex<HashMap<(String, String), Shared>>,
    /// Slots for running git: per bottle (key: bottle, "") and per agent
    /// (key: bottle, agent).
    permits: Mutex<HashMap<(String, String), Arc<Semaphore>>>,
}

struct BottleGit {
    /// Agent name -> git token.
    agents: BTreeMap<String, String>,
    remotes: BTreeMap<String, Arc<Remote>>,
}

struct Remote {
    bottle: String,
    config: GateRemote,
    layout: Layout,
    transport: Transport,
    token: Option<String>,
    ssh_key: Option<PathBuf>,
    shared: Shared,
}

/// A remote's locks, kept across reloads.
#[derive(Clone, Default)]
struct Shared {
    /// Held by a sync and by a push, for their whole run.
    state: Arc<tokio::sync::Mutex<RemoteState>>,
    /// Held while a sync started by a protocol-v2 advertisement runs:
    /// the requests that follow it wait for it.
    syncing: Arc<tokio::sync::Mutex<()>>,
}

#[derive(Default)]
struct RemoteState {
    /// The running ssh-agent and the key it holds.
    ssh_agent: Option<(tokio::process::Child, PathBuf)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Service {
    UploadPack,
    ReceivePack,
}

impl Service {
    fn name(self) -> &'static str {
        match self {
            Service::UploadPack => "git-upload-pack",
            Service::ReceivePack => "git-receive-pack",
        }
    }
}

/// How the mirror stands after trying upstream.
enum Sync {
    Fresh,
    /// Upstream could not be reached (or refused): serve what is there.
    Stale(String),
}

impl GitGateway {
    /// A gateway keeping its mirrors under [`GatePaths::mirrors`]; git runs
    /// as [`RunAs::for_this_process`].
    pub fn new(paths: &GatePaths, log: Arc<GateLog>) -> Self {
        Self::with_run_as(paths, log, RunAs::for_this_process())
    }

    /// As [`GitGateway::new`], with git running as `run_as` (`None`: as this
    /// process's user, which must then not be root).
    pub fn with_run_as(paths: &GatePaths, log: Arc<GateLog>, run_as: Option<RunAs>) -> Self {
        let mount = run_as.and_then(|r| view_point(r, &log));
        Self {
            mirrors: paths.mirrors(),
            ctx: Ctx { log, run_as, mount },
            bottles: RwLock::new(BTreeMap::new()),
            states: Mutex::new(HashMap::new()),
            permits: Mutex::new(HashMap::new()),
        }
    }

    /// Serve every bottle of `config` (and forget, removing their mirrors,
    /// bottles no longer in it). Returns the problems found (also logged):
    /// a remote with a problem is not served.
    pub fn reload(&self, config: &GateConfig, secrets: &BTreeMap<String, String>) -> Vec<String> {
        let mut problems = Vec::new();
        for (name, bottle) in &config.bottles {
            problems.extend(self.configure(name, &bottle.git, &bottle.agents, secrets));
        }
        let gone: Vec<String> = {
            let bottles = self.bottles.read().unwrap_or_else(|e| e.into_inner());
            bottles
                .keys()
                .filter(|b| !config.bottles.contains_key(*b))
                .cloned()
                .collect()
        };
        for bottle in gone {
            self.configure(&bottle, &[], &BTreeMap::new(), secrets);
            self.bottles
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&bottle);
        }
        problems
    }

    /// Serve `remotes` for `bottle`'s `agents` from now on. Mirrors of
    /// remotes no longer declared are removed; a remote whose upstream
    /// changed gets a fresh mirror at its next request. Never touches the
    /// network. Returns the problems found (also logged).
    pub fn configure(
        &self,
        bottle: &str,
        remotes: &[GateRemote],
        agents: &BTreeMap<String, AgentCredentials>,
        secrets: &BTreeMap<String, String>,
    ) -> Vec<String> {
        let mut problems = Vec::new();
        if let Err(e) = mirror::check_name("bottle", bottle) {
            problems.push(e);
            self.log_problems(bottle, &problems);
            return problems;
        }
        let bottle_dir = self.mirrors.join(bottle);
        let mut served = BTreeMap::new();
        let prepared = || -> std::io::Result<()> {
            mirror::make_dir(&self.mirrors, 0o755, None)?;
            mirror::make_dir(&bottle_dir, 0o755, None)?;
            mirror::make_dir(&bottle_dir.join(".gate"), 0o755, None)
        };
        if let Err(e) = prepared() {
            problems.push(format!("cannot create {}: {e}", bottle_dir.display()));
            self.log_problems(bottle, &problems);
            return problems;
        }
        for remote in remotes {
            match self.prepare_remote(bottle, &bottle_dir, remote, secrets) {
                Ok(r) => {
                    served.insert(remote.name.clone(), Arc::new(r));
                }
                Err(e) => problems.push(format!("remote `{}`: {e}", remote.name)),
            }
        }
        self.remove_undeclared(&bottle_dir, &served);
        let agents = agents
            .iter()
            .filter(|(_, c)| !c.git_token.is_empty())
            .map(|(n, c)| (n.clone(), c.git_token.clone()))
            .collect();
        self.bottles
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                bottle.to_owned(),
                Arc::new(BottleGit {
                    agents,
                    remotes: served,
                }),
            );
        self.log_problems(bottle, &problems);
        problems
    }

    fn log_problems(&self, bottle: &str, problems: &[String]) {
        for p in problems {
            self.ctx.log.event(
                "git",
                json!({"bottle": bottle, "op": "configure", "decision": "refused", "reason": p}),
            );
        }
    }

    fn prepare_remote(
        &self,
        bottle: &str,
        bottle_dir: &Path,
        remote: &GateRemote,
        secrets: &BTreeMap<String, String>,
    ) -> Result<Remote, String> {
        mirror::check_name("remote", &remote.name)?;
        let transport = upstream::parse(&remote.upstream)?;
        for p in &remote.push {
            mirror::check_pattern(p)?;
        }
        let (mut token, mut ssh_key) = (None, None);
        match &remote.credentials {
            None => {}
            Some(GitCredentials::Token { value_key }) => {
                if transport != Transport::Https {
                    return Err("a token is only used with an https:// upstream".into());
                }
                token = Some(secrets.get(value_key).cloned().ok_or_else(|| {
                    format!("the token's value (`{value_key}`) was not sent with the config")
                })?);
            }
            Some(GitCredentials::SshKey { path }) => {
                if !matches!(transport, Transport::Ssh { .. }) {
                    return Err("an ssh key is only used with an ssh upstream".into());
                }
                ssh_key = Some(path.clone());
            }
        }
        let layout = Layout {
            bottle_dir: bottle_dir.to_owned(),
            view: self
                .ctx
                .mount
                .clone()
                .unwrap_or_else(|| bottle_dir.to_owned()),
            remote: remote.name.clone(),
        };
        let io = |what: &str, e: std::io::Error| format!("cannot write {what}: {e}");
        mirror::make_dir(&layout.gate_dir(), 0o755, None).map_err(|e| io("its gate dir", e))?;
        mirror::make_dir(&layout.hooks(), 0o755, None).map_err(|e| io("its hooks", e))?;
        mirror::make_dir(&layout.run_dir(), 0o700, self.ctx.run_as).map_err(|e| io("run/", e))?;
        mirror::make_dir(&layout.ssh_dir(), 0o700, self.ctx.run_as).map_err(|e| io("ssh/", e))?;
        let hook = mirror::pre_receive_hook(bottle, &remote.name, &remote.upstream, &remote.push);
        mirror::write_file(&layout.hooks().join("pre-receive"), &hook, 0o755)
            .map_err(|e| io("its pre-receive hook", e))?;
        if let Transport::Ssh { known_hosts_name } = &transport {
            let user = std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".ssh/known_hosts"))
                .and_then(|p| std::fs::read_to_string(p).ok())
                .unwrap_or_default();
            let hosts = upstream::known_hosts(remote.host_key.as_deref(), known_hosts_name, &user);
            mirror::write_file(&layout.known_hosts(), &hosts, 0o644)
                .map_err(|e| io("its known_hosts", e))?;
        }
        let shared = self
            .states
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((bottle.to_owned(), remote.name.clone()))
            .or_default()
            .clone();
        Ok(Remote {
            bottle: bottle.to_owned(),
            config: remote.clone(),
            layout,
            transport,
            token,
            ssh_key,
            shared,
        })
    }

    /// Remove mirrors (and their gate files) of remotes not declared.
    fn remove_undeclared(&self, bottle_dir: &Path, served: &BTreeMap<String, Arc<Remote>>) {
        let Ok(entries) = std::fs::read_dir(bottle_dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(remote) = name.strip_suffix(".git")
                && !served.contains_key(remote)
            {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        if let Ok(entries) = std::fs::read_dir(bottle_dir.join(".gate")) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !served.contains_key(&name) {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
    }

    /// The slots of `bottle` (`agent` empty) or of one of its agents.
    fn slots(&self, bottle: &str, agent: &str) -> Arc<Semaphore> {
        let size = if agent.is_empty() {
            MAX_CONCURRENT
        } else {
            MAX_PER_AGENT
        };
        self.permits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((bottle.to_owned(), agent.to_owned()))
            .or_insert_with(|| Arc::new(Semaphore::new(size)))
            .clone()
    }

    /// Answer one request for `/git/...` on `bottle`'s listener.
    pub async fn handle(&self, bottle: &str, req: Request) -> Response {
        let config = self
            .bottles
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(bottle)
            .cloned();
        let agent = config
            .as_ref()
            .and_then(|c| authenticate(&c.agents, req.headers()))
            .map(str::to_owned);
        let Some(agent) = agent else {
            self.ctx.log.unidentified(
                "git",
                json!({"bottle": bottle, "decision": "refused", "status": 401,
                       "path": truncate(req.uri().path(), 200),
                       "reason": "no valid git credential for this bottle"}),
            );
            let mut response = text(
                http::StatusCode::UNAUTHORIZED,
                "bottle gate: this needs the agent's git credential",
            );
            response.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Basic realm=\"bottle git gate\""),
            );
            return response;
        };
        let config = config.expect("authenticated against it");
        let refuse = |status: http::StatusCode, remote: &str, reason: &str| {
            self.ctx.log.event(
                "git",
                json!({"bottle": bottle, "agent": agent, "remote": remote,
                       "decision": "refused", "status": status.as_u16(), "reason": reason}),
            );
            text(status, &format!("bottle gate: {reason}"))
        };
        let Some((remote_name, route)) = route(&req) else {
            return refuse(
                http::StatusCode::NOT_FOUND,
                "",
                "not a git smart-HTTP path (/git/<remote>.git/...)",
            );
        };
        let Some(remote) = config.remotes.get(remote_name).cloned() else {
            return refuse(
                http::StatusCode::NOT_FOUND,
                remote_name,
                &format!("remote `{remote_name}` is not declared for bottle `{bottle}`"),
            );
        };
        let (service, advertisement) = route;
        if service == Service::ReceivePack && remote.config.push.is_empty() {
            return refuse(
                http::StatusCode::FORBIDDEN,
                remote_name,
                &format!(
                    "remote `{remote_name}` is read-only: its `push` declares no branches the agent may push"
                ),
            );
        }
        // The agent's own slot first, then one of its bottle's: requests
        // an agent holds open wait on its own slots only.
        let permit = match tokio::time::timeout(QUEUE_WAIT, async {
            let agent_slot = self.slots(bottle, &agent).acquire_owned().await;
            let bottle_slot = self.slots(bottle, "").acquire_owned().await;
            agent_slot.and_then(|a| bottle_slot.map(|b| (a, b)))
        })
        .await
        {
            Ok(Ok(p)) => p,
            _ => {
                return refuse(
                    http::StatusCode::SERVICE_UNAVAILABLE,
                    remote_name,
                    "too many git requests at once; try again",
                );
            }
        };
        // A mirror of this very upstream exists: the sync is a plain fetch
        // (a new or changed upstream means a fresh clone, done first).
        let cloned = remote.layout.mirror().join("HEAD").exists()
            && std::fs::read_to_string(remote.layout.upstream_file())
                .ok()
                .as_deref()
                == Some(remote.config.upstream.as_str());
        let v2 = req
            .headers()
            .get("git-protocol")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(':').any(|p| p == "version=2"));
        if advertisement && service == Service::UploadPack && v2 && cloned {
            // Protocol v2 advertises no refs here (only capabilities): sync
            // while git answers, and hold the requests that list refs or
            // fetch until the sync is done.
            if let Ok(syncing) =
                tokio::time::timeout(QUEUE_WAIT, remote.shared.syncing.clone().lock_owned()).await
            {
                let (ctx, remote, bottle, agent) = (
                    self.ctx.clone(),
                    remote.clone(),
                    bottle.to_owned(),
                    agent.clone(),
                );
                tokio::spawn(async move {
                    let sync = ctx.locked_sync(&remote).await;
                    ctx.log_sync(&bottle, &agent, &remote, service, &sync);
                    drop(syncing);
                });
            }
        } else if advertisement {
            let sync = self.ctx.locked_sync(&remote).await;
            self.ctx.log_sync(bottle, &agent, &remote, service, &sync);
            if let Err(e) = sync {
                return text(
                    http::StatusCode::BAD_GATEWAY,
                    &format!(
                        "bottle gate: no mirror of `{remote_name}` yet and its upstream cannot be reached: {e}"
                    ),
                );
            }
        } else if service == Service::UploadPack {
            // Wait (bounded) for a sync an advertisement started.
            let _ = tokio::time::timeout(QUEUE_WAIT, remote.shared.syncing.lock()).await;
        }
        self.serve(remote, agent, service, advertisement, req, permit)
            .await
    }

    /// Run `git http-backend` for the request.
    async fn serve(
        &self,
        remote: Arc<Remote>,
        agent: String,
        service: Service,
        advertisement: bool,
        req: Request,
        permit: (
            tokio::sync::OwnedSemaphorePermit,
            tokio::sync::OwnedSemaphorePermit,
        ),
    ) -> Response {
        let push = service == Service::ReceivePack && !advertisement;
        // A push holds the remote against syncs and other pushes until
        // git is done.
        let guard = if push {
            match tokio::time::timeout(QUEUE_WAIT, remote.shared.state.clone().lock_owned()).await {
                Ok(guard) => Some(guard),
                Err(_) => {
                    return text(
                        http::StatusCode::SERVICE_UNAVAILABLE,
                        "bottle gate: another push to this remote is running; try again",
                    );
                }
            }
        } else {
            None
        };
        let (parts, body) = req.into_parts();
        let mut env = self.ctx.base_env(&remote, push);
        let path = parts.uri.path();
        let rest = path
            .strip_prefix(&format!("/git/{}.git", remote.config.name))
            .unwrap_or("");
        env.extend([
            (
                "GIT_PROJECT_ROOT".into(),
                remote.layout.view.to_string_lossy().into_owned(),
            ),
            ("GIT_HTTP_EXPORT_ALL".into(), "1".into()),
            (
                "PATH_INFO".into(),
                format!("/{}.git{rest}", remote.config.name),
            ),
            ("REQUEST_METHOD".into(), parts.method.as_str().to_owned()),
            (
                "QUERY_STRING".into(),
                if advertisement {
                    format!("service={}", service.name())
                } else {
                    String::new()
                },
            ),
            ("REMOTE_USER".into(), agent.clone()),
            ("REMOTE_ADDR".into(), "127.0.0.1".into()),
        ]);
        let header = |name: http::header::HeaderName| {
            parts
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        if let Some(ct) = header(http::header::CONTENT_TYPE)
            && ct.len() < 200
        {
            env.push(("CONTENT_TYPE".into(), ct));
        }
        if let Some(cl) = header(http::header::CONTENT_LENGTH)
            && cl.parse::<u64>().is_ok()
        {
            env.push(("CONTENT_LENGTH".into(), cl));
        }
        if let Some(ce) = header(http::header::CONTENT_ENCODING)
            && (ce == "gzip" || ce == "x-gzip")
        {
            env.push(("HTTP_CONTENT_ENCODING".into(), ce));
        }
        if let Some(proto) = parts
            .headers
            .get("git-protocol")
            .and_then(|v| v.to_str().ok())
            && proto.len() < 100
            && proto
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "=:._-".contains(c))
        {
            env.push(("HTTP_GIT_PROTOCOL".into(), proto.to_owned()));
        }
        let decisions = push.then(|| {
            let id = super::config::new_token();
            env.push((
                "BOTTLE_GIT_DECISIONS".into(),
                format!("{}/{id}", remote.layout.view_of("run")),
            ));
            remote.layout.run_dir().join(id)
        });
        let body_limit = if service == Service::ReceivePack {
            MAX_PACK + (1 << 20)
        } else {
            MAX_UPLOAD_REQUEST
        };
        let log = self.ctx.log.clone();
        let remote2 = remote.clone();
        let agent2 = agent.clone();
        let finish = Box::new(move |outcome: cgi::Outcome| {
            let _permit = permit;
            let _guard = guard;
            if let Some(path) = decisions {
                log_push(&log, &remote2, &agent2, &path, &outcome);
            } else if !outcome.status.is_some_and(|s| s.success()) || outcome.body_too_large {
                log.event(
                    "git",
                    json!({"bottle": remote2.bottle, "agent": agent2, "remote": remote2.config.name,
                           "op": service.name(), "decision": "failed",
                           "reason": if outcome.body_too_large { "request too large".to_owned() }
                                     else { truncate(outcome.stderr.trim(), 800).to_owned() }}),
                );
            }
        });
        let mut confine = self.ctx.confine(&remote.layout, remote.layout.view.clone());
        if service == Service::ReceivePack {
            confine.max_data = Some(MAX_PUSH_MEMORY);
        }
        let cgi = cgi::Cgi {
            confine,
            env,
            body_limit,
        };
        match cgi::run(cgi, body, finish).await {
            Ok(response) => response,
            Err(e) => {
                self.ctx.log.event(
                    "git",
                    json!({"bottle": remote.bottle, "agent": agent, "remote": remote.config.name,
                           "op": service.name(), "decision": "failed", "reason": e}),
                );
                text(
                    http::StatusCode::BAD_GATEWAY,
                    "bottle gate: git failed; see the gate log",
                )
            }
        }
    }
}

/// What running git needs, apart from the gateway (so a sync can run in a
/// task of its own).
#[derive(Clone)]
struct Ctx {
    log: Arc<GateLog>,
    run_as: Option<RunAs>,
    /// The empty directory each bottle's mirrors are bound at in git's
    /// mount namespace; `None`: git sees the real paths.
    mount: Option<PathBuf>,
}

impl Ctx {
    /// [`Ctx::sync`] once the remote is free (bounded wait).
    async fn locked_sync(&self, remote: &Remote) -> Result<Sync, String> {
        match tokio::time::timeout(QUEUE_WAIT, remote.shared.state.clone().lock_owned()).await {
            Ok(state) => self.sync(remote, state).await,
            Err(_) if remote.layout.mirror().join("HEAD").exists() => Ok(Sync::Stale(
                "a push or another sync held the mirror too long".into(),
            )),
            Err(_) => Err("a push or another sync held the mirror too long".into()),
        }
    }

    fn log_sync(
        &self,
        bottle: &str,
        agent: &str,
        remote: &Remote,
        service: Service,
        sync: &Result<Sync, String>,
    ) {
        let (decision, upstream_sync, reason) = match sync {
            Ok(Sync::Fresh) => ("allowed", "ok", None),
            Ok(Sync::Stale(e)) => (
                "allowed",
                "failed: serving the mirror as it is",
                Some(e.as_str()),
            ),
            Err(e) => ("refused", "failed: no mirror yet", Some(e.as_str())),
        };
        self.log.event(
            "git",
            json!({"bottle": bottle, "agent": agent, "remote": remote.config.name,
                   "op": "advertise", "service": service.name(), "decision": decision,
                   "upstream_sync": upstream_sync, "reason": reason}),
        );
    }

    /// The environment of every git process for `remote`: nothing from
    /// the gate's own environment but `PATH`; the security settings as
    /// command-line configuration (which the mirror's own config cannot
    /// override); upstream credentials only when `upstream` is set.
    fn base_env(&self, remote: &Remote, upstream: bool) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = vec![
            (
                "PATH".into(),
                std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()),
            ),
            ("HOME".into(), "/nonexistent".into()),
            ("LC_ALL".into(), "C".into()),
            ("GIT_CONFIG_NOSYSTEM".into(), "1".into()),
            ("GIT_CONFIG_GLOBAL".into(), "/dev/null".into()),
            ("GIT_TERMINAL_PROMPT".into(), "0".into()),
            ("GIT_ASKPASS".into(), "/bin/false".into()),
            ("SSH_ASKPASS".into(), "/bin/false".into()),
        ];
        let mut config: Vec<(&str, String)> = vec![
            ("protocol.allow", "never".into()),
            ("protocol.file.allow", "always".into()),
            ("protocol.git.allow", "always".into()),
            ("protocol.ssh.allow", "always".into()),
            ("protocol.https.allow", "always".into()),
            ("transfer.credentialsInUrl", "die".into()),
            ("core.hooksPath", remote.layout.view_of("hooks")),
            ("receive.fsckObjects", "true".into()),
            ("receive.maxInputSize", MAX_PACK.to_string()),
            ("receive.denyDeletes", "true".into()),
            ("receive.denyNonFastForwards", "true".into()),
            ("receive.advertisePushOptions", "false".into()),
            ("http.getanyfile", "false".into()),
            ("http.uploadpack", "true".into()),
            (
                "http.receivepack",
                (!remote.config.push.is_empty()).to_string(),
            ),
            ("uploadpack.allowFilter", "true".into()),
            ("fetch.writeCommitGraph", "false".into()),
            ("http.lowSpeedLimit", "1000".into()),
            ("http.lowSpeedTime", "60".into()),
        ];
        if let Transport::Local { path } = &remote.transport {
            config.push(("safe.directory", path.to_string_lossy().into_owned()));
        }
        if upstream {
            if let Some(token) = &remote.token {
                config.push(("credential.helper", String::new()));
                config.push((
                    "credential.helper",
                    "!f() { test \"$1\" = get && printf 'username=x-access-token\\npassword=%s\\n' \"$BOTTLE_GIT_TOKEN\"; }; f".into(),
                ));
                env.push(("BOTTLE_GIT_TOKEN".into(), token.clone()));
            }
            if matches!(remote.transport, Transport::Ssh { .. }) {
                let identity = match (&remote.ssh_key, self.run_as) {
                    (None, _) => SshIdentity::None,
                    (Some(_), Some(_)) => {
                        SshIdentity::Agent(remote.layout.view_of("ssh/agent.sock"))
                    }
                    (Some(path), None) => SshIdentity::File(path.clone()),
                };
                env.push((
                    "GIT_SSH_COMMAND".into(),
                    upstream::ssh_command(&remote.layout.view_of("known_hosts"), &identity),
                ));
                env.push(("GIT_SSH_VARIANT".into(), "ssh".into()));
            }
        }
        env.push(("GIT_CONFIG_COUNT".into(), config.len().to_string()));
        for (i, (k, v)) in config.into_iter().enumerate() {
            env.push((format!("GIT_CONFIG_KEY_{i}"), k.to_owned()));
            env.push((format!("GIT_CONFIG_VALUE_{i}"), v));
        }
        env
    }

    /// Git confined to `layout`'s bottle, working in `cwd` (a view path).
    fn confine(&self, layout: &Layout, cwd: PathBuf) -> Confine {
        Confine {
            max_data: None,
            run_as: self.run_as,
            bind: self
                .mount
                .as_ref()
                .map(|m| (layout.bottle_dir.clone(), m.clone())),
            cwd,
        }
    }

    /// Bring the mirror up to date from upstream (cloning it the first
    /// time, or afresh when the upstream changed). `Err`: there is no
    /// mirror to serve.
    async fn sync(
        &self,
        remote: &Remote,
        mut state: tokio::sync::OwnedMutexGuard<RemoteState>,
    ) -> Result<Sync, String> {
        if let Err(e) = self.ensure_ssh_agent(remote, &mut state).await {
            self.log.event(
                "git",
                json!({"bottle": remote.bottle, "remote": remote.config.name,
                       "op": "ssh-agent", "decision": "failed", "reason": e}),
            );
        }
        let mirror = remote.layout.mirror();
        let upstream_file = remote.layout.upstream_file();
        let recorded = std::fs::read_to_string(&upstream_file).ok();
        let env = self.base_env(remote, true);
        let cloned = mirror.join("HEAD").exists();
        // A local upstream is read by an upload-pack git starts without the
        // gate's config (git drops it for the local transport), so its
        // `safe.directory` goes on that command line: an upstream owned by
        // someone else than the git user is read, as it is by anyone.
        let upload_pack: Vec<String> = match &remote.transport {
            Transport::Local { path } => vec![
                "--upload-pack".into(),
                format!(
                    "git -c safe.directory='{}' upload-pack",
                    path.to_string_lossy().replace('\'', r"'\''")
                ),
            ],
            _ => Vec::new(),
        };
        let upload_pack: Vec<&str> = upload_pack.iter().map(String::as_str).collect();
        if cloned && recorded.as_deref() == Some(remote.config.upstream.as_str()) {
            let mut args = vec![
                "fetch",
                "--quiet",
                "--prune",
                "--no-write-fetch-head",
                "--no-auto-maintenance",
                "--no-show-forced-updates",
            ];
            args.extend(&upload_pack);
            args.extend([
                "--",
                &remote.config.upstream,
                "+refs/heads/*:refs/heads/*",
                "+refs/tags/*:refs/tags/*",
            ]);
            let ran = mirror::git(
                &self.confine(&remote.layout, remote.layout.mirror_view()),
                &args,
                &env,
                mirror::SYNC_TIMEOUT,
            )
            .await;
            return Ok(if ran.ok {
                Sync::Fresh
            } else {
                Sync::Stale(truncate(ran.stderr.trim(), 800).to_owned())
            });
        }
        // A fresh mirror.
        let _ = std::fs::remove_file(&upstream_file);
        if mirror.exists() {
            std::fs::remove_dir_all(&mirror)
                .map_err(|e| format!("cannot reset the mirror: {e}"))?;
        }
        mirror::make_dir(&mirror, 0o755, self.run_as)
            .map_err(|e| format!("cannot create the mirror: {e}"))?;
        let mirror_view = remote.layout.mirror_view().to_string_lossy().into_owned();
        let mut args = vec!["clone", "--bare", "--quiet"];
        args.extend(&upload_pack);
        args.extend(["--", &remote.config.upstream, &mirror_view]);
        let ran = mirror::git(
            &self.confine(&remote.layout, remote.layout.view.clone()),
            &args,
            &env,
            mirror::SYNC_TIMEOUT,
        )
        .await;
        if !ran.ok || !mirror.join("HEAD").exists() {
            let _ = std::fs::remove_dir_all(&mirror);
            return Err(truncate(ran.stderr.trim(), 800).to_owned());
        }
        mirror::write_file(&upstream_file, &remote.config.upstream, 0o644)
            .map_err(|e| format!("cannot record the upstream: {e}"))?;
        Ok(Sync::Fresh)
    }

    /// When git does not run as the gate's user, the ssh key reaches it
    /// through an ssh-agent of the git user holding only that key.
    async fn ensure_ssh_agent(
        &self,
        remote: &Remote,
        state: &mut RemoteState,
    ) -> Result<(), String> {
        let (Some(key), Some(run_as)) = (&remote.ssh_key, self.run_as) else {
            return Ok(());
        };
        if let Some((child, held)) = &mut state.ssh_agent {
            if held == key && matches!(child.try_wait(), Ok(None)) {
                return Ok(());
            }
            let _ = child.kill().await;
            state.ssh_agent = None;
        }
        let dir = remote.layout.ssh_dir();
        let sock = dir.join("agent.sock");
        let _ = std::fs::remove_file(&sock);
        let mut cmd = tokio::process::Command::new("ssh-agent");
        cmd.args(["-D", "-a", "agent.sock"])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true);
        confine(
            cmd.as_std_mut(),
            &Confine {
                max_data: None,
                run_as: Some(run_as),
                bind: None,
                cwd: dir.clone(),
            },
        );
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start ssh-agent: {e}"))?;
        state.ssh_agent = Some((child, key.clone()));
        for _ in 0..100 {
            if sock.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let added = tokio::process::Command::new("ssh-add")
            .arg("-q")
            .arg(key)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("SSH_AUTH_SOCK", &sock)
            .env("SSH_ASKPASS", "/bin/false")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .output();
        match tokio::time::timeout(Duration::from_secs(10), added).await {
            Ok(Ok(out)) if out.status.success() => Ok(()),
            Ok(Ok(out)) => Err(format!(
                "ssh-add {}: {}",
                key.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            Ok(Err(e)) => Err(format!("cannot run ssh-add: {e}")),
            Err(_) => Err("ssh-add took too long".into()),
        }
    }
}

impl Drop for GitGateway {
    fn drop(&mut self) {
        if let Some(m) = &self.ctx.mount {
            let _ = std::fs::remove_dir(m);
        }
    }
}

/// An empty directory to bind mirrors at in git's mount namespace, if a
/// child can make one (root, with mount namespaces allowed). Without it git
/// uses the real paths, and the git user must be able to reach them.
fn view_point(run_as: RunAs, log: &GateLog) -> Option<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "bottle-git-view-{}",
        &super::config::new_token()[..12]
    ));
    mirror::make_dir(&dir, 0o755, None).ok()?;
    let mut probe = std::process::Command::new("true");
    probe.stdin(std::process::Stdio::null());
    confine(
        &mut probe,
        &Confine {
            max_data: None,
            run_as: Some(run_as),
            bind: Some((std::env::temp_dir(), dir.clone())),
            cwd: dir.clone(),
        },
    );
    match probe.status() {
        Ok(s) if s.success() => Some(dir),
        other => {
            log.event(
                "git",
                json!({"op": "start", "decision": "degraded",
                       "reason": format!("no private mount namespace for git ({other:?}): git sees the real paths of the mirrors")}),
            );
            let _ = std::fs::remove_dir(&dir);
            None
        }
    }
}

/// The decisions the hook wrote for one push, as log lines. The hook runs
/// as the git user, so each line is checked before it is believed.
fn log_push(log: &GateLog, remote: &Remote, agent: &str, path: &Path, outcome: &cgi::Outcome) {
    let text = read_bounded(path, 256 << 10);
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(path.with_extension("upstream"));
    let mut any = false;
    for line in text.lines() {
        let fields: Vec<&str> = line.splitn(5, '\t').collect();
        let [decision, git_ref, old, new, reason] = fields[..] else {
            continue;
        };
        let hex =
            |s: &str| !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
        if !matches!(decision, "accepted" | "refused") || !hex(old) || !hex(new) {
            continue;
        }
        any = true;
        log.event(
            "git",
            json!({"bottle": remote.bottle, "agent": agent, "remote": remote.config.name,
                   "op": "push", "ref": truncate(git_ref, 300), "old": old, "new": new,
                   "decision": decision, "reason": truncate(reason, 1000)}),
        );
    }
    if !any {
        let reason = if outcome.body_too_large {
            format!("the pack is larger than {MAX_PACK} bytes")
        } else if outcome.stderr.trim().is_empty() {
            "git refused the pack before any ref was considered".to_owned()
        } else {
            truncate(outcome.stderr.trim(), 800).to_owned()
        };
        log.event(
            "git",
            json!({"bottle": remote.bottle, "agent": agent, "remote": remote.config.name,
                   "op": "push", "decision": "refused", "reason": reason}),
        );
    }
}

/// At most `max` bytes of a regular file the git user may have planted:
/// never through a symlink, never blocking on a FIFO.
fn read_bounded(path: &Path, max: u64) -> String {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut out = Vec::new();
    if let Ok(f) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        && f.metadata().is_ok_and(|m| m.is_file())
    {
        let _ = f.take(max).read_to_end(&mut out);
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `(remote, (service, is the advertisement))` for the three smart-HTTP
/// requests git makes, with the method each must use.
fn route(req: &Request) -> Option<(&str, (Service, bool))> {
    let rest = req.uri().path().strip_prefix("/git/")?;
    let (remote, rest) = rest.split_once(".git/")?;
    if remote.is_empty() || remote.contains('/') {
        return None;
    }
    let get = req.method() == http::Method::GET;
    let post = req.method() == http::Method::POST;
    let service = |name: &str| match name {
        "git-upload-pack" => Some(Service::UploadPack),
        "git-receive-pack" => Some(Service::ReceivePack),
        _ => None,
    };
    match rest {
        "info/refs" if get => {
            let query = req.uri().query().unwrap_or("");
            let name = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("service="))?;
            Some((remote, (service(name)?, true)))
        }
        "git-upload-pack" | "git-receive-pack" if post => Some((remote, (service(rest)?, false))),
        _ => None,
    }
}

/// The agent whose HTTP Basic credentials these are, among `agents`
/// (name -> git token).
fn authenticate<'a>(
    agents: &'a BTreeMap<String, String>,
    headers: &http::HeaderMap,
) -> Option<&'a str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = crate::base64::decode_optional(encoded.trim())?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    let (name, token) = agents.get_key_value(user)?;
    constant_time_eq(token.as_bytes(), password.as_bytes()).then_some(name.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_are_read_only_from_regular_files() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("d");
        std::fs::write(&file, "accepted\tx").unwrap();
        assert_eq!(read_bounded(&file, 100), "accepted\tx");
        assert_eq!(read_bounded(&file, 3), "acc");
        let link = dir.path().join("l");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert_eq!(read_bounded(&link, 100), "");
        let fifo = dir.path().join("f");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert_eq!(read_bounded(&fifo, 100), "");
    }

    #[test]
    fn base64_round() {
        assert_eq!(
            crate::base64::decode_optional("Y29kZXI6dDE=").unwrap(),
            b"coder:t1"
        );
        assert_eq!(crate::base64::decode_optional("YQ").unwrap(), b"a");
        assert!(crate::base64::decode_optional("a*b").is_none());
    }

    #[test]
    fn credentials_resolve_only_to_their_own_agent() {
        let agents: BTreeMap<String, String> = [
            ("coder".to_owned(), "t1".to_owned()),
            ("rev".to_owned(), "t2".to_owned()),
        ]
        .into();
        let h = |v: &str| {
            let mut m = http::HeaderMap::new();
            m.insert(http::header::AUTHORIZATION, v.parse().unwrap());
            m
        };
        // coder:t1, coder:t2, rev:t2
        assert_eq!(
            authenticate(&agents, &h("Basic Y29kZXI6dDE=")),
            Some("coder")
        );
        assert_eq!(authenticate(&agents, &h("Basic Y29kZXI6dDI=")), None);
        assert_eq!(authenticate(&agents, &h("basic cmV2OnQy")), Some("rev"));
        assert_eq!(authenticate(&agents, &h("Bearer t1")), None);
        assert_eq!(authenticate(&agents, &http::HeaderMap::new()), None);
    }

    fn remote_with(upstream: &str, credentials: Option<GitCredentials>) -> Remote {
        let config = GateRemote {
            name: "app".into(),
            upstream: upstream.into(),
            credentials,
            push: vec!["agent/*".into()],
            host_key: None,
        };
        Remote {
            bottle: "dev".into(),
            transport: upstream::parse(upstream).unwrap(),
            token: match &config.credentials {
                Some(GitCredentials::Token { .. }) => Some("s3cret-token".into()),
                _ => None,
            },
            ssh_key: match &config.credentials {
                Some(GitCredentials::SshKey { path }) => Some(path.clone()),
                _ => None,
            },
            config,
            layout: Layout {
                bottle_dir: "/state/git/dev".into(),
                view: "/view".into(),
                remote: "app".into(),
            },
            shared: Shared::default(),
        }
    }

    fn ctx(run_as: Option<RunAs>) -> (tempfile::TempDir, Ctx) {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(GateLog::open(&dir.path().join("log")).unwrap());
        let ctx = Ctx {
            log,
            run_as,
            mount: Some("/view".into()),
        };
        (dir, ctx)
    }

    fn get<'a>(env: &'a [(String, String)], key: &str) -> Option<&'a str> {
        env.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    fn config_values(env: &[(String, String)], key: &str) -> Vec<String> {
        let n: usize = get(env, "GIT_CONFIG_COUNT").unwrap().parse().unwrap();
        (0..n)
            .filter(|i| get(env, &format!("GIT_CONFIG_KEY_{i}")) == Some(key))
            .map(|i| {
                get(env, &format!("GIT_CONFIG_VALUE_{i}"))
                    .unwrap()
                    .to_owned()
            })
            .collect()
    }

    #[test]
    fn a_token_reaches_only_the_git_that_talks_to_upstream_and_only_by_environment() {
        let (_d, ctx) = ctx(None);
        let remote = remote_with(
            "https://example.com/acme/app.git",
            Some(GitCredentials::Token {
                value_key: "GH".into(),
            }),
        );
        let serving = ctx.base_env(&remote, false);
        assert!(serving.iter().all(|(_, v)| !v.contains("s3cret-token")));
        assert!(config_values(&serving, "credential.helper").is_empty());
        let upstream = ctx.base_env(&remote, true);
        assert_eq!(get(&upstream, "BOTTLE_GIT_TOKEN"), Some("s3cret-token"));
        // Only that variable holds it: no config value, no URL.
        assert_eq!(
            upstream
                .iter()
                .filter(|(_, v)| v.contains("s3cret-token"))
                .count(),
            1
        );
        let helpers = config_values(&upstream, "credential.helper");
        assert_eq!(helpers[0], "", "inherited helpers are reset first");
        assert!(helpers[1].contains("$BOTTLE_GIT_TOKEN"));
        // The security settings come from the environment, not the mirror.
        assert_eq!(
            config_values(&upstream, "core.hooksPath"),
            ["/view/.gate/app/hooks"]
        );
        assert_eq!(config_values(&upstream, "receive.fsckObjects"), ["true"]);
        assert_eq!(config_values(&upstream, "protocol.allow"), ["never"]);
        assert_eq!(get(&upstream, "GIT_CONFIG_NOSYSTEM"), Some("1"));
    }

    #[test]
    fn ssh_keys_go_through_the_agent_when_git_is_another_user() {
        let remote = remote_with(
            "git@github.com:acme/app.git",
            Some(GitCredentials::SshKey {
                path: "/home/me/.ssh/deploy".into(),
            }),
        );
        let (_d, root) = ctx(Some(RunAs {
            uid: 65534,
            gid: 65534,
        }));
        let env = root.base_env(&remote, true);
        let ssh = get(&env, "GIT_SSH_COMMAND").unwrap();
        assert!(
            ssh.contains("IdentityAgent='/view/.gate/app/ssh/agent.sock'"),
            "{ssh}"
        );
        assert!(!ssh.contains("/home/me/.ssh/deploy"), "{ssh}");
        assert!(ssh.contains("UserKnownHostsFile='/view/.gate/app/known_hosts'"));
        assert!(get(&root.base_env(&remote, false), "GIT_SSH_COMMAND").is_none());
        let (_d, user) = ctx(None);
        let env = user.base_env(&remote, true);
        assert!(
            get(&env, "GIT_SSH_COMMAND")
                .unwrap()
                .contains("-i '/home/me/.ssh/deploy'")
        );
    }

    #[test]
    fn routes() {
        let r = |m: &str, uri: &str| {
            let req = http::Request::builder()
                .method(m)
                .uri(uri)
                .body(crate::gate::http::full(""))
                .unwrap();
            route(&req).map(|(name, x)| (name.to_owned(), x))
        };
        assert_eq!(
            r("GET", "/git/app.git/info/refs?service=git-upload-pack"),
            Some(("app".into(), (Service::UploadPack, true)))
        );
        assert_eq!(
            r("POST", "/git/app.git/git-receive-pack"),
            Some(("app".into(), (Service::ReceivePack, false)))
        );
        assert_eq!(r("GET", "/git/app.git/info/refs"), None);
        assert_eq!(r("GET", "/git/app.git/HEAD"), None);
        assert_eq!(r("GET", "/git/app.git/objects/info/packs"), None);
        assert_eq!(r("GET", "/git/app.git/git-upload-pack"), None);
        assert_eq!(r("POST", "/git/a/b.git/git-upload-pack"), None);
        assert_eq!(r("GET", "/git/app.git/info/refs?service=git-foo"), None);
    }
}
