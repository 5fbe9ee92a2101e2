//! The runtime interface under the reconciler, and its implementations.
//!
//! - [`smolvm`]: the production driver, running the real `smolvm` CLI.
//! - [`local`]: bubblewrap sandboxes with a persistent root per machine, for
//!   Linux machines without KVM and for CI.
//!
//! The interface is deliberately small and blocking: the reconciler runs
//! actions on a bounded pool of threads, and every call has a timeout.

pub mod local;
pub mod smolvm;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use miette::Diagnostic;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// What a runtime can do to machines.
pub trait Runtime: Send + Sync {
    /// `smolvm` or `local`, for messages.
    fn kind(&self) -> RuntimeKind;

    /// Every machine the runtime knows, managed by bottle or not, sorted by
    /// name.
    fn list(&self) -> Result<Vec<MachineInfo>, RuntimeError>;

    /// Create a machine (state `created`; not started).
    fn create(&self, spec: &MachineSpec) -> Result<(), RuntimeError>;

    fn start(&self, name: &str) -> Result<(), RuntimeError>;

    /// Stop a machine; stopping one that is not running succeeds.
    fn stop(&self, name: &str) -> Result<(), RuntimeError>;

    /// Change settings of a `created` or `stopped` machine; effective at the
    /// next start.
    fn update(&self, name: &str, update: &MachineUpdate) -> Result<(), RuntimeError>;

    /// Delete a machine and its disk, stopping it first if needed.
    fn delete(&self, name: &str) -> Result<(), RuntimeError>;

    /// Run a command in a running machine. A non-zero exit status is not an
    /// error here: it is in [`ExecOutput::status`].
    fn exec(&self, name: &str, request: &ExecRequest) -> Result<ExecOutput, RuntimeError>;

    /// Copy one host file into a running machine, creating missing parent
    /// directories. The file appears atomically.
    fn copy_in(
        &self,
        name: &str,
        host_path: &Path,
        guest_path: &str,
        options: &CopyOptions,
    ) -> Result<(), RuntimeError>;

    /// Read one file from a running machine.
    fn read_file(&self, name: &str, guest_path: &str) -> Result<Vec<u8>, RuntimeError>;

    /// The argv that runs `request` interactively (terminal attached) in the
    /// machine, for `bottle attach`.
    fn interactive_argv(&self, name: &str, request: &ExecRequest) -> Vec<String>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    Smolvm,
    Local,
}

impl std::fmt::Display for RuntimeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RuntimeKind::Smolvm => "smolvm",
            RuntimeKind::Local => "local",
        })
    }
}

/// A machine's state as the runtime reports it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MachineState {
    Created,
    Running,
    Stopped,
    Failed,
    /// The VMM is alive but the guest agent does not answer; `start`
    /// recovers it.
    Unreachable,
    /// A fork base; bottle never touches it.
    Frozen,
    /// A state this version of bottle does not know, kept verbatim.
    #[serde(untagged)]
    Other(String),
}

impl MachineState {
    pub fn as_str(&self) -> &str {
        match self {
            MachineState::Created => "created",
            MachineState::Running => "running",
            MachineState::Stopped => "stopped",
            MachineState::Failed => "failed",
            MachineState::Unreachable => "unreachable",
            MachineState::Frozen => "frozen",
            MachineState::Other(s) => s,
        }
    }
}

impl std::fmt::Display for MachineState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One machine as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineInfo {
    pub name: String,
    pub state: MachineState,
    pub cpus: Option<u32>,
    pub memory_mib: Option<u32>,
    /// The image as the runtime reports it (`local-dir:/abs/path` for a
    /// rootfs directory on smolvm).
    pub image: Option<String>,
    pub network: bool,
    pub labels: BTreeMap<String, String>,
}

/// Everything needed to create a machine.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MachineSpec {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// `--image`; `None` means the runtime's default (the host's system
    /// directories on the local runtime).
    pub image: Option<String>,
    pub cpus: u32,
    pub memory_mib: u32,
    pub env: BTreeMap<String, String>,
    pub volumes: Vec<VolumeMount>,
    /// `None`: no network at all.
    pub egress: Option<Egress>,
    /// Local runtime only: the user accepted the host's network, unfiltered,
    /// for a bottle that declares egress.
    pub allow_unfiltered_network: bool,
    /// Secrets by reference; values are resolved by the runtime at launch
    /// and never pass through bottle's argv.
    pub secrets: Vec<SecretMount>,
    /// The host-loopback port of the bottle's gate, which the guest must
    /// reach. smolvm: the reconciler puts the gateway address in `egress`
    /// (`--allow-cidr 100.96.0.1/32`), and smolvm relays it to the host.
    /// Local runtime: the guest gets a network of its own with loopback
    /// only, where `127.0.0.1:<port>` leads to the gate and nothing else.
    pub gate_port: Option<u16>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Egress {
    pub allow_hosts: Vec<String>,
    pub allow_cidrs: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct VolumeMount {
    pub host: PathBuf,
    pub guest: String,
    pub read_only: bool,
}

impl VolumeMount {
    /// `HOST:GUEST[:ro]`, as smolvm's `-v` takes it.
    pub fn to_arg(&self) -> String {
        let ro = if self.read_only { ":ro" } else { "" };
        format!("{}:{}{ro}", self.host.display(), self.guest)
    }
}

/// A secret exposed to the guest as the environment variable `guest_env`.
///
/// Serialized (in the local runtime's `machine.json`) flat, by reference
/// only: `{"guest_env": "X", "host_env": "VAR"}` or `"host_file": "/path"`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SecretMount {
    pub guest_env: String,
    #[serde(flatten)]
    pub source: SecretSource,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecretSource {
    /// A host environment variable name (`--secret-env GUEST=HOSTVAR`).
    HostEnv(String),
    /// An absolute host file path (`--secret-file GUEST=/abs/path`).
    HostFile(PathBuf),
}

/// Settings changed in place on a stopped machine.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MachineUpdate {
    pub cpus: Option<u32>,
    pub memory_mib: Option<u32>,
    pub set_env: BTreeMap<String, String>,
    pub remove_env: Vec<String>,
    pub add_volumes: Vec<VolumeMount>,
    pub remove_volumes: Vec<VolumeMount>,
}

impl MachineUpdate {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// A command to run in a machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub workdir: Option<String>,
    /// Run as this guest user instead of root.
    pub user: Option<String>,
    pub timeout: Duration,
}

impl ExecRequest {
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

    pub fn new<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            argv: argv.into_iter().map(Into::into).collect(),
            env: BTreeMap::new(),
            workdir: None,
            user: None,
            timeout: Self::DEFAULT_TIMEOUT,
        }
    }

    /// `sh -c SCRIPT` as root.
    pub fn shell(script: impl Into<String>) -> Self {
        Self::new(["sh".to_owned(), "-c".to_owned(), script.into()])
    }

    pub fn as_user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

/// The most output (stdout and stderr together) bottle keeps of one
/// `exec`: every script it runs bounds what it prints far below this, so
/// more is a guest flooding its output; the command is killed and the
/// call fails ([`RuntimeErrorKind::OutputTooLarge`]) before it costs
/// bottle's memory.
pub const MAX_EXEC_OUTPUT: usize = 64 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub status: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl ExecOutput {
    pub fn success(&self) -> bool {
        self.status == 0
    }
}

/// Owner and mode of a copied file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyOptions {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

impl Default for CopyOptions {
    fn default() -> Self {
        Self {
            mode: 0o644,
            uid: 0,
            gid: 0,
        }
    }
}

/// A runtime operation that failed: which machine, which operation, why.
///
/// The message already carries the reason, so the kind is not chained as a
/// source (it would print twice); its code and help are the diagnostic's.
#[derive(Debug, Error)]
#[error("{op}{}: {kind}", if machine == "-" { String::new() } else { format!(" {machine}") })]
pub struct RuntimeError {
    /// The machine, or `-` for operations on none (`list`).
    pub machine: String,
    /// `create`, `start`, `exec`, ...
    pub op: &'static str,
    pub kind: RuntimeErrorKind,
}

impl Diagnostic for RuntimeError {
    fn code<'a>(&'a self) -> Option<Box<dyn std::fmt::Display + 'a>> {
        self.kind.code()
    }

    fn help<'a>(&'a self) -> Option<Box<dyn std::fmt::Display + 'a>> {
        match self.kind {
            RuntimeErrorKind::AlreadyExists => Some(Box::new(already_exists_help(&self.machine))),
            _ => self.kind.help(),
        }
    }
}

/// smolvm says "already exists or is being created": most often it is this
/// project's own machine, still being created by a bottle run that was
/// killed (its `create` goes on without it).
fn already_exists_help(machine: &str) -> String {
    format!(
        "an interrupted bottle run may still be creating it: wait a moment and run `bottle apply` \
         again. Only if `smolvm machine ls` shows {machine} without bottle's labels \
         (bottle.managed-by) is it someone else's: then rename the agent or the project, or delete that machine \
         with `smolvm machine delete --name {machine} -f` if it is unused"
    )
}

impl RuntimeError {
    pub fn new(op: &'static str, machine: impl Into<String>, kind: RuntimeErrorKind) -> Self {
        Self {
            machine: machine.into(),
            op,
            kind,
        }
    }
}

#[derive(Debug, Error, Diagnostic)]
pub enum RuntimeErrorKind {
    #[error("no such machine")]
    #[diagnostic(help("run `bottle status` to see the machines bottle manages"))]
    NotFound,

    #[error("machine is not running")]
    #[diagnostic(help("run `bottle apply` to start it"))]
    NotRunning,

    #[error("a machine with this name already exists")]
    #[diagnostic(help("{}", already_exists_help("NAME")))]
    AlreadyExists,

    #[error("`{command}` did not finish within {}s", timeout.as_secs())]
    #[diagnostic(help("the runtime is not answering; check it with `smolvm machine ls --json`"))]
    Timeout { command: String, timeout: Duration },

    /// A second Ctrl-C ended the call: its process group was killed.
    #[error("`{command}` was cancelled (Ctrl-C) and killed")]
    #[diagnostic(help("{note}run `bottle apply` again to finish; what completed is kept"))]
    Cancelled {
        command: String,
        /// What the kill did not reach (smolvm: the command in the guest).
        note: &'static str,
    },

    #[error("exited with status {status}: {stderr} (command: `{command}`)")]
    #[diagnostic(help("the runtime refused the call; its message above says why"))]
    CommandFailed {
        command: String,
        status: i32,
        stderr: String,
    },

    /// The runtime refused the command line itself (smolvm: clap, exit 2):
    /// bottle built an argv this version does not take.
    #[error("refused its command line: {stderr} (command: `{command}`)")]
    #[diagnostic(help(
        "bottle built a command this smolvm does not accept: check `smolvm --version` against \
         the versions bottle supports (README, smolvm section), and report it if yours is one"
    ))]
    Usage { command: String, stderr: String },

    /// smolvm's state database stayed locked by other writers through every
    /// retry.
    #[error(
        "smolvm's state database stayed locked through {attempts} tries: {stderr} (command: `{command}`)"
    )]
    #[diagnostic(help(
        "something else keeps writing to smolvm's state (another smolvm client, not bottle: \
         bottle's own calls take turns); wait for it and run the command again"
    ))]
    DatabaseLocked {
        command: String,
        attempts: u32,
        stderr: String,
    },

    #[error("smolvm {found} is too old: bottle needs {minimum} or later (`{binary} --version`)")]
    #[diagnostic(
        code("bottle::smolvm::too-old"),
        help(
            "upgrade smolvm (https://github.com/smol-machines/smolvm), or point `--smolvm` / \
             BOTTLE_SMOLVM at a newer one; bottle needs machine labels (smolvm 1.8)"
        )
    )]
    UnsupportedVersion {
        binary: String,
        found: String,
        minimum: String,
    },

    /// `machine exec` runs as the image's `USER`, not as root, and this
    /// smolvm cannot be told otherwise.
    #[error(
        "commands run in this machine as uid {uid} ({user}), not as root: smolvm {version} runs \
         `machine exec` as the image's USER and cannot choose another before 1.14"
    )]
    #[diagnostic(
        code("bottle::smolvm::exec-not-root"),
        help(
            "use an image whose USER is root (add `USER root` at the end of its Dockerfile: \
             bottle creates the agent user itself and runs the agent as it), or upgrade smolvm \
             to 1.14 or later (`exec --user`)"
        )
    )]
    ExecNotRoot {
        uid: String,
        user: String,
        version: String,
    },

    #[error("`{command}` printed more than {} MiB; it was stopped", limit >> 20)]
    #[diagnostic(help(
        "bottle's commands print little: something in the guest floods their output; \
         look at the guest (`smolvm machine exec`)"
    ))]
    OutputTooLarge { command: String, limit: usize },

    #[error("could not run `{command}`: {source}")]
    #[diagnostic(help("check that the runtime is installed and on PATH (or pass --smolvm PATH)"))]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },

    #[error("unexpected output from `{command}`: {detail}")]
    #[diagnostic(help("this version of the runtime may not be supported; please report it"))]
    Malformed { command: String, detail: String },

    /// The message says what to do instead.
    #[error("{0}")]
    Unsupported(String),

    #[error("{context}: {source}")]
    #[diagnostic(help("check the permissions and free space of the directory named above"))]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}
