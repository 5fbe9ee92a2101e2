//! The guest transaction: every due step of one agent in one upload and
//! one exec.
//!
//! Each runtime call crosses into the guest (a vsock, and on image
//! machines a `crun exec`), so the unit of work inside a guest is one
//! transaction per agent, not a round trip per step. bottle packs the
//! payloads of the due steps into one archive, uploads it root-owned
//! (mode 0600) into a root-only directory, and runs one root script (the
//! *runner*) that:
//!
//! 1. removes what interrupted transactions left (an archive never
//!    unpacked, a payload or stage directory whose runner is gone: a
//!    runner holds `flock` on its own lock file while it lives);
//! 2. unpacks the archive, as root, into a root-only directory: nothing the
//!    agent user can write is ever read or run by root;
//! 3. runs the steps in the graph's order, each in a subshell holding the
//!    step's own guest lock ([`super::lock_preamble`]), skipping the
//!    dependents of a failed step and running the rest; once a step
//!    succeeds, still holding its lock, it records the step's ledger entry
//!    with the digest of what bottle sent ([`Recorded`]);
//! 4. reports each step on its own stdout, which nothing else writes to
//!    (each step's output goes to files of the root-only directory): one
//!    line per step, `@@bottle-txn <i> done`, `... failed <status> <hex of
//!    the stderr tail>` or `... skipped <i of the dependency>`, then
//!    `@@bottle-txn end`.
//!
//! What a step's script may use, besides its arguments (`"$@"`):
//! - `$P`: its payload directory (the current directory), root-only;
//! - `$bottle_user`, `$bottle_uid`, `$bottle_gid`: the agent user;
//! - `bottle_stage FILE [USER]`: prints the path of a copy of FILE owned
//!   by USER (the agent user by default), mode 0600, under an unlistable
//!   root directory: everything bound for a home is written *by its user*
//!   from such a copy, so a symlink planted in the home never makes root
//!   write anywhere;
//! - `bottle_as USER BODY ARGS...`: runs `sh -c BODY` as USER with its
//!   HOME, without the lock descriptors (nothing it leaves running can
//!   hold a lock).

use std::time::Duration;

use super::{
    LOCK_DIR, LOCK_WAIT, Recorded, StepError, Work, lock_failure, lock_preamble, sh_quote, tail,
};
use crate::ledger::{LEDGER_DIR, LedgerEntry};
use crate::runtime::smolvm::AS_USER;
use crate::runtime::{CopyOptions, ExecRequest, Runtime};

/// Where transactions unpack (root-only).
pub const TXN_DIR: &str = "/var/lib/bottle/txn";

/// Where files bound for a home wait for their user (root's, mode 0711:
/// enterable, not listable); each transaction has its own directory.
pub const STAGE_DIR: &str = "/var/lib/bottle-stage";

const MARK: &str = "@@bottle-txn";

/// Placeholders a ledger entry holds until the guest fills them in. They
/// hold a NUL, which no path, name or manifest value bottle records can.
pub const DIGEST_PLACEHOLDER: &str = "\u{0}bottle:digest";
pub const UID_PLACEHOLDER: &str = "\u{0}bottle:uid";
pub const GID_PLACEHOLDER: &str = "\u{0}bottle:gid";

/// A placeholder the guest fills with what the step's script wrote for
/// `name` (`[a-z0-9]+`) in its payload directory's file `fill`, one `NAME
/// VALUE` line each; values other than `[a-z0-9]*` are not taken (the
/// placeholder then stays, a value that matches nothing).
pub fn fill_placeholder(name: &str) -> String {
    format!("\u{0}bottle:fill:{name}")
}

/// What the transaction does with a step's ledger entry.
#[derive(Debug, Clone)]
pub enum Ledger {
    /// Write it once the step succeeded (its digest, and the agent user's
    /// ids where the placeholders stand, filled in by the guest).
    Write(LedgerEntry),
    /// Remove it (the step left the manifest).
    Remove,
}

/// One step of a transaction.
#[derive(Debug, Clone)]
pub struct TxnStep {
    /// The step id: its lock and its ledger file.
    pub step: String,
    pub work: Work,
    pub ledger: Ledger,
    /// Indices of earlier steps of the transaction it needs.
    pub after: Vec<usize>,
}

/// How one step of a transaction ended.
#[derive(Debug)]
pub enum StepOutcome {
    Done,
    Failed(StepError),
    /// Not run: the step at this index did not complete.
    Skipped(usize),
}

/// Run `steps` in `machine` as one transaction for the agent user `user`.
/// Never fails as a whole: a failed upload or exec fails every step with
/// its error.
pub fn run(rt: &dyn Runtime, machine: &str, user: &str, steps: &[TxnStep]) -> Vec<StepOutcome> {
    if steps.is_empty() {
        return Vec::new();
    }
    let id: String = std::iter::repeat_with(fastrand::alphanumeric)
        .take(20)
        .collect();
    let all_fail = |e: StepError| {
        let (message, help) = super::parts(&e);
        steps
            .iter()
            .map(|_| StepOutcome::Failed(StepError::Other(message.clone(), help.clone())))
            .collect()
    };
    let archive = match archive(steps) {
        Ok(bytes) => bytes,
        Err(e) => return all_fail(e),
    };
    let upload = (|| -> Result<(), StepError> {
        use std::io::Write;
        let mut tmp = tempfile::NamedTempFile::new().map_err(|e| {
            StepError::Other(
                format!("cannot create a temporary file: {e}"),
                "check that the temporary directory is writable".into(),
            )
        })?;
        tmp.write_all(&archive)
            .and_then(|_| tmp.flush())
            .map_err(|e| {
                StepError::Other(
                    format!("cannot write a temporary file: {e}"),
                    "check free space in the temporary directory".into(),
                )
            })?;
        let root = CopyOptions {
            mode: 0o600,
            uid: 0,
            gid: 0,
        };
        rt.copy_in(machine, tmp.path(), &format!("{TXN_DIR}/{id}.tar"), &root)?;
        Ok(())
    })();
    if let Err(e) = upload {
        return all_fail(e);
    }
    let (script, args) = runner(&id, user, steps);
    let mut argv = vec!["sh".to_owned(), "-c".to_owned(), script, "sh".to_owned()];
    argv.extend(args);
    let timeout = steps
        .iter()
        .map(|s| s.work.timeout + LOCK_WAIT)
        .sum::<Duration>();
    let out = match rt.exec(machine, &ExecRequest::new(argv).timeout(timeout)) {
        Ok(out) => out,
        Err(e) => return all_fail(e.into()),
    };
    parse(
        machine,
        steps,
        &String::from_utf8_lossy(&out.stdout),
        &String::from_utf8_lossy(&out.stderr),
        out.status,
    )
}

/// Every step's payload under `p/<index>/`.
fn archive(steps: &[TxnStep]) -> Result<Vec<u8>, StepError> {
    let mut builder = tar::Builder::new(Vec::new());
    let failed = |e: std::io::Error| {
        StepError::Other(
            format!("cannot build the transaction's archive: {e}"),
            "check free memory".into(),
        )
    };
    for (i, step) in steps.iter().enumerate() {
        for file in &step.work.files {
            let mut header = tar::Header::new_gnu();
            header.set_size(file.bytes.len() as u64);
            header.set_mode(file.mode);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(0);
            header.set_entry_type(tar::EntryType::Regular);
            builder
                .append_data(
                    &mut header,
                    format!("p/{i}/{}", file.name),
                    file.bytes.as_slice(),
                )
                .map_err(failed)?;
        }
    }
    builder.into_inner().map_err(failed)
}

/// Shell that narrows `"$@"` to `count` arguments from position `start`
/// (1-based): in a subshell, before a step's script.
pub(crate) fn slice(start: usize, count: usize) -> String {
    let end = start + count;
    format!(
        "bottle_n=$#; bottle_i=0\n\
         for bottle_a do bottle_i=$((bottle_i+1)); if [ $bottle_i -ge {start} ] && [ $bottle_i -lt {end} ]; then set -- \"$@\" \"$bottle_a\"; fi; done\n\
         shift $bottle_n\n"
    )
}

/// `first`, then `then` when it succeeded, as one step's work (the undo
/// of what a step left in a former agent user's home, then the apply).
pub fn chain(first: Work, then: Work) -> Work {
    let n = first.args.len();
    let mut files = first.files;
    files.extend(then.files);
    let mut args = first.args;
    args.extend(then.args);
    Work {
        files,
        script: format!(
            "( {}( {}\n) )\nbottle_rc=$?; [ $bottle_rc -eq 0 ] || exit $bottle_rc\nshift {n}\n( {}\n)\n",
            slice(1, n),
            first.script,
            then.script
        ),
        args,
        recorded: then.recorded,
        timeout: first.timeout + then.timeout,
        what: then.what,
        help: then.help,
    }
}

fn hex_of(what: &str) -> String {
    format!("$({what} | od -An -v -tx1 | tr -d ' \\n')")
}

/// The runner script and its arguments. A step's script runs in a
/// subshell whose status is read afterwards, never tested with `||`: a
/// tested subshell ignores the `set -e` inside it.
fn runner(id: &str, user: &str, steps: &[TxnStep]) -> (String, Vec<String>) {
    let t = format!("{TXN_DIR}/{id}");
    let s = format!("{STAGE_DIR}/{id}");
    let key = |p: &str| sh_quote(&serde_json::to_string(p).expect("a string serializes"));
    let mut args = vec![user.to_owned()];
    let mut script = format!(
        r#"bottle_user=$1
T={t}; S={s}
umask 077
bottle_fatal() {{ echo "{MARK} fatal {fatal_hex}"; exit 1; }}
mkdir -p {TXN_DIR} && chmod 700 /var/lib/bottle {TXN_DIR} || bottle_fatal "cannot create {TXN_DIR}"
exec 8>"$T.lock" || bottle_fatal "cannot create $T.lock"
command -v flock >/dev/null 2>&1 && flock -n 8
# What interrupted transactions left: a lock nobody holds is a runner gone.
for bottle_l in {TXN_DIR}/*.lock; do
  [ -f "$bottle_l" ] && [ "$bottle_l" != "$T.lock" ] || continue
  if (flock -n 7) 7<"$bottle_l" 2>/dev/null; then
    bottle_o=${{bottle_l%.lock}}
    rm -rf "$bottle_o" "$bottle_o.tar" "{STAGE_DIR}/${{bottle_o##*/}}" "$bottle_l"
  fi
done
for bottle_l in {TXN_DIR}/*.tar; do
  [ -f "$bottle_l" ] && [ "$bottle_l" != "$T.tar" ] && [ ! -e "${{bottle_l%.tar}}.lock" ] && rm -f "$bottle_l"
done
# Files an interrupted run of an earlier bottle staged.
for bottle_l in {STAGE_DIR}/*; do [ -f "$bottle_l" ] && rm -f "$bottle_l"; done
trap 'rm -rf "$T" "$S" "$T.tar" "$T.lock"' EXIT
(umask 022 && mkdir -p {STAGE_DIR}) && chmod 711 {STAGE_DIR} && mkdir "$S" && chmod 711 "$S" || bottle_fatal "cannot create $S"
mkdir "$T" || bottle_fatal "cannot create $T"
bottle_err=$(tar -xof "$T.tar" -C "$T" 2>&1) || bottle_fatal "cannot unpack the transaction (the image needs tar): $bottle_err"
rm -f "$T.tar"
bottle_ids() {{ bottle_uid=$(id -u "$bottle_user" 2>/dev/null); bottle_gid=$(id -g "$bottle_user" 2>/dev/null); }}
bottle_stage() {{
  if [ -n "$2" ]; then bottle_so="$(id -u "$2"):$(id -g "$2")"; else bottle_so="$bottle_uid:$bottle_gid"; fi
  bottle_f=$(mktemp "$S/XXXXXXXXXXXXXXXX") && cp "$1" "$bottle_f" && chown "$bottle_so" "$bottle_f" && chmod 600 "$bottle_f" && printf '%s\n' "$bottle_f"
}}
bottle_as() {{
  bottle_au=$1; bottle_ab=$2; shift 2
  case $bottle_au in root) bottle_ah=/root ;; *) bottle_ah=/home/$bottle_au ;; esac
  (cd "$bottle_ah" 2>/dev/null || cd /; sh -c {as_user} "$bottle_au" env "HOME=$bottle_ah" sh -c "$bottle_ab" sh "$@" 8>&- 9>&-)
}}
bottle_sub() {{
  bottle_t=$1; bottle_r=
  while :; do case $bottle_t in *"$2"*) bottle_r=$bottle_r${{bottle_t%%"$2"*}}$3; bottle_t=${{bottle_t#*"$2"}} ;; *) break ;; esac; done
  printf '%s' "$bottle_r$bottle_t"
}}
bottle_fill() {{
  bottle_x=$(bottle_sub "$1" {kd} "\"$bottle_digest\"")
  case $bottle_x in *{ku}*|*{kg}*)
    bottle_x=$(bottle_sub "$bottle_x" {ku} "${{bottle_uid:-null}}")
    bottle_x=$(bottle_sub "$bottle_x" {kg} "${{bottle_gid:-null}}") ;;
  esac
  if [ -f "$P/fill" ]; then
    while read -r bottle_fk bottle_fv; do
      case "$bottle_fk" in ''|*[!a-z0-9]*) continue ;; esac
      case "$bottle_fv" in *[!a-z0-9]*) continue ;; esac
      bottle_x=$(bottle_sub "$bottle_x" "\"\\u0000bottle:fill:$bottle_fk\"" "\"$bottle_fv\"")
    done < "$P/fill"
  fi
  printf '%s' "$bottle_x"
}}
"#,
        fatal_hex = hex_of("printf '%s' \"$1\""),
        as_user = sh_quote(AS_USER),
        kd = key(DIGEST_PLACEHOLDER),
        ku = key(UID_PLACEHOLDER),
        kg = key(GID_PLACEHOLDER),
    );
    let wait = LOCK_WAIT.as_secs();
    for (i, step) in steps.iter().enumerate() {
        let ledger_path = LedgerEntry::guest_path(&step.step);
        let (template, ledger) = match &step.ledger {
            Ledger::Write(entry) => {
                let mut entry = entry.clone();
                entry.digest = DIGEST_PLACEHOLDER.to_owned();
                (
                    serde_json::to_string(&entry).expect("ledger entries serialize"),
                    format!(
                        "bottle_entry=$(bottle_fill \"$bottle_t\") && mkdir -p {LEDGER_DIR} && \
                         printf '%s\\n' \"$bottle_entry\" > {ledger_path}.tmp && mv -f {ledger_path}.tmp {ledger_path} || exit 1"
                    ),
                )
            }
            Ledger::Remove => (String::new(), format!("rm -f {ledger_path} || exit 1")),
        };
        args.push(template);
        let template_at = args.len();
        let start = args.len() + 1;
        args.extend(step.work.args.iter().cloned());
        let digest = match &step.work.recorded {
            Recorded::Nothing => "bottle_digest=".to_owned(),
            Recorded::Known(d) => format!("bottle_digest={}", sh_quote(d)),
            Recorded::Expected(fragment) => {
                format!("bottle_digest=$( ( {fragment}\n) 2>/dev/null | sha256sum | cut -c1-64 )")
            }
        };
        let deps: String = step
            .after
            .iter()
            .map(|d| format!("[ \"$bottle_s_{d}\" = done ] || bottle_dep=${{bottle_dep:-{d}}}\n"))
            .collect();
        script.push_str(&format!(
            "# step {i}: {name}\nbottle_dep=\n{deps}if [ -z \"$bottle_dep\" ]; then\n\
             [ -n \"$bottle_uid\" ] || bottle_ids\n\
             (\n{preamble}mkdir -p \"$T/p/{i}\" && cd \"$T/p/{i}\" || exit 1\nP=$PWD\n\
             bottle_t=${{{template_at}}}\n{slice}( umask 022\n{body}\n)\nbottle_rc=$?; [ $bottle_rc -eq 0 ] || exit $bottle_rc\n\
             {refresh}{digest}\numask 077\n{ledger}\n\
             ) >/dev/null 2>\"$T/e.{i}\"\n\
             bottle_rc=$?\n\
             if [ $bottle_rc -eq 0 ]; then bottle_s_{i}=done; echo \"{MARK} {i} done\"\n\
             else bottle_s_{i}=failed; echo \"{MARK} {i} failed $bottle_rc {err_hex}\"; fi\n\
             else bottle_s_{i}=skipped; echo \"{MARK} {i} skipped $bottle_dep\"; fi\n",
            name = sanitize(&step.step),
            // The machine step creates the user its ids come from.
            refresh = if step.step == "machine" { "bottle_ids\n" } else { "" },
            preamble = lock_preamble(LOCK_DIR, &step.step, wait),
            slice = slice(start, step.work.args.len()),
            body = step.work.script,
            err_hex = hex_of(&format!("tail -c 4000 \"$T/e.{i}\"")),
        ));
    }
    script.push_str(&format!("echo '{MARK} end'\n"));
    (script, args)
}

/// A step id in a shell comment (ids are `[a-z0-9:-]`; anything else goes).
fn sanitize(id: &str) -> String {
    id.chars()
        .filter(|c| c.is_ascii_alphanumeric() || ":-_".contains(*c))
        .collect()
}

fn decode_hex(text: &str) -> String {
    let bytes: Vec<u8> = text
        .as_bytes()
        .chunks(2)
        .filter_map(|pair| u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok())
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The runner's report, step by step.
fn parse(
    machine: &str,
    steps: &[TxnStep],
    stdout: &str,
    stderr: &str,
    status: i32,
) -> Vec<StepOutcome> {
    let mut outcomes: Vec<Option<StepOutcome>> = steps.iter().map(|_| None).collect();
    let mut fatal = None;
    let mut ended = false;
    for line in stdout.lines() {
        let Some(rest) = line.strip_prefix(MARK) else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let (Some(first), second) = (words.next(), words.next()) else {
            continue;
        };
        if first == "end" {
            ended = true;
            continue;
        }
        if first == "fatal" {
            fatal = Some(decode_hex(second.unwrap_or_default()));
            continue;
        }
        let Some(i) = first.parse::<usize>().ok().filter(|i| *i < steps.len()) else {
            continue;
        };
        let step = &steps[i];
        outcomes[i] = match second {
            Some("done") => Some(StepOutcome::Done),
            Some("skipped") => words
                .next()
                .and_then(|d| d.parse().ok())
                .map(StepOutcome::Skipped),
            Some("failed") => {
                let status: i32 = words.next().and_then(|s| s.parse().ok()).unwrap_or(1);
                let stderr = decode_hex(words.next().unwrap_or_default());
                Some(StepOutcome::Failed(
                    lock_failure(machine, &step.step, status, &stderr).unwrap_or_else(|| {
                        StepError::Guest {
                            what: step.work.what.clone(),
                            status,
                            stderr: tail(&stderr, 2000),
                            help: step.work.help.clone(),
                        }
                    }),
                ))
            }
            _ => None,
        };
    }
    let cut_short = match (&fatal, ended) {
        (Some(message), _) => Some(StepError::Other(
            format!("the guest transaction failed: {message}"),
            "check the guest's /var/lib/bottle (free space, tar)".into(),
        )),
        (None, false) => Some(StepError::Other(
            format!(
                "the guest transaction ended early (exit status {status}){}",
                match stderr.trim() {
                    "" => String::new(),
                    text => format!(": {}", tail(text, 1000)),
                }
            ),
            "run `bottle apply` again; the steps that completed are kept".into(),
        )),
        (None, true) => None,
    };
    outcomes
        .into_iter()
        .map(|o| {
            o.unwrap_or_else(|| {
                StepOutcome::Failed(match &cut_short {
                    Some(StepError::Other(m, h)) => StepError::Other(m.clone(), h.clone()),
                    _ => StepError::Other(
                        "the guest transaction did not report this step".into(),
                        "run `bottle apply` again".into(),
                    ),
                })
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(id: &str) -> TxnStep {
        TxnStep {
            step: id.into(),
            work: Work::new("doing it", "try again", ""),
            ledger: Ledger::Remove,
            after: vec![],
        }
    }

    fn hex(text: &str) -> String {
        text.bytes().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn each_step_gets_its_own_outcome() {
        let steps = [step("ca"), step("prompt"), step("setup:tools"), step("git")];
        let out = format!(
            "{MARK} 0 done\n{MARK} 1 failed 3 {}\n{MARK} 2 skipped 1\n\
             {MARK} 3 failed 98 {}\n{MARK} end\n",
            hex("oops\n"),
            hex("bottle-lock: busy\n")
        );
        let outcomes = parse("m1", &steps, &out, "", 0);
        assert!(matches!(outcomes[0], StepOutcome::Done));
        let StepOutcome::Failed(e) = &outcomes[1] else {
            panic!("{outcomes:?}")
        };
        assert_eq!(
            e.to_string(),
            "doing it failed in the guest (exit status 3): oops"
        );
        assert!(matches!(outcomes[2], StepOutcome::Skipped(1)));
        assert!(
            matches!(&outcomes[3], StepOutcome::Failed(StepError::StepBusy { step, .. }) if step == "git"),
            "{outcomes:?}"
        );
    }

    #[test]
    fn a_transaction_cut_short_fails_what_it_did_not_report() {
        let steps = [step("ca"), step("prompt")];
        let outcomes = parse("m1", &steps, &format!("{MARK} 0 done\n"), "killed", 137);
        assert!(matches!(outcomes[0], StepOutcome::Done));
        let StepOutcome::Failed(e) = &outcomes[1] else {
            panic!("{outcomes:?}")
        };
        assert!(
            e.to_string()
                .contains("ended early (exit status 137): killed"),
            "{e}"
        );
        let fatal = format!("{MARK} fatal {}\n", hex("cannot unpack"));
        let outcomes = parse("m1", &steps, &fatal, "", 1);
        assert!(outcomes.iter().all(|o| matches!(o, StepOutcome::Failed(e)
            if e.to_string().contains("cannot unpack"))));
    }

    /// Guest output never decides an outcome unless it is the runner's own
    /// line: each step's output goes to files, and a line that is not
    /// well-formed is ignored.
    #[test]
    fn only_the_runners_lines_count() {
        let steps = [step("prompt")];
        let out = format!("{MARK} 7 done\n{MARK} x done\n{MARK}\n{MARK} end\n");
        let outcomes = parse("m1", &steps, &out, "", 0);
        assert!(
            matches!(outcomes[0], StepOutcome::Failed(_)),
            "{outcomes:?}"
        );
    }
}
