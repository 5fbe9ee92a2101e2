//! The local runtime: one bubblewrap sandbox per machine, with a persistent
//! root of its own, for Linux machines without KVM and for CI.
//!
//! Each machine lives in `STATE/machines/NAME/`:
//!
//! - `machine.json`: its [`MachineRecord`], replaced atomically;
//! - `root/`: its persistent root directory (`/etc`, `/root`, `/home`,
//!   `/usr/local`, `/var`, `/tmp`, `/workspace`, `/opt`, ...), seeded at
//!   create from the host (a filtered `/etc`) or from a rootfs directory;
//! - `init.log`: what the sandbox said while starting;
//! - `lock`: serializes state changes across threads and processes.
//!
//! The system directories (`/usr`, and `/bin`, `/lib`, ... unless they are
//! merged-usr links) are bound read-only from the host or the rootfs at each
//! start. A running machine has its own pid, ipc, uts and mount namespaces,
//! and no network unless it declares egress and the user accepted the
//! host's network unfiltered. Commands run as the guest's root with a
//! reduced capability set (see [`exec::GUEST_CAPS`]).
//!
//! Semantics follow smolvm's: states `created`, `running`, `stopped`;
//! `update` only on a machine that is not running; `stop` of a stopped
//! machine succeeds.
//!
//! Needs root (to mount and to enter namespaces), `bwrap`, and util-linux's
//! `setsid` (and `nsenter` for interactive sessions).
//!
//! What a VM would give and this runtime does not:
//!
//! - no CPU or memory limits: `cpus` and `memory_mib` are recorded and
//!   reported only;
//! - no egress filtering: a machine has no network at all, or the host's;
//! - `/usr` is read-only (no `apt-get install`; install under `/usr/local`,
//!   `/opt` or a home directory), and bwrap mounts everything `nosuid`, so
//!   set-uid programs (`sudo`) do not raise a user's privileges;
//! - the guest's root is the host's uid 0 with a reduced capability set,
//!   without a user namespace or a seccomp filter: it is confined by the
//!   mount, pid, ipc, uts and net namespaces and the dropped capabilities,
//!   but shares, say, uid 0's kernel keyrings;
//! - an interactive session uses the caller's terminal directly, not a
//!   pseudo-terminal of its own.

mod accounts;
mod exec;
mod names;
pub mod relay;
mod sandbox;
mod seed;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub use exec::GUEST_CAPS;
pub use names::{MAX_NAME_LEN, validate_name};
pub use sandbox::InitProcess;

use super::{
    CopyOptions, Egress, ExecOutput, ExecRequest, MachineInfo, MachineSpec, MachineState,
    MachineUpdate, Runtime, RuntimeError, RuntimeErrorKind, RuntimeKind, SecretMount, SecretSource,
    VolumeMount,
};

/// How long `start` waits for a sandbox to come up.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `stop` waits for the init to die after SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest file `read_file` returns.
const MAX_READ_FILE: u64 = 256 << 20;

/// A machine as the local runtime stores it in `machine.json`.
///
/// [`LocalRuntime::record`] returns it with `state` and `init` probed: a
/// machine recorded as running whose init is gone reads as `stopped`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineRecord {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// The image as given at create (`None` or `host`: the host's system
    /// directories).
    pub image: Option<String>,
    /// The rootfs directory the system directories come from, absolute;
    /// `None` for the host.
    pub rootfs: Option<PathBuf>,
    /// Recorded and reported, not enforced: the local runtime puts no
    /// limit on CPU or memory.
    pub cpus: u32,
    /// Recorded and reported, not enforced (see `cpus`).
    pub memory_mib: u32,
    pub env: BTreeMap<String, String>,
    pub volumes: Vec<VolumeMount>,
    /// The declared egress allow-lists. The local runtime cannot filter: a
    /// machine with egress shares the host's network, unfiltered.
    pub egress: Option<Egress>,
    /// Whether the machine shares the host's network.
    pub network: bool,
    pub secrets: Vec<SecretMount>,
    /// The port of the bottle's gate on the host's loopback, reachable at
    /// `127.0.0.1:<port>` (or a [`Gateway`]'s address) inside the
    /// machine's own network (loopback only) through a relay (see
    /// [`relay`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate_port: Option<u16>,
    /// Unix seconds.
    pub created_at: u64,
    pub state: MachineState,
    /// The sandbox's init while running.
    pub init: Option<InitProcess>,
}

impl MachineRecord {
    /// The init's pid while running.
    pub fn pid(&self) -> Option<u32> {
        self.init.as_ref().map(|i| i.pid)
    }

    pub fn info(&self) -> MachineInfo {
        MachineInfo {
            name: self.name.clone(),
            state: self.state.clone(),
            cpus: Some(self.cpus),
            memory_mib: Some(self.memory_mib),
            image: self.image.clone(),
            network: self.network,
            labels: self.labels.clone(),
        }
    }

    /// The record with its state probed from the recorded init.
    fn probed(mut self) -> Self {
        let alive = self.init.as_ref().is_some_and(|i| i.is_alive());
        if self.state == MachineState::Running && !alive {
            self.state = MachineState::Stopped;
        }
        if !alive {
            self.init = None;
        }
        self
    }
}

/// The local runtime over one state directory.
#[derive(Debug, Clone)]
pub struct LocalRuntime {
    state_dir: PathBuf,
    bwrap: PathBuf,
    setsid: PathBuf,
    nsenter: PathBuf,
    /// The bottle executable, which serves the gate relay of gated machines
    /// (`bottle local-gate-relay`); `None`: such machines cannot start.
    relay: Option<PathBuf>,
    /// Where gated machines find their gate; `None`: `127.0.0.1:<port>`.
    gateway: Option<Gateway>,
}

/// Where a gated machine (one with a `gate_port` and no network of the
/// host's) finds the host, when not at `127.0.0.1:<gate_port>`: at
/// `address` (added to its loopback), where every port leads to the same
/// port on the host's loopback (see [`relay`]). The smolvm double plays
/// smolvm's gateway `100.96.0.1` with it.
#[derive(Debug, Clone, Copy)]
pub struct Gateway {
    pub address: std::net::Ipv4Addr,
}

impl LocalRuntime {
    /// Open (creating it if needed) a state directory.
    pub fn open(state_dir: &Path) -> Result<Self, RuntimeError> {
        let err = |kind| RuntimeError::new("open", "-", kind);
        if !rustix::process::geteuid().is_root() {
            return Err(err(RuntimeErrorKind::Unsupported(
                "the local runtime must run as root: it mounts each machine's root and enters \
                 its namespaces; run bottle with sudo, or use the smolvm runtime"
                    .to_owned(),
            )));
        }
        let machines = state_dir.join("machines");
        fs::create_dir_all(&machines).map_err(|source| {
            err(RuntimeErrorKind::Io {
                context: format!("create the state directory {}", machines.display()),
                source,
            })
        })?;
        let state_dir = fs::canonicalize(state_dir).map_err(|source| {
            err(RuntimeErrorKind::Io {
                context: format!("resolve {}", state_dir.display()),
                source,
            })
        })?;
        let find = |name: &str| {
            find_program(name).ok_or_else(|| {
                err(RuntimeErrorKind::Unsupported(format!(
                    "the local runtime needs `{name}`, which is not installed (on Debian: \
                     apt-get install {})",
                    if name == "bwrap" {
                        "bubblewrap"
                    } else {
                        "util-linux"
                    }
                )))
            })
        };
        let rt = Self {
            bwrap: find("bwrap")?,
            setsid: find("setsid")?,
            nsenter: find("nsenter")?,
            state_dir,
            relay: None,
            gateway: None,
        };
        rt.collect_garbage();
        Ok(rt)
    }

    /// Serve the gate relay of gated machines with `program` (the bottle
    /// executable).
    pub fn with_relay(mut self, program: PathBuf) -> Self {
        self.relay = Some(program);
        self
    }

    /// Give gated machines their gate at `gateway` (see [`Gateway`]).
    pub fn with_gateway(mut self, gateway: Gateway) -> Self {
        self.gateway = Some(gateway);
        self
    }

    /// The state directory, absolute.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The directory holding a machine's record and root.
    pub fn machine_dir(&self, name: &str) -> PathBuf {
        self.state_dir.join("machines").join(name)
    }

    /// A machine's record, with its state probed.
    pub fn record(&self, name: &str) -> Result<MachineRecord, RuntimeError> {
        self.load("status", name).map(MachineRecord::probed)
    }

    /// Remove what interrupted deletes and creates left behind.
    fn collect_garbage(&self) {
        let Ok(entries) = fs::read_dir(&self.state_dir) else {
            return;
        };
        // Only old leftovers: a young one may belong to a create or delete
        // still running in another process. The ctime of a renamed
        // directory is the time of the rename.
        let older_than = |entry: &fs::DirEntry, secs: i64| {
            use std::os::unix::fs::MetadataExt;
            entry
                .metadata()
                .is_ok_and(|m| now_unix() as i64 - m.ctime() > secs)
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if (name.starts_with(".trash-") && older_than(&entry, 600))
                || (name.starts_with(".staging-") && older_than(&entry, 3600))
            {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }

    fn load(&self, op: &'static str, name: &str) -> Result<MachineRecord, RuntimeError> {
        if validate_name(name).is_err() {
            return Err(RuntimeError::new(op, name, RuntimeErrorKind::NotFound));
        }
        let path = self.machine_dir(name).join("machine.json");
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(RuntimeError::new(op, name, RuntimeErrorKind::NotFound));
            }
            Err(source) => {
                return Err(RuntimeError::new(
                    op,
                    name,
                    RuntimeErrorKind::Io {
                        context: format!("read {}", path.display()),
                        source,
                    },
                ));
            }
        };
        serde_json::from_slice(&text).map_err(|e| {
            RuntimeError::new(
                op,
                name,
                RuntimeErrorKind::Malformed {
                    command: format!("read {}", path.display()),
                    detail: e.to_string(),
                },
            )
        })
    }

    /// Write a record atomically: a reader sees the old one or the new one.
    fn save(&self, op: &'static str, record: &MachineRecord) -> Result<(), RuntimeError> {
        let dir = self.machine_dir(&record.name);
        write_json_atomic(&dir, "machine.json", record).map_err(|source| {
            RuntimeError::new(
                op,
                &record.name,
                RuntimeErrorKind::Io {
                    context: format!("write {}", dir.join("machine.json").display()),
                    source,
                },
            )
        })
    }

    /// Take a machine's lock and read its record under it.
    fn lock(&self, op: &'static str, name: &str) -> Result<(File, MachineRecord), RuntimeError> {
        if validate_name(name).is_err() {
            return Err(RuntimeError::new(op, name, RuntimeErrorKind::NotFound));
        }
        let path = self.machine_dir(name).join("lock");
        let file = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(RuntimeError::new(op, name, RuntimeErrorKind::NotFound));
            }
            Err(source) => {
                return Err(io_err(op, name, format!("open {}", path.display()), source));
            }
        };
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| io_err(op, name, format!("lock {}", path.display()), e.into()))?;
        // The machine may have been deleted while we waited.
        let record = self.load(op, name)?;
        Ok((file, record))
    }

    fn sys_root(record: &MachineRecord) -> PathBuf {
        record.rootfs.clone().unwrap_or_else(|| PathBuf::from("/"))
    }

    /// Handles on a running machine, or `NotFound`/`NotRunning`.
    fn target(
        &self,
        op: &'static str,
        name: &str,
    ) -> Result<(MachineRecord, exec::Target), RuntimeError> {
        let record = self.load(op, name)?;
        let target = record
            .init
            .as_ref()
            .filter(|_| record.state == MachineState::Running)
            .and_then(exec::Target::open);
        match target {
            Some(t) => Ok((record, t)),
            None => Err(RuntimeError::new(op, name, RuntimeErrorKind::NotRunning)),
        }
    }

    /// Resolve user, working directory and environment for a request.
    fn prepare(
        &self,
        op: &'static str,
        record: &MachineRecord,
        target: &exec::Target,
        request: &ExecRequest,
        stdin: Option<Vec<u8>>,
    ) -> Result<exec::Prepared, RuntimeError> {
        let name = &record.name;
        let user_name = request.user.as_deref().unwrap_or("root");
        let user = target.lookup_user(user_name).ok_or_else(|| {
            unsupported(
                op,
                name,
                format!(
                    "user `{user_name}` does not exist in the machine's /etc/passwd; create it \
                     first (useradd)"
                ),
            )
        })?;
        let cwd = match &request.workdir {
            Some(dir) => {
                if !dir.starts_with('/') || !target.guest_dir_exists(dir) {
                    return Err(unsupported(
                        op,
                        name,
                        format!("working directory `{dir}` is not a directory of the machine"),
                    ));
                }
                dir.clone()
            }
            None if target.guest_dir_exists(&user.home) => user.home.clone(),
            None => "/".to_owned(),
        };
        let mut env = exec::base_env(&user);
        for (k, v) in &record.env {
            env.insert(k.into(), v.into());
        }
        if !record.secrets.is_empty() {
            let mut started_with = target.secrets(&record.secrets);
            for secret in &record.secrets {
                let value = started_with
                    .remove(&secret.guest_env)
                    .ok_or_else(|| unsupported(op, name, secret_missing_since_start(secret)))?;
                env.insert(secret.guest_env.clone().into(), value);
            }
        }
        for (k, v) in &request.env {
            env.insert(k.into(), v.into());
        }
        Ok(exec::Prepared {
            argv: request.argv.iter().map(OsString::from).collect(),
            env,
            cwd,
            user,
            stdin,
            timeout: request.timeout,
        })
    }

    fn run(
        &self,
        op: &'static str,
        name: &str,
        request: &ExecRequest,
        stdin: Option<Vec<u8>>,
    ) -> Result<ExecOutput, RuntimeError> {
        if request.argv.is_empty() {
            return Err(unsupported(op, name, "no command given".to_owned()));
        }
        if let Some(k) = request.env.keys().find(|k| !valid_env_name(k)) {
            return Err(unsupported(
                op,
                name,
                format!("environment variable name `{k}` is not valid"),
            ));
        }
        let (record, target) = self.target(op, name)?;
        let prepared = self.prepare(op, &record, &target, request, stdin)?;
        let command = exec::display_argv(&prepared.argv);
        match exec::run(&target, prepared) {
            Ok(out) => Ok(ExecOutput {
                status: out.status,
                stdout: out.stdout,
                stderr: out.stderr,
            }),
            Err(exec::RunError::Timeout) => Err(RuntimeError::new(
                op,
                name,
                RuntimeErrorKind::Timeout {
                    command,
                    timeout: request.timeout,
                },
            )),
            Err(exec::RunError::Spawn(source)) => {
                // The init may have died between the check and the spawn.
                if !record.init.as_ref().is_some_and(|i| i.is_alive()) {
                    return Err(RuntimeError::new(op, name, RuntimeErrorKind::NotRunning));
                }
                // A program that is missing or not executable in the guest
                // is the command's failure, with a shell's status, as a
                // VM's agent would report it.
                let status = match source.kind() {
                    io::ErrorKind::NotFound => Some(127),
                    io::ErrorKind::PermissionDenied => Some(126),
                    _ => None,
                };
                if let Some(status) = status {
                    let program = request.argv[0].as_str();
                    return Ok(ExecOutput {
                        status,
                        stdout: Vec::new(),
                        stderr: format!("{program}: {source}\n").into_bytes(),
                    });
                }
                Err(RuntimeError::new(
                    op,
                    name,
                    RuntimeErrorKind::Spawn { command, source },
                ))
            }
            Err(exec::RunError::Io(source)) => {
                Err(io_err(op, name, format!("run `{command}`"), source))
            }
            // The command's process group was killed, in the machine too:
            // it runs in the guest's namespaces as bottle's own child.
            Err(exec::RunError::Cancelled) => Err(RuntimeError::new(
                op,
                name,
                RuntimeErrorKind::Cancelled { command, note: "" },
            )),
            Err(exec::RunError::TooLarge) => Err(RuntimeError::new(
                op,
                name,
                RuntimeErrorKind::OutputTooLarge {
                    command,
                    limit: crate::runtime::MAX_EXEC_OUTPUT,
                },
            )),
        }
    }

    fn check_volumes(
        op: &'static str,
        name: &str,
        volumes: &[VolumeMount],
    ) -> Result<(), RuntimeError> {
        for v in volumes {
            let bad = |why: &str| unsupported(op, name, format!("volume {}: {why}", v.to_arg()));
            if !v.host.is_absolute() {
                return Err(bad("the host path must be absolute"));
            }
            let guest = Path::new(&v.guest);
            if !guest.is_absolute()
                || guest
                    .components()
                    .any(|c| !matches!(c, Component::RootDir | Component::Normal(_)))
            {
                return Err(bad("the guest path must be absolute, without `.` or `..`"));
            }
            let first = guest
                .components()
                .nth(1)
                .and_then(|c| c.as_os_str().to_str())
                .unwrap_or("");
            let system = seed::SYSTEM_DIRS.contains(&first) && !guest.starts_with("/usr/local/")
                || ["proc", "dev", "sys"].contains(&first)
                || guest == Path::new("/")
                || guest == Path::new("/run");
            if system {
                return Err(bad(
                    "the guest path is a system directory of the machine; mount it under \
                     /workspace, /home, /opt, /mnt or /srv",
                ));
            }
        }
        Ok(())
    }
}

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/bin", "/bin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn io_err(op: &'static str, name: &str, context: String, source: io::Error) -> RuntimeError {
    RuntimeError::new(op, name, RuntimeErrorKind::Io { context, source })
}

/// Kill a machine's recorded init, if it has one.
fn kill_init(op: &'static str, name: &str, record: &MachineRecord) -> Result<(), RuntimeError> {
    let Some(init) = &record.init else {
        return Ok(());
    };
    sandbox::kill(init, STOP_TIMEOUT).map_err(|source| {
        io_err(
            op,
            name,
            format!("kill the sandbox (pid {})", init.pid),
            source,
        )
    })
}

fn unsupported(op: &'static str, name: &str, message: String) -> RuntimeError {
    RuntimeError::new(op, name, RuntimeErrorKind::Unsupported(message))
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// A name the environment can hold (`NAME=value`).
fn valid_env_name(s: &str) -> bool {
    !s.is_empty() && !s.contains(['=', '\0'])
}

fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with(|c: char| c.is_ascii_digit())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Why a running machine lacks a secret it declares: it was started
/// before bottle passed secrets at start.
fn secret_missing_since_start(secret: &SecretMount) -> String {
    format!(
        "secret {}: the machine was started without it (secrets are read when a machine \
         starts); stop and start the machine",
        secret.guest_env
    )
}

/// Read a secret's value on the host, now.
fn resolve_secret(secret: &SecretMount) -> Result<OsString, String> {
    let guest = &secret.guest_env;
    match &secret.source {
        SecretSource::HostEnv(var) => std::env::var_os(var).ok_or_else(|| {
            format!(
                "secret {guest}: the host environment variable {var} is not set; export it in \
                 the environment bottle runs in"
            )
        }),
        SecretSource::HostFile(path) => crate::secrets::read_secret_file(path)
            .map(std::os::unix::ffi::OsStringExt::from_vec)
            .map_err(|e| format!("secret {guest}: {} {e}", path.display())),
    }
}

fn write_json_atomic<T: Serialize>(dir: &Path, name: &str, value: &T) -> io::Result<()> {
    let tmp = dir.join(format!(".{name}.{}", fastrand::u64(..)));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        let mut text = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
        text.push(b'\n');
        f.write_all(&text)?;
        f.sync_all()?;
        fs::rename(&tmp, dir.join(name))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

impl LocalRuntime {
    /// Make the gate's port (or every port of a [`Gateway`]) reachable
    /// inside a started machine.
    fn start_relay(&self, init: &InitProcess, port: u16) -> Result<(), String> {
        let program = self.relay.as_deref().ok_or_else(|| {
            "the machine reaches its bottle's gate through a relay that only the bottle \
             executable serves; start it with `bottle apply`"
                .to_owned()
        })?;
        let (listener, link, port) = match self.gateway {
            Some(gateway) => {
                let (listener, link) =
                    relay::listen_every_port_in(init, gateway.address).map_err(|e| {
                        format!(
                            "cannot listen at the gateway {} inside the machine: {e}",
                            gateway.address
                        )
                    })?;
                (listener, Some(link), 0)
            }
            None => {
                let listener = relay::listen_in(init, port)
                    .map_err(|e| format!("cannot listen for the gate inside the machine: {e}"))?;
                (listener, None, port)
            }
        };
        relay::spawn(&self.setsid, program, listener, link, init, port)
            .map_err(|e| format!("cannot start the gate relay: {e}"))
    }
}

impl Runtime for LocalRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Local
    }

    fn list(&self) -> Result<Vec<MachineInfo>, RuntimeError> {
        let dir = self.state_dir.join("machines");
        let entries = fs::read_dir(&dir)
            .map_err(|source| io_err("list", "-", format!("read {}", dir.display()), source))?;
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry
                .map_err(|source| io_err("list", "-", format!("read {}", dir.display()), source))?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if validate_name(&name).is_err() {
                continue;
            }
            match self.load("list", &name) {
                Ok(record) => out.push(record.probed().info()),
                // Deleted meanwhile.
                Err(RuntimeError {
                    kind: RuntimeErrorKind::NotFound,
                    ..
                }) => {}
                // A record that cannot be read is a machine in a bad state,
                // not a reason to hide the others.
                Err(_) => out.push(MachineInfo {
                    name,
                    state: MachineState::Failed,
                    cpus: None,
                    memory_mib: None,
                    image: None,
                    network: false,
                    labels: BTreeMap::new(),
                }),
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn create(&self, spec: &MachineSpec) -> Result<(), RuntimeError> {
        const OP: &str = "create";
        let name = spec.name.as_str();
        validate_name(name)
            .map_err(|m| unsupported(OP, name, format!("invalid machine name: {m}")))?;
        let dir = self.machine_dir(name);
        if fs::symlink_metadata(&dir).is_ok() {
            return Err(RuntimeError::new(OP, name, RuntimeErrorKind::AlreadyExists));
        }
        if spec.egress.is_some() && !spec.allow_unfiltered_network {
            let bottle = spec
                .labels
                .get("bottle.bottle")
                .map(String::as_str)
                .unwrap_or("NAME");
            return Err(unsupported(
                OP,
                name,
                format!(
                    "the machine declares egress, but the local runtime cannot filter network \
                     traffic; set `[bottle.{bottle}.local] allow_unfiltered_network = true` to \
                     give it the host's network unfiltered, or use the smolvm runtime"
                ),
            ));
        }
        let rootfs = match spec.image.as_deref() {
            None | Some("host") => None,
            Some(image) => {
                let path = Path::new(image.strip_prefix("local-dir:").unwrap_or(image));
                let resolved = fs::canonicalize(path)
                    .ok()
                    .filter(|p| p.join("usr").is_dir());
                match resolved {
                    Some(p) => Some(p),
                    None => {
                        return Err(unsupported(
                            OP,
                            name,
                            format!(
                                "image `{image}`: the local runtime runs the host's system \
                                 directories (no image, or `host`) or an unpacked rootfs \
                                 directory with a /usr; this is neither"
                            ),
                        ));
                    }
                }
            }
        };
        if let Some(rootfs) = &rootfs
            && !rootfs.join("usr/local").is_dir()
        {
            return Err(unsupported(
                OP,
                name,
                format!(
                    "image {}: the rootfs has no /usr/local to mount the machine's own on",
                    rootfs.display()
                ),
            ));
        }
        Self::check_volumes(OP, name, &spec.volumes)?;
        for s in &spec.secrets {
            if !is_identifier(&s.guest_env) {
                return Err(unsupported(
                    OP,
                    name,
                    format!(
                        "secret {}: not a valid environment variable name",
                        s.guest_env
                    ),
                ));
            }
            match &s.source {
                SecretSource::HostEnv(var) if !is_identifier(var) => {
                    return Err(unsupported(
                        OP,
                        name,
                        format!(
                            "secret {}: `{var}` is not a valid environment variable name",
                            s.guest_env
                        ),
                    ));
                }
                SecretSource::HostFile(p) if !p.is_absolute() => {
                    return Err(unsupported(
                        OP,
                        name,
                        format!(
                            "secret {}: the file path {} must be absolute",
                            s.guest_env,
                            p.display()
                        ),
                    ));
                }
                _ => {}
            }
        }
        if let Some(k) = spec.env.keys().find(|k| !valid_env_name(k)) {
            return Err(unsupported(
                OP,
                name,
                format!("environment variable name `{k}` is not valid"),
            ));
        }

        let network = spec.egress.is_some();
        let record = MachineRecord {
            name: name.to_owned(),
            labels: spec.labels.clone(),
            image: spec.image.clone(),
            rootfs: rootfs.clone(),
            cpus: spec.cpus,
            memory_mib: spec.memory_mib,
            env: spec.env.clone(),
            volumes: spec.volumes.clone(),
            egress: spec.egress.clone(),
            network,
            secrets: spec.secrets.clone(),
            gate_port: spec.gate_port,
            created_at: now_unix(),
            state: MachineState::Created,
            init: None,
        };

        // Build everything in a staging directory, then rename it into
        // place: a machine appears whole or not at all, and of two
        // concurrent creates of one name exactly one wins.
        let staging = self
            .state_dir
            .join(format!(".staging-{name}-{:016x}", fastrand::u64(..)));
        let build = || -> io::Result<()> {
            seed::make_dir(&staging, 0o700)?;
            let sys_root = rootfs.clone().unwrap_or_else(|| PathBuf::from("/"));
            seed::seed_root(
                &staging.join("root"),
                &seed::SeedSource {
                    sys_root: &sys_root,
                    host: rootfs.is_none(),
                },
                names::hostname_for(name),
                network,
            )?;
            File::create(staging.join("lock"))?;
            write_json_atomic(&staging, "machine.json", &record)
        };
        if let Err(source) = build() {
            let _ = fs::remove_dir_all(&staging);
            return Err(io_err(
                OP,
                name,
                "build the machine's root".to_owned(),
                source,
            ));
        }
        match rustix::fs::renameat_with(
            rustix::fs::CWD,
            &staging,
            rustix::fs::CWD,
            &dir,
            rustix::fs::RenameFlags::NOREPLACE,
        ) {
            Ok(()) => Ok(()),
            Err(e) => {
                let _ = fs::remove_dir_all(&staging);
                if e == rustix::io::Errno::EXIST || e == rustix::io::Errno::NOTEMPTY {
                    Err(RuntimeError::new(OP, name, RuntimeErrorKind::AlreadyExists))
                } else {
                    Err(io_err(
                        OP,
                        name,
                        format!("move the machine to {}", dir.display()),
                        e.into(),
                    ))
                }
            }
        }
    }

    fn start(&self, name: &str) -> Result<(), RuntimeError> {
        const OP: &str = "start";
        let (_lock, record) = self.lock(OP, name)?;
        let mut record = record.probed();
        if record.state == MachineState::Running {
            return Ok(());
        }
        // Like smolvm, secrets are read on the host at each launch.
        let secrets = record
            .secrets
            .iter()
            .map(|s| Ok((sandbox::secret_var(&s.guest_env), resolve_secret(s)?)))
            .collect::<Result<Vec<_>, String>>()
            .map_err(|m| unsupported(OP, name, m))?;
        let dir = self.machine_dir(name);
        let sys_root = Self::sys_root(&record);
        let volumes: Vec<(PathBuf, String, bool)> = record
            .volumes
            .iter()
            .map(|v| (v.host.clone(), v.guest.clone(), v.read_only))
            .collect();
        let root = dir.join("root");
        let log = dir.join("init.log");
        let spec = sandbox::LaunchSpec {
            bwrap: &self.bwrap,
            setsid: &self.setsid,
            root: &root,
            sys_root: &sys_root,
            hostname: names::hostname_for(name),
            network: record.network,
            volumes: &volumes,
            log: &log,
            timeout: START_TIMEOUT,
            secrets: &secrets,
        };
        let init = sandbox::launch(&spec).map_err(|e| match e {
            sandbox::LaunchError::Spawn(source) => RuntimeError::new(
                OP,
                name,
                RuntimeErrorKind::Spawn {
                    command: self.setsid.display().to_string(),
                    source,
                },
            ),
            sandbox::LaunchError::Failed(stderr) => RuntimeError::new(
                OP,
                name,
                RuntimeErrorKind::CommandFailed {
                    command: "bwrap".to_owned(),
                    status: 1,
                    stderr,
                },
            ),
            sandbox::LaunchError::Volume(message) => unsupported(OP, name, message),
            sandbox::LaunchError::Timeout => RuntimeError::new(
                OP,
                name,
                RuntimeErrorKind::Timeout {
                    command: "bwrap".to_owned(),
                    timeout: START_TIMEOUT,
                },
            ),
            sandbox::LaunchError::Io(source) => {
                io_err(OP, name, "start the sandbox".to_owned(), source)
            }
        })?;
        if let Some(port) = record.gate_port.filter(|_| !record.network)
            && let Err(message) = self.start_relay(&init, port)
        {
            let _ = sandbox::kill(&init, STOP_TIMEOUT);
            return Err(unsupported(OP, name, message));
        }
        record.state = MachineState::Running;
        record.init = Some(init.clone());
        if let Err(e) = self.save(OP, &record) {
            let _ = sandbox::kill(&init, STOP_TIMEOUT);
            return Err(e);
        }
        Ok(())
    }

    fn stop(&self, name: &str) -> Result<(), RuntimeError> {
        const OP: &str = "stop";
        let (_lock, record) = self.lock(OP, name)?;
        kill_init(OP, name, &record)?;
        if record.state == MachineState::Running || record.init.is_some() {
            let record = MachineRecord {
                state: MachineState::Stopped,
                init: None,
                ..record
            };
            self.save(OP, &record)?;
        }
        Ok(())
    }

    /// Like smolvm, only on a machine that is not running. CPU and memory
    /// are recorded, not enforced; environment and volumes apply from the
    /// next start (the environment from the next exec, in fact).
    fn update(&self, name: &str, update: &MachineUpdate) -> Result<(), RuntimeError> {
        const OP: &str = "update";
        let (_lock, record) = self.lock(OP, name)?;
        let mut record = record.probed();
        if record.state == MachineState::Running {
            return Err(unsupported(
                OP,
                name,
                "invalid vm state: expected stopped, got running; stop the machine first"
                    .to_owned(),
            ));
        }
        Self::check_volumes(OP, name, &update.add_volumes)?;
        if let Some(k) = update.set_env.keys().find(|k| !valid_env_name(k)) {
            return Err(unsupported(
                OP,
                name,
                format!("environment variable name `{k}` is not valid"),
            ));
        }
        if let Some(cpus) = update.cpus {
            record.cpus = cpus;
        }
        if let Some(mem) = update.memory_mib {
            record.memory_mib = mem;
        }
        for k in &update.remove_env {
            record.env.remove(k);
        }
        for (k, v) in &update.set_env {
            record.env.insert(k.clone(), v.clone());
        }
        // Volumes are matched on host and guest paths, as smolvm's
        // `--remove-volume HOST:GUEST`.
        record.volumes.retain(|v| {
            !update
                .remove_volumes
                .iter()
                .any(|r| r.host == v.host && r.guest == v.guest)
        });
        for add in &update.add_volumes {
            record.volumes.retain(|v| v.guest != add.guest);
            record.volumes.push(add.clone());
        }
        self.save(OP, &record)
    }

    fn delete(&self, name: &str) -> Result<(), RuntimeError> {
        const OP: &str = "delete";
        let (lock, record) = self.lock(OP, name)?;
        kill_init(OP, name, &record)?;
        // Move the directory out of the way first, so the machine is gone
        // at once even if removing a large root takes a while.
        let dir = self.machine_dir(name);
        let trash = self
            .state_dir
            .join(format!(".trash-{name}-{:016x}", fastrand::u64(..)));
        fs::rename(&dir, &trash)
            .map_err(|source| io_err(OP, name, format!("remove {}", dir.display()), source))?;
        drop(lock);
        // remove_dir_all does not follow the guest's symlinks.
        fs::remove_dir_all(&trash)
            .map_err(|source| io_err(OP, name, format!("remove {}", trash.display()), source))
    }

    fn exec(&self, name: &str, request: &ExecRequest) -> Result<ExecOutput, RuntimeError> {
        self.run("exec", name, request, None)
    }

    fn copy_in(
        &self,
        name: &str,
        host_path: &Path,
        guest_path: &str,
        options: &CopyOptions,
    ) -> Result<(), RuntimeError> {
        const OP: &str = "copy";
        let guest = Path::new(guest_path);
        if !guest.is_absolute() || guest_path.ends_with('/') || guest.file_name().is_none() {
            return Err(unsupported(
                OP,
                name,
                format!("guest path `{guest_path}` must be an absolute path to a file"),
            ));
        }
        let content = fs::read(host_path)
            .map_err(|source| io_err(OP, name, format!("read {}", host_path.display()), source))?;
        // Everything happens inside the guest, so the guest's symlinks
        // resolve in the guest and never reach the host. The file is
        // written under a temporary name next to its destination and
        // renamed into place.
        let script = r#"set -e
dst=$1 mode=$2 owner=$3
parent=${dst%/*}
[ -n "$parent" ] || parent=/
umask 022
mkdir -p -- "$parent"
umask 077
tmp=$(mktemp -- "$parent/.bottle-copy.XXXXXX")
trap 'rm -f -- "$tmp"' EXIT
cat > "$tmp"
chown -- "$owner" "$tmp"
chmod -- "$mode" "$tmp"
mv -f -T -- "$tmp" "$dst"
trap - EXIT
"#;
        let request = ExecRequest::new([
            "/bin/sh".to_owned(),
            "-c".to_owned(),
            script.to_owned(),
            "bottle-copy".to_owned(),
            guest_path.to_owned(),
            format!("{:o}", options.mode & 0o7777),
            format!("{}:{}", options.uid, options.gid),
        ]);
        let out = self.run(OP, name, &request, Some(content))?;
        if !out.success() {
            return Err(RuntimeError::new(
                OP,
                name,
                RuntimeErrorKind::CommandFailed {
                    command: format!("copy {} to {guest_path}", host_path.display()),
                    status: out.status,
                    stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                },
            ));
        }
        Ok(())
    }

    fn read_file(&self, name: &str, guest_path: &str) -> Result<Vec<u8>, RuntimeError> {
        const OP: &str = "read";
        if !guest_path.starts_with('/') {
            return Err(unsupported(
                OP,
                name,
                format!("guest path `{guest_path}` must be absolute"),
            ));
        }
        let (_, target) = self.target(OP, name)?;
        // Resolved inside the guest's root (openat2 RESOLVE_IN_ROOT): a
        // guest symlink cannot point this read at a host file.
        target
            .read_guest_file(guest_path, MAX_READ_FILE)
            .map_err(|e| {
                RuntimeError::new(
                    OP,
                    name,
                    RuntimeErrorKind::CommandFailed {
                        command: format!("read {guest_path}"),
                        status: 1,
                        stderr: e.to_string(),
                    },
                )
            })
    }

    fn interactive_argv(&self, name: &str, request: &ExecRequest) -> Vec<String> {
        let (record, target) = match self.target("attach", name) {
            Ok(t) => t,
            Err(e) => return exec::failing_argv(&e.to_string()),
        };
        let user_name = request.user.as_deref().unwrap_or("root");
        let Some(user) = target.lookup_user(user_name) else {
            return exec::failing_argv(&format!(
                "user `{user_name}` does not exist in machine {name}"
            ));
        };
        let cwd = request.workdir.clone().unwrap_or_else(|| {
            if target.guest_dir_exists(&user.home) {
                user.home.clone()
            } else {
                "/".to_owned()
            }
        });
        let mut env: BTreeMap<String, String> = exec::base_env(&user)
            .into_iter()
            .map(|(k, v)| {
                (
                    k.to_string_lossy().into_owned(),
                    v.to_string_lossy().into_owned(),
                )
            })
            .collect();
        if let Ok(term) = std::env::var("TERM") {
            env.insert("TERM".to_owned(), term);
        }
        env.extend(record.env.clone());
        // Secrets are set after env, so a request variable of the same
        // name must not be on the argv either: drop it.
        let secret_names: Vec<&str> = record
            .secrets
            .iter()
            .map(|s| s.guest_env.as_str())
            .collect();
        env.extend(
            request
                .env
                .iter()
                .filter(|(k, _)| !secret_names.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        for s in &secret_names {
            env.remove(*s);
        }
        if secret_names.len() > exec::MAX_INTERACTIVE_SECRETS {
            return exec::failing_argv(&format!(
                "machine {name} has {} secrets; an interactive session carries at most {}",
                secret_names.len(),
                exec::MAX_INTERACTIVE_SECRETS
            ));
        }
        let Some(init) = record.init.as_ref() else {
            return exec::failing_argv(&format!("machine {name} is not running"));
        };
        exec::interactive_argv(
            &self.nsenter.to_string_lossy(),
            init,
            &user,
            &cwd,
            &env,
            &secret_names,
            &request.argv,
        )
    }
}
