//! The `machine` verbs: smolvm's behaviour and messages, over a runtime.
//!
//! Each verb follows smolvm's order of checks (`src/cli/machine.rs`,
//! `src/cli/vm_common.rs`), so a call with two faults fails with the message
//! smolvm would print.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bottle::runtime::{
    CopyOptions, Egress, ExecRequest, MachineInfo, MachineSpec, MachineUpdate, Runtime,
    SecretMount, SecretSource, VolumeMount,
};

use crate::cli::{self, CpCmd, CreateCmd, ExecCmd, LsCmd, MachineCmd, StatusCmd, UpdateCmd};
use crate::failure::Failure;
use crate::gateway;
use crate::home::{Home, Meta, now_secs};
use crate::knobs::Knobs;
use crate::parse::{self, Mount, SecretRef};
use crate::report::{self, Record};

/// `exec` without `--timeout` runs as long as the command does; the local
/// runtime wants a bound, so it gets a day.
const EXEC_WITHOUT_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Where a verb writes and reads: the process's streams, or buffers in tests.
pub struct Io<'a> {
    pub out: &'a mut dyn Write,
    pub err: &'a mut dyn Write,
    pub input: &'a mut dyn BufRead,
}

/// What a verb asks of the process once it has written its output.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    /// `SMOLVM_DOUBLE_EXEC_DIE`: die by SIGKILL, as a crashed smolvm would.
    Killed,
}

pub struct Double<'a> {
    pub home: &'a Home,
    pub runtime: &'a dyn Runtime,
    pub knobs: &'a Knobs,
    /// This call's number among calls of its verb, counted from 1.
    pub call: u64,
}

type Verb = Result<Exit, Failure>;

fn written(result: std::io::Result<()>) -> Verb {
    result
        .map(|()| Exit::Code(0))
        .map_err(|error| Failure::double(format!("writing output: {error}")))
}

/// A machine and its state as the double reports it.
struct Found {
    info: MachineInfo,
    meta: Meta,
    /// The state `ls` prints: forced by a test, or the runtime's.
    state: String,
}

impl Found {
    fn running(&self) -> bool {
        self.state == "running"
    }
}

impl Double<'_> {
    pub fn run(&self, command: MachineCmd, io: &mut Io<'_>) -> Verb {
        match command {
            MachineCmd::Create(cmd) => self.create(cmd, io),
            MachineCmd::Start(cmd) => self.start(cli::machine_name(&cmd.name), io),
            MachineCmd::Stop(cmd) => self.stop(cli::machine_name(&cmd.name), io),
            MachineCmd::Delete(cmd) => self.delete(&cmd.name, cmd.force, io),
            MachineCmd::Status(cmd) => self.status(cmd, io),
            MachineCmd::Ls(cmd) => self.ls(cmd, io),
            MachineCmd::Update(cmd) => self.update(cmd, io),
            MachineCmd::Exec(cmd) => self.exec(cmd, io),
            MachineCmd::Cp(cmd) => self.cp(cmd),
        }
    }

    fn list(&self) -> Result<Vec<MachineInfo>, Failure> {
        self.runtime
            .list()
            .map_err(|error| Failure::backend("list machines", error))
    }

    fn found(
        &self,
        info: MachineInfo,
        forced: &BTreeMap<String, String>,
    ) -> Result<Found, Failure> {
        let meta = self.home.meta(&info.name)?.unwrap_or_default();
        let state = forced
            .get(&info.name)
            .cloned()
            .unwrap_or_else(|| info.state.as_str().to_owned());
        Ok(Found { info, meta, state })
    }

    fn find(&self, name: &str) -> Result<Option<Found>, Failure> {
        match self.list()?.into_iter().find(|info| info.name == name) {
            Some(info) => self.found(info, &self.home.forced_states()).map(Some),
            None => Ok(None),
        }
    }

    /// `status`, `exec`, `cp` and `stop` on a name smolvm does not know fail
    /// after creating the name's data folder.
    fn find_or_leave_folder(&self, name: &str) -> Result<Option<Found>, Failure> {
        let found = self.find(name)?;
        if found.is_none() {
            self.home.touch_data_dir(name);
        }
        Ok(found)
    }

    fn create(&self, cmd: CreateCmd, io: &mut Io<'_>) -> Verb {
        // Egress first: `--allow-host` is resolved before anything else is
        // checked, and a failure to resolve is fatal.
        let mut allowed_cidrs = cmd.allow_cidr.clone();
        for host in &cmd.allow_host {
            let cidrs = self
                .knobs
                .resolve(host)
                .map_err(|reason| Failure::config("--allow-host", reason))?;
            allowed_cidrs.extend(cidrs);
        }
        if cmd.outbound_localhost_only {
            allowed_cidrs.extend(["127.0.0.0/8".to_owned(), "::1/128".to_owned()]);
        }
        let network = cmd.net || !allowed_cidrs.is_empty();
        let gated = gateway::gated(&allowed_cidrs);

        let (image, reported_image) = match &cmd.image {
            Some(image) if Path::new(image).is_dir() => {
                let dir = Path::new(image)
                    .canonicalize()
                    .map_err(|error| Failure::config("--image", format!("'{image}': {error}")))?;
                let reported = format!("local-dir:{}", dir.display());
                (Some(dir.display().to_string()), Some(reported))
            }
            other => (other.clone(), other.clone()),
        };
        let labels = parse::labels(&cmd.labels)?;
        let secret_refs = parse::secrets(&cmd.secret_env, &cmd.secret_file)?;
        if let Some(warning) = parse::vcpu_warning(cmd.cpus.into()) {
            written(writeln!(io.err, "{warning}"))?;
        }
        parse::check_resources(cmd.cpus.into(), cmd.mem)?;
        if !cmd.command.is_empty() {
            return Err(Failure::double(
                "a persistent workload command (`create ... -- COMMAND`) is not supported",
            ));
        }
        let name = cmd.name.clone().unwrap_or_else(generated_name);
        parse::check_name(&name)?;

        let mounts: Vec<Mount> = cmd
            .volume
            .iter()
            .map(|spec| parse::mount(spec))
            .collect::<Result<_, _>>()?;
        if let Some(target) = parse::duplicate_target(&mounts) {
            return Err(Failure::new(format!(
                "mount operation failed: validate mounts: duplicate mount target: {target} is \
                 specified more than once"
            )));
        }
        if let Some(image) = &cmd.image
            && (image.starts_with('/') || image.starts_with('.'))
            && !Path::new(image).exists()
        {
            // A path is a rootfs directory or a `docker save` archive.
            return Err(Failure::config(
                "--image",
                format!("cannot read archive {image}: No such file or directory (os error 2)"),
            ));
        }
        if let Some(image) = &cmd.image
            && !network
            && !Path::new(image).exists()
        {
            return Err(Failure::config(
                "create machine",
                format!(
                    "image '{image}' must be pulled from a registry, but this machine has no \
                     network, so the pull can never succeed. Add --net (or publish a port with \
                     -p, or set an egress policy with --allow-cidr/--allow-host). To keep the \
                     machine network-isolated, supply the image locally instead: `docker save \
                     {image} | smolvm machine create --image - ...`"
                ),
            ));
        }

        let _db = self
            .home
            .write_transaction(&format!("reserve vm '{name}'"))?;
        let _lock = self.home.lock(Some(&name))?;
        if self.find(&name)?.is_some() {
            return Err(Failure::config(
                "create machine",
                format!("machine '{name}' already exists or is being created"),
            ));
        }
        // A record without a machine, under the name's lock, is what a
        // create killed half-way leaves: no live creator holds the name (it
        // would hold the lock), so, like smolvm's stale reservation, it is
        // dropped rather than reserving the name forever.
        if self.home.meta(&name)?.is_some() {
            self.home.remove_meta(&name)?;
        }

        let spec = MachineSpec {
            name: name.clone(),
            labels,
            image,
            cpus: cmd.cpus.into(),
            memory_mib: cmd.mem,
            env: parse::env(&cmd.env).into_iter().collect(),
            volumes: mounts.iter().map(volume).collect(),
            // The double filters nothing but smolvm's gateway: a machine
            // allowed `100.96.0.1/32` gets a network of its own with the
            // gateway in it and nothing else (see `gateway.rs`); any other
            // machine smolvm would give a network gets the host's,
            // unfiltered. The allow-lists are recorded and reported.
            egress: (network && !gated).then(|| Egress {
                allow_hosts: cmd.allow_host.clone(),
                allow_cidrs: allowed_cidrs.clone(),
            }),
            allow_unfiltered_network: network && !gated,
            secrets: secret_refs
                .iter()
                .map(|(guest, secret)| SecretMount {
                    guest_env: guest.clone(),
                    source: match secret {
                        SecretRef::FromEnv(var) => SecretSource::HostEnv(var.clone()),
                        SecretRef::FromFile(path) => SecretSource::HostFile(path.clone()),
                    },
                })
                .collect(),
            // The local runtime relays every port of a gated machine's
            // gateway.
            gate_port: gated.then_some(gateway::ANY_PORT),
        };
        let meta = Meta {
            created_at: now_secs(),
            image: reported_image,
            mounts,
            network,
            allowed_cidrs: (!allowed_cidrs.is_empty()).then_some(allowed_cidrs),
            dns_filter_hosts: (!cmd.allow_host.is_empty()).then(|| cmd.allow_host.clone()),
            secret_refs,
            init: cmd.init.clone(),
            workdir: cmd.workdir.clone(),
            storage_gb: cmd.storage,
            overlay_gb: cmd.overlay,
        };
        // The record first: a machine never exists without it.
        self.home.write_meta(&name, &meta)?;
        if let Err(error) = self.runtime.create(&spec) {
            self.home.remove_meta(&name)?;
            return Err(Failure::backend("create machine", error));
        }
        self.home.touch_data_dir(&name);

        written((|| {
            writeln!(io.out, "Created machine: {name}")?;
            writeln!(io.out, "  CPUs: {}, Memory: {} MiB", cmd.cpus, cmd.mem)?;
            if !cmd.volume.is_empty() {
                writeln!(io.out, "  Mounts: {}", cmd.volume.len())?;
            }
            if !cmd.init.is_empty() {
                writeln!(io.out, "  Init commands: {}", cmd.init.len())?;
            }
            writeln!(io.out)?;
            writeln!(
                io.out,
                "Use 'smolvm machine start --name {name}' to start the machine"
            )?;
            writeln!(
                io.out,
                "Then use 'smolvm machine exec --name {name} -- <command>' to run commands"
            )
        })())
    }

    fn start(&self, name: &str, io: &mut Io<'_>) -> Verb {
        let _lock = self.home.lock(Some(name))?;
        let found = self
            .find(name)?
            .ok_or_else(|| Failure::vm_not_found(name))?;
        // A forced `unreachable` or `failed` machine is recovered by start.
        self.home.clear_forced_state(name)?;
        if found.running() {
            return written(writeln!(io.out, "Machine '{name}' already running"));
        }
        if found.info.state.as_str() == "running" {
            // The VMM is alive but unresponsive: tear it down, start afresh.
            self.runtime
                .stop(name)
                .map_err(|error| Failure::backend("start machine", error))?;
        }
        let mounts = match found.meta.mounts.len() {
            0 => String::new(),
            n => format!(" with {n} mount(s)"),
        };
        // smolvm's progress goes to stderr.
        written(writeln!(io.err, "Starting machine '{name}'{mounts}..."))?;
        if let Some(warning) = found.info.cpus.and_then(parse::vcpu_warning) {
            written(writeln!(io.err, "{warning}"))?;
        }
        self.runtime
            .start(name)
            .map_err(|error| Failure::backend("start machine", error))?;
        // Like smolvm, the record is written once the machine has booted:
        // a writer in the way fails the call with the machine running.
        drop(
            self.home
                .write_transaction(&format!("update vm '{name}'"))?,
        );
        if !found.meta.init.is_empty() {
            written(writeln!(
                io.out,
                "Running {} init command(s)...",
                found.meta.init.len()
            ))?;
        }
        for (index, command) in found.meta.init.iter().enumerate() {
            let mut request = ExecRequest::shell(command.clone()).timeout(EXEC_WITHOUT_TIMEOUT);
            request.workdir = found.meta.workdir.clone();
            let output = self
                .runtime
                .exec(name, &request)
                .map_err(|error| Failure::backend("init", error))?;
            if !output.success() {
                let _ = self.runtime.stop(name);
                let stderr = String::from_utf8_lossy(&output.stderr);
                let stdout = String::from_utf8_lossy(&output.stdout);
                let detail = match (stderr.trim(), stdout.trim()) {
                    ("", "") => String::new(),
                    (err, "") => format!(": {err}"),
                    ("", out) => format!(": {out}"),
                    (err, out) => format!(": {err}; stdout: {out}"),
                };
                return Err(Failure::agent(
                    "init",
                    format!("init[{index}] failed (exit {}){detail}", output.status),
                ));
            }
        }
        written(writeln!(io.out, "Machine '{name}' running"))
    }

    fn stop(&self, name: &str, io: &mut Io<'_>) -> Verb {
        let _lock = self.home.lock(Some(name))?;
        let found = self
            .find_or_leave_folder(name)?
            .ok_or_else(|| Failure::vm_not_found(name))?;
        self.home.clear_forced_state(name)?;
        if !matches!(found.state.as_str(), "running" | "unreachable") {
            return written(writeln!(
                io.out,
                "Machine '{name}' is not running (state: {})",
                found.state
            ));
        }
        let _db = self
            .home
            .write_transaction(&format!("update vm '{name}'"))?;
        written(writeln!(io.out, "Stopping machine '{name}'..."))?;
        if found.info.state.as_str() == "running" {
            self.runtime
                .stop(name)
                .map_err(|error| Failure::backend("stop machine", error))?;
        }
        written(writeln!(io.out, "Stopped machine: {name}"))
    }

    fn delete(&self, name: &str, force: bool, io: &mut Io<'_>) -> Verb {
        let _lock = self.home.lock(Some(name))?;
        let found = self
            .find(name)?
            .ok_or_else(|| Failure::vm_not_found(name))?;
        let _db = self
            .home
            .write_transaction(&format!("remove vm '{name}'"))?;
        // smolvm stops a running machine before it asks for confirmation, so
        // a cancelled delete still leaves the machine stopped.
        if found.info.state.as_str() == "running" {
            written(writeln!(io.out, "Stopping machine '{name}'..."))?;
            self.runtime
                .stop(name)
                .map_err(|error| Failure::backend("stop machine", error))?;
        }
        if !force {
            written(
                write!(io.err, "Delete machine '{name}'? [y/N] ").and_then(|()| io.err.flush()),
            )?;
            let mut answer = String::new();
            let confirmed = io.input.read_line(&mut answer).is_ok()
                && matches!(answer.trim().to_lowercase().as_str(), "y" | "yes");
            if !confirmed {
                return written(writeln!(io.out, "Cancelled"));
            }
        }
        self.runtime
            .delete(name)
            .map_err(|error| Failure::backend("delete machine", error))?;
        self.home.remove_meta(name)?;
        self.home.clear_forced_state(name)?;
        if self.home.data_dir(name).exists() {
            written(writeln!(
                io.out,
                "Cleaning up data directory for vm: {name}"
            ))?;
            self.home.remove_data_dir(name);
        }
        written(writeln!(io.out, "Deleted machine: {name}"))
    }

    fn status(&self, cmd: StatusCmd, io: &mut Io<'_>) -> Verb {
        let name = cli::machine_name(&cmd.name);
        if cmd.json {
            // `status --json` reads the record only: no data folder.
            let found = self.find(name)?.ok_or_else(|| {
                Failure::config("machine status", format!("machine '{name}' not found"))
            })?;
            let record = Record::new(&found.info, &found.meta, &found.state);
            return written(report::write_json(io.out, &record, self.knobs.bad_json));
        }
        let found = self
            .find_or_leave_folder(name)?
            .ok_or_else(|| Failure::vm_not_found(name))?;
        written(writeln!(io.out, "Machine '{name}': {}", found.state))
    }

    fn ls(&self, cmd: LsCmd, io: &mut Io<'_>) -> Verb {
        let forced = self.home.forced_states();
        let found: Vec<Found> = self
            .list()?
            .into_iter()
            .map(|info| self.found(info, &forced))
            .collect::<Result<_, _>>()?;
        let mut records: Vec<Record<'_>> = found
            .iter()
            .map(|found| Record::new(&found.info, &found.meta, &found.state))
            .collect();
        report::unsorted(&mut records);
        if cmd.json {
            written(report::write_json(io.out, &records, self.knobs.bad_json))
        } else {
            written(report::write_table(io.out, &records, cmd.verbose))
        }
    }

    fn update(&self, cmd: UpdateCmd, io: &mut Io<'_>) -> Verb {
        let name = cmd.name.as_str();
        let _lock = self.home.lock(Some(name))?;
        let found = self
            .find(name)?
            .ok_or_else(|| Failure::config("update", format!("machine '{name}' not found")))?;
        if !matches!(found.state.as_str(), "created" | "stopped") {
            return Err(Failure::invalid_state("stopped", &found.state));
        }
        let cpus = cmd.cpus.map(u32::from).or(found.info.cpus).unwrap_or(1);
        let memory = cmd.mem.or(found.info.memory_mib).unwrap_or(64);
        if let Some(warning) = parse::vcpu_warning(cpus) {
            written(writeln!(io.err, "{warning}"))?;
        }
        parse::check_resources(cpus, memory)?;
        for spec in &cmd.env {
            if spec.split_once('=').is_none_or(|(key, _)| key.is_empty()) {
                return Err(Failure::config(
                    "update",
                    format!("invalid env format '{spec}': expected KEY=VALUE"),
                ));
            }
        }
        if cmd.net || cmd.no_net {
            return Err(Failure::double(
                "--net/--no-net are not supported: the local runtime cannot change a machine's network in place",
            ));
        }
        let new_mounts: Vec<Mount> = cmd
            .volume
            .iter()
            .map(|spec| parse::mount(spec))
            .collect::<Result<_, _>>()?;

        let mut meta = found.meta.clone();
        let mut changes = Vec::new();
        let mut removed = Vec::new();
        for spec in &cmd.remove_volume {
            // `./src:/app` matches the stored canonical `/abs/src:/app`.
            let canonical = match spec.split_once(':') {
                Some((source, target)) => {
                    let source =
                        std::fs::canonicalize(source).unwrap_or_else(|_| PathBuf::from(source));
                    format!("{}:{target}", source.display())
                }
                None => spec.clone(),
            };
            let before = meta.mounts.len();
            meta.mounts.retain(|mount| {
                let stored = format!("{}:{}", mount.source.display(), mount.target);
                let keep = stored != canonical && stored != *spec;
                if !keep {
                    removed.push(mount.clone());
                }
                keep
            });
            if meta.mounts.len() < before {
                changes.push(format!("  removed volume: {spec}"));
            }
        }
        let mut added = Vec::new();
        for mount in new_mounts {
            if !meta
                .mounts
                .iter()
                .any(|m| m.source == mount.source && m.target == mount.target)
            {
                changes.push(format!(
                    "  added volume: {}:{}{}",
                    mount.source.display(),
                    mount.target,
                    if mount.read_only { ":ro" } else { "" }
                ));
                meta.mounts.push(mount.clone());
                added.push(mount);
            }
        }
        let mut targets = std::collections::BTreeSet::new();
        if let Some(mount) = meta.mounts.iter().find(|m| !targets.insert(&m.target)) {
            return Err(Failure::config(
                "update",
                format!(
                    "duplicate mount target: {} is specified more than once",
                    mount.target
                ),
            ));
        }
        if let Some(cpus) = cmd.cpus {
            let from = found.info.cpus.map(|c| c.to_string()).unwrap_or_default();
            changes.push(format!("  cpus: {from} → {cpus}"));
        }
        if let Some(mem) = cmd.mem {
            let from = found
                .info
                .memory_mib
                .map(|m| m.to_string())
                .unwrap_or_default();
            changes.push(format!("  memory: {from} MiB → {mem} MiB"));
        }
        for key in &cmd.remove_env {
            changes.push(format!("  removed env: {key}"));
        }
        let set_env: BTreeMap<String, String> = parse::env(&cmd.env).into_iter().collect();
        for (key, value) in &set_env {
            changes.push(format!("  env: {key}={value}"));
        }
        if let Some(workdir) = &cmd.workdir {
            changes.push(format!("  workdir: {workdir}"));
            meta.workdir = Some(workdir.clone());
        }
        if let Some(storage) = cmd.storage {
            changes.push(format!("  storage: {storage} GiB"));
            meta.storage_gb = Some(storage);
        }
        if let Some(overlay) = cmd.overlay {
            changes.push(format!("  overlay: {overlay} GiB"));
            meta.overlay_gb = Some(overlay);
        }

        let _db = self
            .home
            .write_transaction(&format!("update vm '{name}'"))?;
        let update = MachineUpdate {
            cpus: cmd.cpus.map(u32::from),
            memory_mib: cmd.mem,
            set_env,
            remove_env: cmd.remove_env.clone(),
            add_volumes: added.iter().map(volume).collect(),
            remove_volumes: removed.iter().map(volume).collect(),
        };
        if !update.is_empty() {
            self.runtime
                .update(name, &update)
                .map_err(|error| Failure::backend("update", error))?;
        }
        self.home.write_meta(name, &meta)?;

        written((|| {
            if changes.is_empty() {
                return writeln!(io.out, "No changes specified.");
            }
            writeln!(io.out, "Updated machine '{name}':")?;
            for change in &changes {
                writeln!(io.out, "{change}")?;
            }
            writeln!(io.out, "\nStart with: smolvm machine start --name {name}")
        })())
    }

    fn exec(&self, cmd: ExecCmd, io: &mut Io<'_>) -> Verb {
        let name = cli::machine_name(&cmd.name);
        let found = self
            .find_or_leave_folder(name)?
            .ok_or_else(|| Failure::vm_not_found(name))?;
        if !found.running() {
            return Err(Failure::not_running(name));
        }
        if cmd.detach {
            return Err(Failure::double("detached (-d) exec is not supported"));
        }
        if (cmd.interactive || cmd.tty)
            && !(cmd.secret_env.is_empty() && cmd.secret_file.is_empty())
        {
            // The session's command line would carry their values.
            return Err(Failure::double(
                "--secret-env/--secret-file with -i/-t are not supported",
            ));
        }
        let mut env: BTreeMap<String, String> =
            parse::resolve_secrets(&parse::secrets(&cmd.secret_env, &cmd.secret_file)?)?
                .into_iter()
                .collect();
        env.extend(parse::env(&cmd.env));
        let request = ExecRequest {
            argv: cmd.command,
            env,
            workdir: cmd.workdir.or(found.meta.workdir),
            // smolvm 1.6+ runs exec as the image's USER (the knob plays one).
            user: self.knobs.exec_user.clone(),
            timeout: cmd.timeout.unwrap_or(EXEC_WITHOUT_TIMEOUT),
        };
        if cmd.interactive || cmd.tty {
            // A session (`bottle attach`): the runtime's interactive command,
            // on this process's own stdin, stdout and stderr.
            let argv = self.runtime.interactive_argv(name, &request);
            let status = std::process::Command::new(&argv[0])
                .args(&argv[1..])
                .status()
                .map_err(|e| Failure::double(format!("cannot run the session: {e}")))?;
            use std::os::unix::process::ExitStatusExt;
            return Ok(Exit::Code(
                status
                    .code()
                    .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)),
            ));
        }
        let output = self
            .runtime
            .exec(name, &request)
            .map_err(|error| Failure::backend("exec", error))?;
        if self.knobs.exec_die == Some(self.call) {
            // The command ran to completion in the guest; the caller gets
            // half its output and no status.
            let _ = io.out.write_all(&output.stdout[..output.stdout.len() / 2]);
            let _ = io.out.flush();
            return Ok(Exit::Killed);
        }
        written(
            io.out
                .write_all(&output.stdout)
                .and_then(|()| io.err.write_all(&output.stderr)),
        )?;
        Ok(Exit::Code(output.status))
    }

    fn cp(&self, cmd: CpCmd) -> Verb {
        // smolvm looks for `NAME:` in the source first.
        let (name, guest_path, local_path, upload) =
            if let Some((name, path)) = cmd.src.split_once(':') {
                (name, path, cmd.dst.as_str(), false)
            } else if let Some((name, path)) = cmd.dst.split_once(':') {
                (name, path, cmd.src.as_str(), true)
            } else {
                return Err(Failure::config(
                    "cp",
                    "one of SRC or DST must use machine:path syntax (e.g., myvm:/workspace/file)",
                ));
            };
        if !upload && (cmd.mode.is_some() || cmd.uid.is_some() || cmd.gid.is_some()) {
            return Err(Failure::config(
                "cp",
                "--mode/--uid/--gid apply to uploads only (host -> machine)",
            ));
        }
        let found = self
            .find_or_leave_folder(name)?
            .ok_or_else(|| Failure::vm_not_found(name))?;
        if !found.running() {
            return Err(Failure::not_running(name));
        }
        if upload {
            let options = CopyOptions {
                mode: cmd
                    .mode
                    .as_deref()
                    .map(parse::octal_mode)
                    .transpose()?
                    .unwrap_or(0o644),
                uid: cmd.uid.unwrap_or(0),
                gid: cmd.gid.unwrap_or(0),
            };
            std::fs::File::open(local_path)
                .and_then(|file| file.metadata())
                .map_err(|error| {
                    Failure::agent("read local file", format!("{local_path}: {error}"))
                })?;
            self.runtime
                .copy_in(name, Path::new(local_path), guest_path, &options)
                .map_err(|error| Failure::backend("write file", error))?;
        } else {
            let bytes = self
                .runtime
                .read_file(name, guest_path)
                .map_err(|error| Failure::backend("read file", error))?;
            std::fs::write(local_path, bytes).map_err(|error| {
                Failure::agent("write local file", format!("{local_path}: {error}"))
            })?;
        }
        Ok(Exit::Code(0))
    }
}

fn volume(mount: &Mount) -> VolumeMount {
    VolumeMount {
        host: mount.source.clone(),
        guest: mount.target.clone(),
        read_only: mount.read_only,
    }
}

/// smolvm names an unnamed machine `vm-` and eight hex digits.
fn generated_name() -> String {
    format!("vm-{:08x}", fastrand::u32(..))
}

#[cfg(test)]
#[path = "machine_tests.rs"]
mod tests;
