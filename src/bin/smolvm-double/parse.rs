//! smolvm's argument rules, with its error texts: machine names, labels,
//! secret references, volumes, CIDRs, durations, modes.
//!
//! Sources: `src/util.rs` (`parse_labels`), `src/cli/parsers.rs`
//! (`parse_cidr`), `src/data/storage.rs` (`HostMount`), the secret parser
//! and `cp` in `src/cli/machine.rs`, and smolvm-cli.md for the name rules.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::failure::Failure;

/// The longest machine name smolvm accepts.
const MAX_NAME_LENGTH: usize = 128;

/// 1–128 ASCII letters, digits, `-`, `_`; starts with a letter or digit;
/// does not end with `-`; no `--`.
pub fn check_name(name: &str) -> Result<(), Failure> {
    // The order of smolvm's checks decides which message a name with two
    // faults gets.
    let reason = if name.is_empty() {
        Some("machine name cannot be empty".to_owned())
    } else if name.len() > MAX_NAME_LENGTH {
        Some(format!(
            "machine name too long: {} characters (max {MAX_NAME_LENGTH})",
            name.len()
        ))
    } else if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        Some(format!(
            "machine name must start with a letter or digit (got: \"{name}\")"
        ))
    } else if name.ends_with('-') {
        Some(format!(
            "machine name cannot end with a hyphen (got: \"{name}\")"
        ))
    } else {
        let mut previous = ' ';
        name.chars().find_map(|c| {
            let reason = if c == '-' && previous == '-' {
                Some("machine name cannot contain consecutive hyphens".to_owned())
            } else if !c.is_ascii_alphanumeric() && c != '-' && c != '_' {
                Some(format!("machine name contains invalid character: '{c}'"))
            } else {
                None
            };
            previous = c;
            reason
        })
    };
    match reason {
        Some(reason) => Err(Failure::config("create machine", reason)),
        None => Ok(()),
    }
}

/// `--label KEY=VALUE`: split at the first `=`, empty values allowed, a
/// later repeat of a key wins.
pub fn labels(raw: &[String]) -> Result<BTreeMap<String, String>, Failure> {
    let mut labels = BTreeMap::new();
    for entry in raw {
        let Some((key, value)) = entry.split_once('=') else {
            return Err(Failure::config(
                "--label",
                format!("expected KEY=VALUE, got '{entry}'"),
            ));
        };
        if key.is_empty() {
            return Err(Failure::config(
                "--label",
                format!("label key cannot be empty (in '{entry}')"),
            ));
        }
        labels.insert(key.to_owned(), value.to_owned());
    }
    Ok(labels)
}

/// A secret by reference, as smolvm stores it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecretRef {
    FromEnv(String),
    FromFile(PathBuf),
}

/// `--secret-env GUEST=HOSTVAR` and `--secret-file GUEST=/abs/path`; a
/// guest name given twice, across or within the flags, is an error.
pub fn secrets(
    secret_env: &[String],
    secret_file: &[String],
) -> Result<BTreeMap<String, SecretRef>, Failure> {
    let mut refs = BTreeMap::new();
    let flagged = secret_env
        .iter()
        .map(|spec| ("--secret-env", spec))
        .chain(secret_file.iter().map(|spec| ("--secret-file", spec)));
    for (flag, spec) in flagged {
        let Some((key, value)) = spec.split_once('=') else {
            return Err(Failure::config(
                flag,
                format!("expected KEY=VALUE, got '{spec}'"),
            ));
        };
        if key.is_empty() {
            return Err(Failure::config(
                flag,
                format!("empty secret name in '{spec}'"),
            ));
        }
        let secret = if flag == "--secret-env" {
            if value.is_empty() {
                return Err(Failure::config(
                    flag,
                    format!("secret '{key}': host variable name is empty"),
                ));
            }
            SecretRef::FromEnv(value.to_owned())
        } else {
            if !value.starts_with('/') {
                return Err(Failure::config(
                    flag,
                    format!(
                        "secret '{key}': from_file path '{value}' is relative; absolute paths are \
                         required"
                    ),
                ));
            }
            SecretRef::FromFile(value.into())
        };
        if refs.insert(key.to_owned(), secret).is_some() {
            return Err(Failure::config(
                flag,
                format!("secret '{key}' specified more than once"),
            ));
        }
    }
    Ok(refs)
}

/// Resolve secret references to `(guest name, value)` on the host, as
/// smolvm does at each launch.
pub fn resolve_secrets(
    refs: &BTreeMap<String, SecretRef>,
) -> Result<Vec<(String, String)>, Failure> {
    refs.iter()
        .map(|(guest, secret)| {
            let value = match secret {
                SecretRef::FromEnv(var) => std::env::var(var).map_err(|_| {
                    Failure::config(
                        "resolve secrets",
                        format!("secret '{guest}': host environment variable '{var}' is not set"),
                    )
                })?,
                // bottle's one secret-file reader: smolvm's rules.
                SecretRef::FromFile(path) => bottle::secrets::read_secret_file(path)
                    .map_err(|error| error.to_string())
                    .and_then(|v| String::from_utf8(v).map_err(|_| "is not UTF-8".to_owned()))
                    .map_err(|error| {
                        Failure::config(
                            "resolve secrets",
                            format!("secret '{guest}': {} {error}", path.display()),
                        )
                    })?,
            };
            Ok((guest.clone(), value))
        })
        .collect()
}

/// `-e KEY=VALUE`; `-e KEY` forwards the host's value. Malformed entries
/// are skipped, as smolvm skips them.
pub fn env(specs: &[String]) -> Vec<(String, String)> {
    specs
        .iter()
        .filter_map(|spec| match spec.split_once('=') {
            Some((key, value)) if !key.is_empty() => Some((key.to_owned(), value.to_owned())),
            Some(_) => None,
            None if spec.is_empty() => None,
            None => std::env::var(spec).ok().map(|value| (spec.clone(), value)),
        })
        .collect()
}

/// A host directory mounted into the guest.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Mount {
    pub source: PathBuf,
    pub target: String,
    pub read_only: bool,
}

/// `HOST:GUEST[:ro|:rw]`: the host side must be an existing directory and
/// is canonicalised; the guest side is the part after the last `:`, so a
/// host path may contain `:` (smolvm accepts `/a:b:/w`).
pub fn mount(spec: &str) -> Result<Mount, Failure> {
    let (rest, read_only) = if let Some(rest) = spec.strip_suffix(":ro") {
        (rest, true)
    } else if let Some(rest) = spec.strip_suffix(":rw") {
        (rest, false)
    } else {
        (spec, false)
    };
    let Some((source, target)) = rest
        .rsplit_once(':')
        .filter(|(s, t)| !s.is_empty() && !t.is_empty())
    else {
        return Err(Failure::new(format!(
            "invalid mount path: invalid format '{spec}' (expected host:guest[:ro|:rw])"
        )));
    };
    let path = PathBuf::from(source);
    if !path.exists() {
        return Err(Failure::new(format!(
            "mount source not found: {}",
            path.display()
        )));
    }
    if !path.is_dir() {
        return Err(Failure::new(format!(
            "mount operation failed: validate host path: path must be a directory \
             (virtiofs limitation): {}",
            path.display()
        )));
    }
    let source = path.canonicalize().map_err(|error| {
        Failure::new(format!(
            "mount operation failed: canonicalize host path: '{}': {error}",
            path.display()
        ))
    })?;
    if !target.starts_with('/') {
        return Err(Failure::new(format!(
            "mount operation failed: validate guest path: target path on guest should be an \
             absolute directory: {target}"
        )));
    }
    Ok(Mount {
        source,
        target: target.to_owned(),
        read_only,
    })
}

/// The first mount whose guest path (trailing `/` aside) an earlier mount
/// already uses, as smolvm names it: `/w/ is specified more than once`.
pub fn duplicate_target(mounts: &[Mount]) -> Option<&str> {
    let mut seen = std::collections::BTreeSet::new();
    mounts
        .iter()
        .find(|mount| {
            let normal = mount.target.trim_end_matches('/');
            !seen.insert(if normal.is_empty() { "/" } else { normal })
        })
        .map(|mount| mount.target.as_str())
}

/// The most vCPUs the hypervisor gives a VM; more are capped with a warning.
pub const MAX_VCPUS: u32 = 16;

/// smolvm's `validate resources`: at least 1 vCPU and 64 MiB.
pub fn check_resources(cpus: u32, memory_mib: u32) -> Result<(), Failure> {
    if cpus == 0 {
        return Err(Failure::config(
            "validate resources",
            "CPU count must be at least 1",
        ));
    }
    if memory_mib < 64 {
        return Err(Failure::config(
            "validate resources",
            format!("memory must be at least 64 MiB (got {memory_mib} MiB)"),
        ));
    }
    Ok(())
}

/// The warning smolvm prints (on stderr) for a machine with more vCPUs
/// than the hypervisor runs, at create, update and start.
pub fn vcpu_warning(cpus: u32) -> Option<String> {
    (cpus > MAX_VCPUS).then(|| {
        format!(
            "warning: requested {cpus} vCPUs but the hypervisor supports at most {MAX_VCPUS}; \
             the VM will run with {MAX_VCPUS} vCPUs"
        )
    })
}

/// clap value parser for `--allow-cidr`: `IP/prefix`, or a bare IP taken as
/// a single address. Returns the normalised form.
pub fn cidr(spec: &str) -> Result<String, String> {
    let (ip, prefix) = match spec.split_once('/') {
        Some((ip, prefix)) => (
            ip,
            prefix
                .parse::<u8>()
                .map_err(|_| format!("invalid prefix length in '{spec}': expected a number"))?,
        ),
        None => (spec, if spec.contains(':') { 128 } else { 32 }),
    };
    let ip: std::net::IpAddr = ip.parse().map_err(|_| {
        format!("invalid CIDR '{spec}': expected format like 10.0.0.0/8 or 1.1.1.1")
    })?;
    match ip {
        std::net::IpAddr::V4(_) if prefix > 32 => {
            Err(format!("invalid CIDR '{spec}': IPv4 prefix must be 0-32"))
        }
        std::net::IpAddr::V6(_) if prefix > 128 => {
            Err(format!("invalid CIDR '{spec}': IPv6 prefix must be 0-128"))
        }
        _ => Ok(format!("{ip}/{prefix}")),
    }
}

/// clap value parser for `--timeout`: humantime-style `30s`, `5m`, `1h30m`,
/// `1500ms`.
pub fn duration(spec: &str) -> Result<Duration, String> {
    let invalid = || format!("invalid duration '{spec}' (e.g. 30s, 5m, 1h)");
    let mut total = Duration::ZERO;
    let mut rest = spec.trim();
    if rest.is_empty() {
        return Err(invalid());
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let number: u64 = rest[..digits].parse().map_err(|_| invalid())?;
        rest = rest[digits..].trim_start();
        let unit_len = rest
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = rest[unit_len..].trim_start();
        total += match unit {
            "ns" | "nsec" => Duration::from_nanos(number),
            "us" | "usec" => Duration::from_micros(number),
            "ms" | "msec" | "millis" => Duration::from_millis(number),
            "s" | "sec" | "secs" | "second" | "seconds" => Duration::from_secs(number),
            "m" | "min" | "mins" | "minute" | "minutes" => Duration::from_secs(number * 60),
            "h" | "hr" | "hrs" | "hour" | "hours" => Duration::from_secs(number * 3600),
            "d" | "day" | "days" => Duration::from_secs(number * 86400),
            _ => return Err(invalid()),
        };
    }
    Ok(total)
}

/// `cp --mode`: chmod-style octal (`644`, `0755`, `0o600`), at most `7777`.
pub fn octal_mode(spec: &str) -> Result<u32, Failure> {
    u32::from_str_radix(spec.trim_start_matches("0o"), 8)
        .ok()
        .filter(|mode| *mode <= 0o7777)
        .ok_or_else(|| {
            Failure::config(
                "cp",
                format!("invalid octal mode '{spec}' (expected e.g. 644)"),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name_error(name: &str) -> String {
        check_name(name).unwrap_err().to_string()
    }

    #[test]
    fn name_rules_and_texts() {
        for good in ["a", "A1", "bottle-coder_2", "0x", &"a".repeat(128)] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        let prefix = "config operation failed: create machine: machine name ";
        for (bad, reason) in [
            ("", "cannot be empty"),
            (&"a".repeat(129), "too long: 129 characters (max 128)"),
            ("-a", "must start with a letter or digit (got: \"-a\")"),
            ("_a", "must start with a letter or digit (got: \"_a\")"),
            ("a-", "cannot end with a hyphen (got: \"a-\")"),
            ("a--b", "cannot contain consecutive hyphens"),
            ("a.b", "contains invalid character: '.'"),
            ("a:b", "contains invalid character: ':'"),
        ] {
            assert_eq!(name_error(bad), format!("{prefix}{reason}"), "{bad}");
        }
    }

    #[test]
    fn labels_split_at_the_first_equals_and_last_wins() {
        let parsed = labels(&["k=a=b".into(), "e=".into(), "k2=x".into(), "k2=y".into()]).unwrap();
        assert_eq!(parsed["k"], "a=b");
        assert_eq!(parsed["e"], "");
        assert_eq!(parsed["k2"], "y");
        assert_eq!(
            labels(&["novalue".into()]).unwrap_err().to_string(),
            "config operation failed: --label: expected KEY=VALUE, got 'novalue'"
        );
        assert_eq!(
            labels(&["=value".into()]).unwrap_err().to_string(),
            "config operation failed: --label: label key cannot be empty (in '=value')"
        );
    }

    #[test]
    fn secret_references() {
        let refs = secrets(&["TOKEN=GH_PAT".into()], &["KEY=/run/key".into()]).unwrap();
        assert_eq!(refs["TOKEN"], SecretRef::FromEnv("GH_PAT".into()));
        assert_eq!(refs["KEY"], SecretRef::FromFile("/run/key".into()));
        for (env, file) in [
            (vec!["NOEQUALS".to_owned()], vec![]),
            (vec!["=HOST".to_owned()], vec![]),
            (vec![], vec!["K=relative".to_owned()]),
            (vec!["D=H".to_owned()], vec!["D=/abs".to_owned()]),
        ] {
            assert!(secrets(&env, &file).is_err(), "{env:?} {file:?}");
        }
    }

    #[test]
    fn cidrs_are_normalised() {
        assert_eq!(cidr("10.8.0.0/16").unwrap(), "10.8.0.0/16");
        assert_eq!(cidr("1.1.1.1").unwrap(), "1.1.1.1/32");
        assert_eq!(cidr("::1").unwrap(), "::1/128");
        assert!(cidr("10.0.0.0/33").is_err());
        assert!(cidr("example.com").is_err());
        assert!(cidr("10.0.0.0/x").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(duration("1500ms").unwrap(), Duration::from_millis(1500));
        for bad in ["", "30", "s", "3x", "-1s"] {
            assert!(duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn modes() {
        assert_eq!(octal_mode("644").unwrap(), 0o644);
        assert_eq!(octal_mode("0o600").unwrap(), 0o600);
        assert_eq!(octal_mode("0755").unwrap(), 0o755);
        assert!(octal_mode("800").is_err());
        assert!(octal_mode("17777").is_err());
    }

    #[test]
    fn mounts() {
        let dir = tempfile::tempdir().unwrap();
        let spec = format!("{}:/workspace:ro", dir.path().display());
        let parsed = mount(&spec).unwrap();
        assert_eq!(parsed.source, dir.path().canonicalize().unwrap());
        assert_eq!(
            (parsed.target.as_str(), parsed.read_only),
            ("/workspace", true)
        );
        assert!(
            mount("/nonexistent-dir-xyz:/g")
                .unwrap_err()
                .to_string()
                .starts_with("mount source not found")
        );
        assert!(mount("/a:/b:/c:/d").is_err());
        let file = dir.path().join("f");
        std::fs::write(&file, "").unwrap();
        assert!(
            mount(&format!("{}:/g", file.display()))
                .unwrap_err()
                .to_string()
                .contains("directory")
        );
    }

    #[test]
    fn env_specs() {
        let parsed = env(&["A=1".into(), "=x".into(), "B=".into(), "".into()]);
        assert_eq!(
            parsed,
            [("A".into(), "1".into()), ("B".into(), String::new())]
        );
    }
}
