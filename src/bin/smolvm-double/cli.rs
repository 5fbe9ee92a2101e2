//! smolvm's command line, for the subset bottle uses: the same subcommands,
//! flag names, short forms, value types and defaults as smolvm's clap
//! definitions (`src/cli/machine.rs`), so clap rejects exactly what smolvm
//! rejects (exit 2, `error: unexpected argument '--label' found`). Flags of
//! smolvm outside that subset (ports, GPUs, forks, smolfiles...) are not
//! declared, so the double rejects them rather than pretend to honour them.

use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::parse;

/// smolvm's defaults (`src/data/resources.rs`).
pub const DEFAULT_CPUS: u8 = 4;
pub const DEFAULT_MEMORY_MIB: u32 = 8192;

#[derive(Parser, Debug)]
#[command(name = "smolvm", bin_name = "smolvm", version = "1.9.2-double")]
#[command(about = "A test double of smolvm, backed by bottle's local runtime")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per process: the size of a variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Manage machines
    #[command(subcommand)]
    Machine(MachineCmd),
    /// Internal: the relay from a gated machine's gateway to the host's
    /// loopback (started by the local runtime, with its socket on fd 3;
    /// the same arguments as `bottle local-gate-relay`).
    #[command(hide = true)]
    LocalGateRelay(RelayCmd),
}

#[derive(Args, Debug)]
pub struct RelayCmd {
    #[arg(long)]
    pub port: u16,
    #[arg(long)]
    pub init_pid: u32,
    #[arg(long)]
    pub init_start: u64,
}

/// Manage machines
#[derive(Subcommand, Debug)]
pub enum MachineCmd {
    /// Run a command directly in the VM (not in a container)
    Exec(ExecCmd),
    /// Create a new named machine configuration
    Create(CreateCmd),
    /// Start a machine
    Start(StartCmd),
    /// Stop a running machine
    Stop(StopCmd),
    /// Delete a machine configuration
    #[command(visible_alias = "rm")]
    Delete(DeleteCmd),
    /// Show machine status
    Status(StatusCmd),
    /// List all machines
    #[command(visible_alias = "list")]
    Ls(LsCmd),
    /// Modify settings on a stopped machine (mounts, ports, resources, disks)
    Update(UpdateCmd),
    /// Copy files between host and machine
    Cp(CpCmd),
}

impl MachineCmd {
    /// The verb as the call log and the knobs name it (aliases resolved).
    pub fn verb(&self) -> &'static str {
        match self {
            MachineCmd::Exec(_) => "exec",
            MachineCmd::Create(_) => "create",
            MachineCmd::Start(_) => "start",
            MachineCmd::Stop(_) => "stop",
            MachineCmd::Delete(_) => "delete",
            MachineCmd::Status(_) => "status",
            MachineCmd::Ls(_) => "ls",
            MachineCmd::Update(_) => "update",
            MachineCmd::Cp(_) => "cp",
        }
    }
}

/// Execute a command directly in the VM's rootfs.
#[derive(Args, Debug)]
pub struct ExecCmd {
    /// Command and arguments to execute
    #[arg(trailing_var_arg = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,

    /// Target machine (default: "default"). Long form only: exec has no -n.
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,

    /// Set working directory in the VM
    #[arg(short = 'w', long, value_name = "DIR")]
    pub workdir: Option<String>,

    /// Set environment variable (can be used multiple times)
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,

    /// Inject a secret from a host env var (GUEST_VAR=HOST_VAR) for this exec
    #[arg(long = "secret-env", value_name = "GUEST_VAR=HOST_VAR")]
    pub secret_env: Vec<String>,

    /// Inject a secret from a host file (GUEST_VAR=/abs/path) for this exec
    #[arg(long = "secret-file", value_name = "GUEST_VAR=PATH")]
    pub secret_file: Vec<String>,

    /// Kill command after duration (e.g., "30s", "5m")
    #[arg(long, value_parser = parse::duration, value_name = "DURATION")]
    pub timeout: Option<Duration>,

    /// Keep stdin open for interactive input
    #[arg(short = 'i', long)]
    pub interactive: bool,

    /// Allocate a pseudo-TTY (use with -i for shells)
    #[arg(short = 't', long)]
    pub tty: bool,

    /// Stream output in real-time (prints as it arrives)
    #[arg(long)]
    pub stream: bool,

    /// Detach: spawn the command in the background and return its PID
    #[arg(short = 'd', long, conflicts_with_all = ["interactive", "tty", "stream"])]
    pub detach: bool,
}

/// Create a named machine configuration.
#[derive(Args, Debug)]
pub struct CreateCmd {
    /// Name for the machine (auto-generated if omitted)
    #[arg(short = 'n', long, value_name = "NAME")]
    pub name: Option<String>,

    /// Attach metadata to the machine (repeatable)
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,

    /// Container image: a registry reference, a `docker save` archive, or an
    /// unpacked rootfs directory
    #[arg(short = 'I', long, value_name = "IMAGE")]
    pub image: Option<String>,

    /// Number of virtual CPUs
    #[arg(long, default_value_t = DEFAULT_CPUS, value_name = "N")]
    pub cpus: u8,

    /// Memory allocation in MiB
    #[arg(long, default_value_t = DEFAULT_MEMORY_MIB, value_name = "MiB")]
    pub mem: u32,

    /// Storage disk size in GiB (for OCI layers and container data)
    #[arg(long, value_name = "GiB")]
    pub storage: Option<u64>,

    /// Overlay disk size in GiB (for persistent rootfs changes)
    #[arg(long, value_name = "GiB")]
    pub overlay: Option<u64>,

    /// Mount host directory (can be used multiple times)
    #[arg(short = 'v', long = "volume", value_name = "HOST:GUEST[:ro]")]
    pub volume: Vec<String>,

    /// Enable outbound network access
    #[arg(long)]
    pub net: bool,

    /// Allow egress to specific CIDR range (can be used multiple times, implies --net)
    #[arg(long = "allow-cidr", value_parser = parse::cidr, value_name = "CIDR")]
    pub allow_cidr: Vec<String>,

    /// Allow egress to specific hostname, resolved at VM start (can be used multiple times, implies --net)
    #[arg(long = "allow-host", value_name = "HOSTNAME")]
    pub allow_host: Vec<String>,

    /// Restrict outbound to localhost only (implies --net)
    #[arg(long)]
    pub outbound_localhost_only: bool,

    /// Run command on every VM start (can be used multiple times)
    #[arg(long = "init", value_name = "COMMAND")]
    pub init: Vec<String>,

    /// Set environment variable (can be used multiple times)
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,

    /// Set working directory inside the machine
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    pub workdir: Option<String>,

    /// Inject a secret from a host env var (GUEST_VAR=HOST_VAR), resolved at
    /// each launch. Only the reference is persisted, never the value.
    #[arg(long = "secret-env", value_name = "GUEST_VAR=HOST_VAR")]
    pub secret_env: Vec<String>,

    /// Inject a secret from a host file (GUEST_VAR=/abs/path), resolved at
    /// each launch. Only the reference is persisted, never the value.
    #[arg(long = "secret-file", value_name = "GUEST_VAR=PATH")]
    pub secret_file: Vec<String>,

    /// Command to run as the machine's persistent workload. Requires `--`,
    /// so a bare positional name is rejected.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// Start a machine.
#[derive(Args, Debug)]
pub struct StartCmd {
    /// Machine to start (default: "default")
    #[arg(short = 'n', long, value_name = "NAME")]
    pub name: Option<String>,
}

/// Stop a running machine.
#[derive(Args, Debug)]
pub struct StopCmd {
    /// Machine to stop (default: "default")
    #[arg(short = 'n', long, value_name = "NAME")]
    pub name: Option<String>,
}

/// Delete a machine configuration.
#[derive(Args, Debug)]
pub struct DeleteCmd {
    /// Machine to delete
    #[arg(short = 'n', long, value_name = "NAME")]
    pub name: String,

    /// Skip confirmation prompt
    #[arg(short, long)]
    pub force: bool,
}

/// Show machine status.
#[derive(Args, Debug)]
pub struct StatusCmd {
    /// Machine to check (default: "default")
    #[arg(short = 'n', long, value_name = "NAME")]
    pub name: Option<String>,

    /// Output in JSON format
    #[arg(long)]
    pub json: bool,
}

/// List all machines.
#[derive(Args, Debug)]
pub struct LsCmd {
    /// Show detailed configuration (mounts, ports, PID)
    #[arg(short, long)]
    pub verbose: bool,

    /// Output in JSON format
    #[arg(long)]
    pub json: bool,
}

/// Modify settings on a stopped machine.
#[derive(Args, Debug)]
pub struct UpdateCmd {
    /// Machine to update
    #[arg(short = 'n', long, value_name = "NAME")]
    pub name: String,

    /// Add volume mount (`HOST:GUEST[:ro]`)
    #[arg(short = 'v', long = "volume", value_name = "HOST:GUEST[:ro]")]
    pub volume: Vec<String>,

    /// Remove volume mount (HOST:GUEST)
    #[arg(long, value_name = "HOST:GUEST")]
    pub remove_volume: Vec<String>,

    /// Set vCPU count
    #[arg(long, value_name = "N")]
    pub cpus: Option<u8>,

    /// Set memory in MiB
    #[arg(long, value_name = "MiB")]
    pub mem: Option<u32>,

    /// Enable outbound network access
    #[arg(long)]
    pub net: bool,

    /// Disable outbound network access
    #[arg(long, conflicts_with = "net")]
    pub no_net: bool,

    /// Add/replace environment variable (KEY=VALUE)
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,

    /// Remove environment variable by key
    #[arg(long, value_name = "KEY")]
    pub remove_env: Vec<String>,

    /// Set working directory
    #[arg(short = 'w', long, value_name = "DIR")]
    pub workdir: Option<String>,

    /// Storage disk size in GiB (expand only)
    #[arg(long, value_name = "GiB")]
    pub storage: Option<u64>,

    /// Overlay disk size in GiB (expand only)
    #[arg(long, value_name = "GiB")]
    pub overlay: Option<u64>,
}

/// Copy files between host and a running machine.
#[derive(Args, Debug)]
pub struct CpCmd {
    /// Source path (local file or machine:path)
    #[arg(value_name = "SRC")]
    pub src: String,

    /// Destination path (local file or machine:path)
    #[arg(value_name = "DST")]
    pub dst: String,

    /// Set the file's mode on upload (octal, e.g. 644)
    #[arg(long, value_name = "OCTAL")]
    pub mode: Option<String>,

    /// Set the file's owner uid on upload (default: root)
    #[arg(long, value_name = "UID")]
    pub uid: Option<u32>,

    /// Set the file's owner gid on upload (default: root)
    #[arg(long, value_name = "GID")]
    pub gid: Option<u32>,
}

/// `NAME`, or smolvm's `default` machine.
pub fn machine_name(name: &Option<String>) -> &str {
    name.as_deref().unwrap_or("default")
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("smolvm").chain(args.iter().copied()))
    }

    #[test]
    fn the_definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn rejections_smolvm_makes() {
        for args in [
            &["machine", "update", "--name", "a", "--label", "k=v"][..],
            &["machine", "create", "myvm"],
            &["machine", "exec", "-n", "a", "--", "true"],
            &["machine", "create", "--name", "a", "--cpus", "300"],
            &[
                "machine",
                "create",
                "--name",
                "a",
                "--allow-cidr",
                "nonsense",
            ],
            &["machine", "delete"],
            &["machine", "exec", "--name", "a"],
            &[
                "machine",
                "exec",
                "--name",
                "a",
                "--timeout",
                "soon",
                "--",
                "true",
            ],
        ] {
            let error = parse(args).unwrap_err();
            assert_eq!(error.exit_code(), 2, "{args:?}");
        }
        let error = parse(&["machine", "update", "--name", "a", "--label", "k=v"]).unwrap_err();
        let text = error.render().to_string();
        assert!(
            text.starts_with("error: unexpected argument '--label' found"),
            "{text}"
        );
        assert!(text.contains("Usage: smolvm machine update"), "{text}");
    }

    #[test]
    fn forms_bottle_uses() {
        let cli = parse(&[
            "machine",
            "create",
            "--name",
            "a",
            "--label",
            "k=v",
            "--image",
            "/r",
            "--cpus",
            "2",
            "--mem",
            "2048",
            "-v",
            "/h:/g:ro",
            "--allow-host",
            "x.org",
            "--allow-cidr",
            "10.0.0.0/8",
            "-e",
            "A=1",
            "--secret-env",
            "T=H",
            "--secret-file",
            "F=/f",
        ])
        .unwrap();
        let Command::Machine(MachineCmd::Create(create)) = cli.command else {
            panic!()
        };
        assert_eq!((create.cpus, create.mem), (2, 2048));
        let cli = parse(&[
            "machine", "exec", "--name", "a", "-it", "--", "sh", "-c", "x",
        ])
        .unwrap();
        let Command::Machine(MachineCmd::Exec(exec)) = cli.command else {
            panic!()
        };
        assert!(exec.interactive && exec.tty);
        assert_eq!(exec.command, ["sh", "-c", "x"]);
        assert!(parse(&["machine", "rm", "-n", "a", "-f"]).is_ok());
        assert!(parse(&["machine", "list", "--json"]).is_ok());
        assert!(parse(&["machine", "cp", "--mode", "600", "/h", "a:/g"]).is_ok());
    }
}
