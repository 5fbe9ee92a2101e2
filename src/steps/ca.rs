//! The ca step: the bottle's CA certificate in the guest trust store.

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

/// The certificate's hash, and whether the bundle holds it (its last
/// base64 line, the end of the signature, is unique to it).
pub fn probe(ctx: &AgentCtx) -> String {
    let cert = sh_quote(&cert_path(ctx));
    format!(
        "if [ -f {cert} ]; then sha256sum < {cert}; \
         if grep -qF \"$(tail -n 2 {cert} | head -n 1)\" {BUNDLE}; then echo trusted; else echo untrusted; fi; \
         else echo missing; fi"
    )
}

pub fn apply(ctx: &AgentCtx, rt: &dyn Runtime, entry: &mut LedgerEntry) -> StepResult<Vec<String>> {
    let host = ctx
        .bottle
        .ca_cert
        .as_ref()
        .expect("the ca step exists only with a cert");
    let path = cert_path(ctx);
    upload_file(
        rt,
        ctx.machine,
        host,
        &path,
        &CopyOptions {
            mode: 0o644,
            uid: 0,
            gid: 0,
        },
    )?;
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
    entry.paths = vec![path];
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
