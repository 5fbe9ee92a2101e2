//! The ca step: the bottle's CA certificate in the guest trust store; with
//! a gate, the project CA too (the gate intercepts TLS with it).

use super::{AgentCtx, StepError, StepResult, digest, run_script, sh_quote, sha256_hex, upload};
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

/// For each certificate the step installs (the project CA first), its
/// hash, then `trusted` when the bundle holds every certificate of the
/// file (each one's base64 body, compared with line breaks removed, so the
/// bundle's own wrapping does not matter), `untrusted` otherwise; `missing`
/// without the file.
pub fn probe(ctx: &AgentCtx) -> String {
    let paths: Vec<String> = match certs(ctx) {
        c if c.is_empty() => vec![cert_path(ctx)],
        c => c.into_iter().map(|(_, guest)| guest).collect(),
    };
    paths
        .iter()
        .map(|p| probe_of(p, BUNDLE))
        .collect::<Vec<_>>()
        .join("; ")
}

fn probe_of(cert: &str, bundle: &str) -> String {
    let cert = sh_quote(cert);
    let bundle = sh_quote(bundle);
    format!(
        "if [ -f {cert} ]; then sha256sum < {cert}; \
         bottle_bundle=$(tr -d '\r\n' < {bundle} 2>/dev/null); bottle_ca=; \
         for bottle_body in $(awk '/^-----BEGIN/{{b=\"\";next}} /^-----END/{{print b;next}} {{sub(/\r$/,\"\");b=b $0}}' {cert}); do \
         case \"$bottle_bundle\" in *\"$bottle_body\"*) bottle_ca=${{bottle_ca:-trusted}} ;; *) bottle_ca=untrusted ;; esac; \
         done; echo \"${{bottle_ca:-untrusted}}\"; \
         else echo missing; fi"
    )
}

/// What [`probe`] prints once the certificate is installed and trusted.
pub fn expected_probe(cert: &[u8]) -> String {
    format!("{}  -\ntrusted\n", sha256_hex(cert))
}

/// Upload the certificate and update the trust store; recorded only when
/// the probe then shows the certificate in the trust bundle (an image
/// whose `update-ca-certificates` leaves it out, or an upload that did
/// nothing, is a failure, never an applied step).
pub fn apply(ctx: &AgentCtx, rt: &dyn Runtime, entry: &mut LedgerEntry) -> StepResult<Vec<String>> {
    let certs = certs(ctx);
    if certs.is_empty() || ctx.gate.is_some_and(|g| !g.ca_cert.is_file()) {
        return Err(StepError::Other(
            format!("the CA certificate for {} is not there yet", ctx.machine),
            "the gate mints the project CA when it first starts: run `bottle apply` again \
             once the gate runs (`bottle status`)"
                .into(),
        ));
    }
    let mut uploaded = Vec::with_capacity(certs.len());
    for (host, path) in &certs {
        let cert = std::fs::read(host).map_err(|e| {
            StepError::Other(
                format!("cannot read CA certificate {}: {e}", host.display()),
                "check that the file exists and is readable".into(),
            )
        })?;
        upload(
            rt,
            ctx.machine,
            &cert,
            path,
            &CopyOptions {
                mode: 0o644,
                uid: 0,
                gid: 0,
            },
        )?;
        uploaded.push((cert, path.as_str()));
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
    // The probe's lines, certificate by certificate: two each when the
    // certificate is there (its hash, then `trusted`), one (`missing`) not.
    let mut lines = out.lines();
    let mut expected = String::new();
    for (cert, path) in &uploaded {
        let want = expected_probe(cert);
        let got = match lines.next() {
            Some(first) if first != "missing" => {
                format!("{first}\n{}\n", lines.next().unwrap_or(""))
            }
            other => format!("{}\n", other.unwrap_or("")),
        };
        if got != want {
            let found = match got.lines().nth(1) {
                Some("untrusted") => "is not in the trust bundle",
                _ => "is not what bottle uploaded",
            };
            return Err(StepError::Other(
                format!(
                    "the CA certificate {path} {found} after update-ca-certificates in machine {}",
                    ctx.machine
                ),
                format!(
                    "bottle checks {BUNDLE}: use an image whose update-ca-certificates (the \
                     ca-certificates package) writes that bundle, then run `bottle apply` again"
                ),
            ));
        }
        expected.push_str(&want);
    }
    if out != expected {
        return Err(StepError::Other(
            format!(
                "the CA certificates of machine {} are not what bottle uploaded after \
                 update-ca-certificates",
                ctx.machine
            ),
            "run `bottle apply` again; if it persists, check the image's update-ca-certificates"
                .into(),
        ));
    }
    entry.digest = digest(&expected);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::steps::tests::{output, sh, text};

    const BODY_A: [&str; 2] = [
        "MIIBszCCAVmgAwIBAgIUQk9UVExFLUEtVEVTVC1DRVJUSUZJQ0FURTAKBggqhkjO",
        "PQQDAjAPMQ0wCwYDVQQDDARib3R0bGU=",
    ];
    const BODY_B: [&str; 2] = [
        "MIIBszCCAVmgAwIBAgIUQk9UVExFLUItVEVTVC1DRVJUSUZJQ0FURTAKBggqhkjO",
        "PQQDAjAPMQ0wCwYDVQQDDARvdGhlcg==",
    ];

    fn pem(body: &[&str]) -> String {
        format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            body.join("\n")
        )
    }

    /// The probe, run by the host's `sh` on a certificate and a bundle.
    fn run(cert: &str, bundle: Option<&str>) -> String {
        let dir = tempfile::tempdir().unwrap();
        let cert_path = dir.path().join("bottle.crt");
        let bundle_path = dir.path().join("bundle.crt");
        std::fs::write(&cert_path, cert).unwrap();
        if let Some(bundle) = bundle {
            std::fs::write(&bundle_path, bundle).unwrap();
        }
        let out = output(sh(
            &probe_of(cert_path.to_str().unwrap(), bundle_path.to_str().unwrap()),
            &[],
        ));
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    }

    #[test]
    fn trusted_only_when_the_bundle_holds_every_certificate_of_the_file() {
        let a = pem(&BODY_A);
        let b = pem(&BODY_B);
        // In the bundle, wrapped differently: trusted, as bottle expects.
        let rewrapped = format!(
            "{b}-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            BODY_A
                .concat()
                .as_bytes()
                .chunks(40)
                .map(|c| std::str::from_utf8(c).unwrap())
                .collect::<Vec<_>>()
                .join("\n")
        );
        assert_eq!(run(&a, Some(&rewrapped)), expected_probe(a.as_bytes()));
        // Only its last line in the bundle (another certificate's end), or
        // no bundle at all: untrusted.
        let tail_only = format!("{b}{}\n", BODY_A[1]);
        assert!(run(&a, Some(&tail_only)).ends_with("\nuntrusted\n"));
        assert!(run(&a, None).ends_with("\nuntrusted\n"));
        // Two certificates in the file: both must be there.
        let both = format!("{a}{b}");
        assert!(run(&both, Some(&a)).ends_with("\nuntrusted\n"));
        assert!(run(&both, Some(&format!("{b}{a}"))).ends_with("\ntrusted\n"));
        // A file with no certificate is never trusted.
        assert!(run("not a certificate\n", Some(&a)).ends_with("\nuntrusted\n"));
    }
}
