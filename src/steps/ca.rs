//! The ca step: the bottle's CA certificate in the guest trust store; with
//! a gate, the project CA too (the gate intercepts TLS with it).

use super::{
    AgentCtx, Payload, Recorded, Step, StepCx, StepError, StepResult, Work, digest, sh_quote,
    sha256_hex,
};
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

const HELP: &str = "the image needs the ca-certificates package (update-ca-certificates)";

/// Root, in the payload directory: `cert<i>` goes to the `i`th path of
/// `"$@"`, then the trust store is updated.
const INSTALL: &str = r#"set -e
i=0
for path do
  mkdir -p "$(dirname "$path")"
  cp "cert$i" "$path.bottle-tmp" && chmod 644 "$path.bottle-tmp" && mv -f "$path.bottle-tmp" "$path"
  i=$((i+1))
done
update-ca-certificates >/dev/null 2>&1 || update-ca-certificates >&2 || exit 1
"#;

/// Shell run after [`INSTALL`]: the probe of each certificate compared
/// with what it prints once bottle's certificate is there and trusted
/// (`expected<i>`), failing the step, naming the certificate, otherwise.
fn verify(paths: &[String], machine: &str) -> String {
    let mut script = String::from("bottle_bad=0\n");
    for (i, path) in paths.iter().enumerate() {
        let p = sh_quote(path);
        script.push_str(&format!(
            "( {probe} ) > got{i} 2>/dev/null || true\n\
             if [ \"$(cat got{i})\" != \"$(cat expected{i})\" ]; then bottle_bad=1\n\
             \x20 if [ \"$(sed -n 2p got{i})\" = untrusted ]; then bottle_found='is not in the trust bundle'; else bottle_found='is not what bottle uploaded'; fi\n\
             \x20 echo \"the CA certificate \"{p}\" $bottle_found after update-ca-certificates in machine \"{m}\" (bottle checks {BUNDLE})\" >&2\n\
             fi\n",
            probe = probe_of(path, BUNDLE),
            m = sh_quote(machine),
        ));
    }
    script.push_str("[ \"$bottle_bad\" = 0 ]\n");
    script
}

impl Step for CaStep {
    fn noun(&self) -> String {
        "CA certificate".into()
    }

    fn probe(&self, ctx: &AgentCtx) -> Option<String> {
        Some(probe(ctx))
    }

    fn drift_path(&self, ctx: &AgentCtx) -> String {
        certs(ctx)
            .into_iter()
            .next()
            .map(|(_, guest)| guest)
            .unwrap_or_else(|| cert_path(ctx))
    }

    /// Install the certificates and update the trust store; recorded only
    /// when the probe then shows each certificate in the trust bundle (an
    /// image whose `update-ca-certificates` leaves it out, or a copy that
    /// did nothing, is a failure, never an applied step).
    fn apply(&self, cx: &StepCx, entry: &mut LedgerEntry) -> StepResult<Work> {
        let ctx = cx.ctx;
        let certs = certs(ctx);
        if certs.is_empty() || ctx.gate.is_some_and(|g| !g.ca_cert.is_file()) {
            return Err(StepError::Other(
                format!("the CA certificate for {} is not there yet", ctx.machine),
                "the gate mints the project CA when it first starts: run `bottle apply` again \
                 once the gate runs (`bottle status`)"
                    .into(),
            ));
        }
        let paths: Vec<String> = certs.iter().map(|(_, guest)| guest.clone()).collect();
        let mut work = Work::new(
            "update-ca-certificates",
            &format!(
                "{HELP}: bottle checks {BUNDLE}, so use an image whose update-ca-certificates \
                 writes that bundle, then run `bottle apply` again"
            ),
            format!("{INSTALL}{}", verify(&paths, ctx.machine)),
        )
        .args(paths.clone());
        let mut expected = String::new();
        for (i, (host, _)) in certs.iter().enumerate() {
            let pem = std::fs::read(host).map_err(|e| {
                StepError::Other(
                    format!("cannot read CA certificate {}: {e}", host.display()),
                    "check that the file exists and is readable".into(),
                )
            })?;
            let want = expected_probe(&pem);
            expected.push_str(&want);
            work = work
                .file(Payload::new(&format!("cert{i}"), pem, 0o644))
                .file(Payload::new(
                    &format!("expected{i}"),
                    want.into_bytes(),
                    0o600,
                ));
        }
        entry.paths = paths;
        // What bottle sent, trusted: a bundle without it is drift.
        Ok(work.recorded(Recorded::Known(digest(&expected))))
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
