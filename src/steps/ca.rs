//! The ca step: the bottle's CA certificate in the guest trust store.

use super::{AgentCtx, Payload, Recorded, Step, StepCx, StepError, StepResult, Work, sh_quote};
use crate::ledger::LedgerEntry;

pub struct CaStep;

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

const HELP: &str = "the image needs the ca-certificates package (update-ca-certificates)";

/// Root, in the payload directory: `$1` the certificate's path.
const APPLY: &str = r#"set -e
mkdir -p "$(dirname "$1")"
cp cert "$1.bottle-tmp" && chmod 644 "$1.bottle-tmp" && mv -f "$1.bottle-tmp" "$1"
update-ca-certificates >/dev/null 2>&1 || update-ca-certificates >&2 || exit 1
"#;

impl Step for CaStep {
    fn noun(&self) -> String {
        "CA certificate".into()
    }

    fn probe(&self, ctx: &AgentCtx) -> Option<String> {
        Some(probe(ctx))
    }

    fn drift_path(&self, ctx: &AgentCtx) -> String {
        cert_path(ctx)
    }

    fn apply(&self, cx: &StepCx, entry: &mut LedgerEntry) -> StepResult<Work> {
        let host = cx
            .ctx
            .bottle
            .ca_cert
            .as_ref()
            .expect("the ca step exists only with a cert");
        let pem = std::fs::read(host).map_err(|e| {
            StepError::Other(
                format!("cannot read the CA certificate {}: {e}", host.display()),
                "check that the file exists and is readable".into(),
            )
        })?;
        let path = cert_path(cx.ctx);
        entry.paths = vec![path.clone()];
        // What bottle sent, trusted: a bundle without it is drift.
        Ok(Work::new("update-ca-certificates", HELP, APPLY)
            .file(Payload::new("cert", pem, 0o644))
            .args([path])
            .recorded(Recorded::Expected(
                "sha256sum < \"$P/cert\"; echo trusted".to_owned(),
            )))
    }

    fn undo(&self, _cx: &StepCx, entry: &LedgerEntry) -> StepResult<Work> {
        let mut args: Vec<String> = entry.paths.clone();
        args.retain(|p| p.starts_with(CA_DIR));
        Ok(Work::new(
            "removing the CA certificate",
            HELP,
            "rm -f \"$@\" && update-ca-certificates --fresh >/dev/null 2>&1 || update-ca-certificates --fresh >&2",
        )
        .args(args))
    }
}
