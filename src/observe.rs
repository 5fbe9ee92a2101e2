//! Observe: one `list`, then one probe `exec` per running machine of this
//! project. Nothing else touches the runtime before the plan exists.

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::desired::{Desired, DesiredAgent};
use crate::graph::StepKind;
use crate::ledger::{LEDGER_DIR, LedgerEntry};
use crate::runtime::{
    ExecRequest, MachineInfo, MachineState, Runtime, RuntimeError, RuntimeErrorKind,
};
use crate::steps::{
    self,
    machine::{LABEL_MANAGED_BY, LABEL_PROJECT, MANAGED_BY},
};

/// What the runtime reported.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Every machine the runtime listed, sorted by name.
    pub machines: Vec<MachineInfo>,
    /// Probes of running machines of this project, by machine name.
    pub probes: BTreeMap<String, Probe>,
    /// The project gate's health (`None`: not observed).
    pub gate: Option<crate::gate::reconcile::GateHealth>,
    /// What apply last sent of each agent's prompt and setup inputs
    /// (bottle's host-side copies, [`crate::sent::Store`]), by agent.
    pub sent: BTreeMap<String, crate::sent::AgentTexts>,
}

impl Snapshot {
    pub fn machine(&self, name: &str) -> Option<&MachineInfo> {
        self.machines
            .binary_search_by(|m| m.name.as_str().cmp(name))
            .ok()
            .map(|i| &self.machines[i])
    }
}

/// What one probe found inside a guest.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Probe {
    /// Ledger entries by step id.
    pub ledger: BTreeMap<String, LedgerEntry>,
    /// Each probed step's output, by step id.
    pub sections: BTreeMap<String, String>,
    /// Why the probe could not run, if it could not.
    pub error: Option<String>,
}

impl Probe {
    /// The digest of a step's probe section, as observed now.
    pub fn digest(&self, step_id: &str) -> Option<String> {
        let kind = step_id.parse::<crate::graph::StepKind>().ok()?;
        self.sections
            .get(step_id)
            .map(|s| steps::probe_digest(&kind, s))
    }
}

/// Is this machine managed by bottle for this project?
pub fn is_ours(machine: &MachineInfo, project: &str) -> bool {
    machine.labels.get(LABEL_MANAGED_BY).map(String::as_str) == Some(MANAGED_BY)
        && machine.labels.get(LABEL_PROJECT).map(String::as_str) == Some(project)
}

/// List, then probe every running machine of ours that an agent declares
/// (only `targets`' machines when given), `parallelism` probes at a time.
pub fn observe(
    rt: &dyn Runtime,
    desired: &Desired,
    targets: Option<&[String]>,
    parallelism: usize,
) -> Result<Snapshot, RuntimeError> {
    let machines = rt.list()?;
    let targets: Vec<(&MachineInfo, &DesiredAgent)> = machines
        .iter()
        .filter(|m| m.state == MachineState::Running && is_ours(m, &desired.project.name))
        .filter_map(|m| desired.by_machine(&m.name).map(|a| (m, a)))
        .filter(|(_, a)| targets.is_none_or(|t| t.contains(&a.name)))
        .collect();
    let probes = Mutex::new(BTreeMap::new());
    let queue = Mutex::new(targets.into_iter());
    std::thread::scope(|scope| {
        for _ in 0..parallelism.max(1) {
            scope.spawn(|| {
                loop {
                    let next = queue.lock().expect("queue lock").next();
                    let Some((machine, agent)) = next else { break };
                    let probe = probe_one(rt, desired, agent, &machine.name);
                    probes
                        .lock()
                        .expect("probes lock")
                        .insert(machine.name.clone(), probe);
                }
            });
        }
    });
    Ok(Snapshot {
        machines,
        probes: probes.into_inner().expect("probes lock"),
        gate: desired
            .gate
            .as_ref()
            .map(|g| crate::gate::reconcile::health(&g.paths)),
        sent: BTreeMap::new(),
    })
}

const MARK: &str = "@@bottle-probe";

/// The most a probe section may hold. Fragments print hashes, modes and
/// names, or one small config file: more is the agent's doing (a
/// `~/.claude.json` of 300 MB), never read whole. A longer section is cut
/// here, in the guest, and observed as [`OVER_LIMIT`]: drift that the
/// step's apply repairs by rewriting what it owns.
pub const SECTION_LIMIT: usize = 1 << 20;

/// How long one fragment may run (where the guest has `timeout`): a
/// fragment the agent makes slow (a FIFO or a huge file where a skill file
/// was) is cut short and shows as drift, not as a probe that never ends.
pub const FRAGMENT_SECONDS: u32 = 15;

/// A section observed longer than [`SECTION_LIMIT`].
pub const OVER_LIMIT: &str = "@@bottle over limit\n";

/// The one script a probe runs: the ledger, then each step's fragment.
///
/// A fragment's output is hex-encoded (`od`, POSIX): it shows files the
/// agent user controls (its prompt, skills, `~/.gitconfig`,
/// `~/.claude.json`), which could otherwise hold a line that looks like a
/// mark and forge another step's section, hiding drift from `check`.
pub fn probe_script(desired: &Desired, agent: &DesiredAgent) -> String {
    let ctx = desired.ctx(agent);
    // Ledger files are root's (0700 directory): only their number and size
    // are bounded here, by what bottle writes.
    let mut script = format!(
        "for f in {LEDGER_DIR}/*.json; do [ -f \"$f\" ] || continue; echo '{MARK} ledger'; head -c {SECTION_LIMIT} \"$f\"; echo; done\n{}",
        timeout_preamble(FRAGMENT_SECONDS)
    );
    for step in &agent.steps {
        if let Some(fragment) = steps::probe_fragment(&step.kind, &ctx) {
            script.push_str(&section_script(&step.kind.id(), &fragment));
        }
    }
    // A step that left the manifest but is still recorded may need what
    // its probe shows to be undone (the supervise server is removed from
    // the observed ~/.claude.json).
    if agent.step(&StepKind::Supervise).is_none() {
        let id = StepKind::Supervise.id();
        if let Some(fragment) = steps::probe_fragment(&StepKind::Supervise, &ctx) {
            script.push_str(&format!(
                "if [ -f {} ]; then\n{}fi\n",
                LedgerEntry::guest_path(&id),
                section_script(&id, &fragment)
            ));
        }
    }
    script.push_str(&section_script(
        steps::machine::SETTINGS_SECTION,
        &steps::machine::settings_probe(&ctx),
    ));
    script.push_str(&format!("echo '{MARK} end'\n"));
    script
}

/// Sets `$bottle_t` to the command that bounds a fragment's time, where
/// the guest has a `timeout` that takes this form (GNU's kills the
/// fragment's whole process group; an old busybox one that wants `-t` is
/// not used rather than failing every fragment).
fn timeout_preamble(seconds: u32) -> String {
    format!(
        "bottle_t=; if timeout -s KILL {seconds} true >/dev/null 2>&1; then bottle_t=\"timeout -s KILL {seconds}\"; fi\n"
    )
}

/// One step's section: its fragment bounded in time and output (one byte
/// over the limit tells a cut section from a full one), hex-encoded.
fn section_script(step: &str, fragment: &str) -> String {
    format!(
        "echo '{MARK} step {step}'\n$bottle_t sh -c {} 2>/dev/null | head -c {} | od -An -v -tx1\n",
        steps::sh_quote(fragment),
        SECTION_LIMIT + 1
    )
}

/// Probe one machine (also used right after a stopped machine is started).
pub fn probe_one(
    rt: &dyn Runtime,
    desired: &Desired,
    agent: &DesiredAgent,
    machine: &str,
) -> Probe {
    let request = ExecRequest::new([
        "sh".to_owned(),
        "-c".to_owned(),
        probe_script(desired, agent),
    ]);
    match rt.exec(machine, &request) {
        Ok(out) if out.success() => parse_probe(&String::from_utf8_lossy(&out.stdout)),
        Ok(out) => Probe {
            error: Some(format!(
                "probe exited with status {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            ..Probe::default()
        },
        Err(e) => Probe {
            error: Some(probe_failure(&e)),
            ..Probe::default()
        },
    }
}

/// Why a probe could not run. Without the command: it holds the whole probe
/// script, which would bury the reason in a drift report.
fn probe_failure(e: &RuntimeError) -> String {
    match &e.kind {
        RuntimeErrorKind::CommandFailed { status, stderr, .. } => {
            format!("exec exited with status {status}: {}", stderr.trim())
        }
        RuntimeErrorKind::Timeout { timeout, .. } => {
            format!("exec did not finish within {}s", timeout.as_secs())
        }
        RuntimeErrorKind::Spawn { source, .. } => format!("could not run the runtime: {source}"),
        RuntimeErrorKind::Malformed { detail, .. } => format!("unexpected output: {detail}"),
        _ => e.to_string(),
    }
}

/// Parse a probe's output. Exposed for tests.
pub fn parse_probe(output: &str) -> Probe {
    let mut probe = Probe::default();
    let mut current: Option<(String, String)> = None; // (header, body)
    let mut ended = false;
    let flush = |probe: &mut Probe, header: &str, body: String| {
        if header == "ledger" {
            match serde_json::from_str::<LedgerEntry>(body.trim()) {
                Ok(entry) => {
                    probe.ledger.insert(entry.step.clone(), entry);
                }
                Err(e) => {
                    probe
                        .error
                        .get_or_insert(format!("unreadable ledger entry: {e}"));
                }
            }
        } else if let Some(step) = header.strip_prefix("step ") {
            match decode_hex(&body) {
                Some(output) if output.len() > SECTION_LIMIT => {
                    probe
                        .sections
                        .insert(step.to_owned(), OVER_LIMIT.to_owned());
                }
                Some(output) => {
                    probe.sections.insert(step.to_owned(), output);
                }
                None => {
                    probe
                        .error
                        .get_or_insert(format!("unreadable probe output for step {step}"));
                }
            }
        }
    };
    for line in output.split_inclusive('\n') {
        if let Some(header) = line.trim_end_matches('\n').strip_prefix(MARK) {
            if let Some((h, body)) = current.take() {
                flush(&mut probe, &h, body);
            }
            let header = header.trim();
            if header == "end" {
                ended = true;
                break;
            }
            current = Some((header.to_owned(), String::new()));
        } else if let Some((_, body)) = current.as_mut() {
            body.push_str(line);
        }
    }
    if !ended {
        probe
            .error
            .get_or_insert("probe output was cut short".to_owned());
    }
    probe
}

/// `od -An -v -tx1` output back to the text it encodes (at most one byte
/// over [`SECTION_LIMIT`]: the guest cut the rest).
fn decode_hex(text: &str) -> Option<String> {
    let bytes = text
        .split_ascii_whitespace()
        .take(SECTION_LIMIT + 1)
        .map(|byte| u8::from_str_radix(byte, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `od -An -v -tx1` prints for `text`.
    fn od(text: &str) -> String {
        text.as_bytes()
            .chunks(16)
            .map(|line| {
                let bytes: String = line.iter().map(|b| format!(" {b:02x}")).collect();
                format!("{bytes}\n")
            })
            .collect()
    }

    #[test]
    fn parses_ledger_entries_and_sections() {
        let out = format!(
            "{MARK} ledger\n{{\"format_version\":1,\"step\":\"prompt\",\"hash\":\"h\",\"digest\":\"d\",\"applied_at\":1}}\n\n\
             {MARK} step prompt\n{}{MARK} step git\n{MARK} end\n",
            od("600 1000 1000\nabc  -\n")
        );
        let probe = parse_probe(&out);
        assert_eq!(probe.error, None);
        assert_eq!(probe.ledger["prompt"].hash, "h");
        assert_eq!(probe.sections["prompt"], "600 1000 1000\nabc  -\n");
        assert_eq!(probe.sections["git"], "");
    }

    #[test]
    fn guest_content_cannot_forge_a_section() {
        // What an agent user could write into its own ~/.claude.json, with
        // no final newline.
        let forged = format!("{{}}\n{MARK} step prompt\n600 1000 1000\nabc  -\n{MARK} end");
        let out = format!(
            "{MARK} step prompt\n{}{MARK} step supervise\n{}{MARK} end\n",
            od("600 1000 1000\ntampered  -\n"),
            od(&forged)
        );
        let probe = parse_probe(&out);
        assert_eq!(probe.error, None);
        assert_eq!(probe.sections["prompt"], "600 1000 1000\ntampered  -\n");
        assert_eq!(probe.sections["supervise"], forged);
    }

    /// Run sections through the host's `sh`, as a guest's would.
    fn run_sections(seconds: u32, sections: &[(&str, &str)]) -> Probe {
        run_sections_in(None, seconds, sections)
    }

    fn run_sections_in(path: Option<&str>, seconds: u32, sections: &[(&str, &str)]) -> Probe {
        let mut script = timeout_preamble(seconds);
        for (step, fragment) in sections {
            script.push_str(&section_script(step, fragment));
        }
        script.push_str(&format!("echo '{MARK} end'\n"));
        let mut command = std::process::Command::new("/bin/sh");
        command
            .arg("-c")
            .arg(&script)
            .stdin(std::process::Stdio::null());
        if let Some(path) = path {
            command.env("PATH", path);
        }
        let out = command.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        // What bottle buffers is bounded by the guest's cut, not the agent.
        assert!(out.stdout.len() < 8 * SECTION_LIMIT, "{}", out.stdout.len());
        parse_probe(&String::from_utf8_lossy(&out.stdout))
    }

    #[test]
    fn a_section_the_agent_inflates_is_cut_in_the_guest_and_observed_as_over_limit() {
        let probe = run_sections(
            60,
            &[
                // An endless file where a small one was (`cat /dev/zero`).
                ("supervise", "yes '{\"mcpServers\": {}}'"),
                ("prompt", "echo fine"),
                // Exactly the limit is still a section.
                ("skills", &format!("head -c {SECTION_LIMIT} /dev/zero")),
            ],
        );
        assert_eq!(probe.error, None);
        assert_eq!(probe.sections["supervise"], OVER_LIMIT);
        assert_eq!(probe.sections["prompt"], "fine\n");
        assert_eq!(probe.sections["skills"].len(), SECTION_LIMIT);
        assert_ne!(
            probe.digest("supervise"),
            Some(steps::supervise::digest_of_config("{}")),
        );
    }

    #[test]
    fn a_fragment_that_hangs_is_cut_short_and_the_probe_goes_on() {
        let probe = run_sections(
            1,
            &[
                // A FIFO where a file was: reading it blocks for ever.
                ("prompt", "echo partial; sleep 600; echo late"),
                ("git", "echo fine"),
            ],
        );
        assert_eq!(probe.error, None);
        assert_eq!(probe.sections["prompt"], "partial\n");
        assert_eq!(probe.sections["git"], "fine\n");
    }

    #[test]
    fn a_timeout_that_takes_other_arguments_is_not_used() {
        // An old busybox `timeout` (`-t SECS`): every call fails.
        let tmp = tempfile::tempdir().unwrap();
        let fake = tmp.path().join("timeout");
        std::fs::write(
            &fake,
            "#!/bin/sh\necho 'usage: timeout -t SECS' >&2; exit 1\n",
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let path = format!(
            "{}:{}",
            tmp.path().display(),
            std::env::var("PATH").unwrap()
        );
        let probe = run_sections_in(Some(&path), 15, &[("git", "echo fine")]);
        assert_eq!(probe.sections["git"], "fine\n");
    }

    #[test]
    fn a_cut_short_probe_is_an_error() {
        let probe = parse_probe(&format!("{MARK} step prompt\n{}", od("abc\n")));
        assert!(probe.error.is_some());
    }

    #[test]
    fn a_section_that_is_not_hex_is_an_error() {
        let probe = parse_probe(&format!("{MARK} step prompt\nabc  -\n{MARK} end\n"));
        assert!(probe.error.is_some());
    }
}
