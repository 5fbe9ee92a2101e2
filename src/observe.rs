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
    })
}

const MARK: &str = "@@bottle-probe";

/// The one script a probe runs: the ledger, then each step's fragment.
///
/// A fragment's output is hex-encoded (`od`, POSIX): it shows files the
/// agent user controls (its prompt, skills, `~/.gitconfig`,
/// `~/.claude.json`), which could otherwise hold a line that looks like a
/// mark and forge another step's section, hiding drift from `check`.
pub fn probe_script(desired: &Desired, agent: &DesiredAgent) -> String {
    let ctx = desired.ctx(agent);
    let mut script = format!(
        "for f in {LEDGER_DIR}/*.json; do [ -f \"$f\" ] || continue; echo '{MARK} ledger'; cat \"$f\"; echo; done\n"
    );
    for step in &agent.steps {
        if let Some(fragment) = steps::probe_fragment(&step.kind, &ctx) {
            script.push_str(&format!(
                "echo '{MARK} step {}'\n( {fragment} ) 2>/dev/null | od -An -v -tx1\n",
                step.kind.id()
            ));
        }
    }
    // A step that left the manifest but is still recorded may need what
    // its probe shows to be undone (the supervise server is removed from
    // the observed ~/.claude.json).
    if agent.step(&StepKind::Supervise).is_none() {
        let id = StepKind::Supervise.id();
        if let Some(fragment) = steps::probe_fragment(&StepKind::Supervise, &ctx) {
            script.push_str(&format!(
                "if [ -f {} ]; then echo '{MARK} step {id}'\n( {fragment} ) 2>/dev/null | od -An -v -tx1\nfi\n",
                LedgerEntry::guest_path(&id)
            ));
        }
    }
    script.push_str(&format!("echo '{MARK} end'\n"));
    script
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

/// `od -An -v -tx1` output back to the text it encodes.
fn decode_hex(text: &str) -> Option<String> {
    let bytes = text
        .split_ascii_whitespace()
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
