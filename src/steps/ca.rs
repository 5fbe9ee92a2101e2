//! The ca step: the bottle's CA certificate in the guest trust store; with
//! a gate, the project CA too (the gate intercepts TLS with it).

use super::{AgentCtx, StepResult, digest, run_script, sh_quote, upload_file};
use crate::ledger::LedgerEntry;
use crate::runtime::{CopyOptions, Runtime};

const CA_DIR: &str = "/usr/local/share/ca-certificates";

/// Where the certificate goes; `update-ca-certificates` adds it to the
/// trust bundle.
pub fn cert_path(ctx: &AgentCtx) -> String {
    format!("{CA_DIR}/bottle-{}.crt", ctx.bottle.name)
}

/// The trust bundle `update-ca-certificates` writes, on Debian and Alpine.
const BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Where the project CA goes in a guest of a gated bottle.
pub fn gate_cert_path(ctx: &AgentCtx) -> String {
    format!("{CA_DIR}/bottle-{}-gate.crt", ctx.bottle.name)
}

/// The certificates the step installs: (host file, guest path), the
/// project CA first.
fn certs(ctx: &AgentCtx) -> Vec<(std::path::PathBuf, String)> {
    let mut out = Vec::new();
    if let Some(gate) = ctx.gate {
        out.push((gate.ca_cert.clone(), gate_cert_path(ctx)));
    }
    if let Some(cert) = &ctx.bottle.ca_cert {
        out.push((cert.clone(), cert_path(ctx)));
    }
    out
}

/// The certificate's hash, and whether the bundle holds it (its last
/// base64 line, the end of the signature, is unique to it); for each
/// certificate the step installs.
pub fn probe(ctx: &AgentCtx) -> String {
    let paths: Vec<String> = match certs(ctx) {
        c if c.is_empty() => vec![cert_path(ctx)],
        c => c.into_iter().map(|(_, guest)| guest).collect(),
    };
    paths
        .iter()
        .map(|p| probe_one(p))
        .collect::<Vec<_>>()
        .join("; ")
}

fn probe_one(path: &str) -> String {
    let cert = sh_quote(path);
    format!(
        "if [ -f {cert} ]; then sha256sum < {cert}; \
         if grep -qF \"$(tail -n 2 {cert} | head -n 1)\" {BUNDLE}; then echo trusted; else echo untrusted; fi; \
         else echo missing; fi"
    )
}

pub fn apply(ctx: &AgentCtx, rt: &dyn Runtime, entry: &mut LedgerEntry) -> StepResult<Vec<String>> {
    let certs = certs(ctx);
    if certs.is_empty() || ctx.gate.is_some_and(|g| !g.ca_cert.is_file()) {
        return Err(super::StepError::Other(
            format!("the CA certificate for {} is not there yet", ctx.machine),
            "the gate mints the project CA when it first starts: run `bottle apply` again \
             once the gate runs (`bottle status`)"
                .into(),
        ));
    }
    for (host, path) in &certs {
        upload_file(
            rt,
            ctx.machine,
            host,
            path,
            &CopyOptions {
                mode: 0o644,
                uid: 0,
                gid: 0,
            },
        )?;
    }
    let out = run_script(
        rt,
        ctx.machine,
        &entry.step,
        "update-ca-certificates",
        &format!(
            "update-ca-certificates >/dev/null 2>&1 || update-ca-certificates >&2 || exit 1; {}",
            probe(ctx)
        ),
        &[],
        "the image needs the ca-certificates package (update-ca-certificates)",
    )?;
    entry.digest = digest(&out);
    entry.paths = certs.into_iter().map(|(_, guest)| guest).collect();
    Ok(Vec::new())
}

pub fn undo(entry: &LedgerEntry, ctx: &AgentCtx, rt: &dyn Runtime) -> StepResult<()> {
    let mut args: Vec<&str> = entry.paths.iter().map(String::as_str).collect();
    args.retain(|p| p.starts_with(CA_DIR));
    run_script(
        rt,
        ctx.machine,
        &entry.step,
        "removing the CA certificate",
        "rm -f \"$@\" && update-ca-certificates --fresh >/dev/null 2>&1 || update-ca-certificates --fresh >&2",
        &args,
        "the image needs the ca-certificates package (update-ca-certificates)",
    )?;
    Ok(())
}
