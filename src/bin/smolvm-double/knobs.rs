//! The double's knobs, read from the environment once per call. Each is
//! described at the top of `main.rs`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::failure::Failure;

pub const VERBS: &[&str] = &[
    "create", "start", "stop", "delete", "update", "exec", "cp", "ls", "status",
];

#[derive(Debug, Default)]
pub struct Knobs {
    pub latency: Option<Duration>,
    /// `(verb, n)`: the n-th call of verb fails.
    pub fail: Vec<(String, u64)>,
    pub hang: Vec<String>,
    /// The n-th `exec` dies half-way through reporting.
    pub exec_die: Option<u64>,
    /// `exec` runs as this user, as smolvm 1.6+ runs it as an image's
    /// `USER`.
    pub exec_user: Option<String>,
    pub bad_json: bool,
    pub resolve: Resolve,
}

/// How `--allow-host` names are resolved at create.
#[derive(Debug)]
pub enum Resolve {
    /// `SMOLVM_DOUBLE_HOSTS` entries, then `/etc/hosts`; nothing else
    /// resolves (as on a machine without DNS).
    Hosts(BTreeMap<String, Vec<IpAddr>>),
    /// Every well-formed host name resolves to a TEST-NET-1 address.
    Any,
    /// The system resolver.
    System,
}

impl Default for Resolve {
    fn default() -> Self {
        Resolve::Hosts(BTreeMap::new())
    }
}

fn var(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .filter(|value| !value.trim().is_empty())
}

fn knob_error(name: &str, value: &str, expected: &str) -> Failure {
    Failure::double(format!("{name}: expected {expected}, got '{value}'"))
}

fn verb(name: &str, value: &str, verb: &str) -> Result<String, Failure> {
    if VERBS.contains(&verb) {
        Ok(verb.to_owned())
    } else {
        Err(knob_error(
            name,
            value,
            &format!("one of {}", VERBS.join(", ")),
        ))
    }
}

impl Knobs {
    pub fn from_env() -> Result<Self, Failure> {
        let mut knobs = Knobs::default();
        if let Some(value) = var("SMOLVM_DOUBLE_LATENCY_MS") {
            let ms = value
                .trim()
                .parse()
                .map_err(|_| knob_error("SMOLVM_DOUBLE_LATENCY_MS", &value, "milliseconds"))?;
            knobs.latency = Some(Duration::from_millis(ms));
        }
        if let Some(value) = var("SMOLVM_DOUBLE_FAIL") {
            for item in value.split(',').map(str::trim) {
                let bad = || knob_error("SMOLVM_DOUBLE_FAIL", &value, "VERB:N[,VERB:N]");
                let (name, n) = item.split_once(':').ok_or_else(bad)?;
                let n: u64 = n.parse().ok().filter(|n| *n > 0).ok_or_else(bad)?;
                knobs
                    .fail
                    .push((verb("SMOLVM_DOUBLE_FAIL", &value, name)?, n));
            }
        }
        if let Some(value) = var("SMOLVM_DOUBLE_HANG") {
            for name in value.split(',').map(str::trim) {
                knobs.hang.push(verb("SMOLVM_DOUBLE_HANG", &value, name)?);
            }
        }
        if let Some(value) = var("SMOLVM_DOUBLE_EXEC_DIE") {
            let n = value
                .trim()
                .parse()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| {
                    knob_error(
                        "SMOLVM_DOUBLE_EXEC_DIE",
                        &value,
                        "a call number (1 = first exec)",
                    )
                })?;
            knobs.exec_die = Some(n);
        }
        knobs.exec_user = var("SMOLVM_DOUBLE_EXEC_USER");
        knobs.bad_json = var("SMOLVM_DOUBLE_BAD_JSON").is_some_and(|v| v != "0");
        knobs.resolve = match var("SMOLVM_DOUBLE_RESOLVE").as_deref() {
            None | Some("hosts") => Resolve::Hosts(extra_hosts()?),
            Some("any") => Resolve::Any,
            Some("system") => Resolve::System,
            Some(other) => {
                return Err(knob_error(
                    "SMOLVM_DOUBLE_RESOLVE",
                    other,
                    "hosts, any or system",
                ));
            }
        };
        Ok(knobs)
    }

    /// Whether call number `n` of `verb` is to fail.
    pub fn fails(&self, verb: &str, n: u64) -> bool {
        self.fail.iter().any(|(v, k)| v == verb && *k == n)
    }

    /// Resolve an `--allow-host` name to CIDRs, as smolvm does at create.
    pub fn resolve(&self, host: &str) -> Result<Vec<String>, String> {
        let unknown = || {
            format!(
                "failed to resolve '{host}': failed to lookup address information: Name or service not known"
            )
        };
        let well_formed = !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|label| {
                !label.is_empty() && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            });
        let addresses: Vec<IpAddr> = if let Ok(ip) = host.parse::<IpAddr>() {
            vec![ip]
        } else if !well_formed {
            return Err(unknown());
        } else {
            match &self.resolve {
                Resolve::Hosts(extra) => {
                    let key = host.to_ascii_lowercase();
                    match extra.get(&key) {
                        Some(found) => found.clone(),
                        None => etc_hosts().remove(&key).ok_or_else(unknown)?,
                    }
                }
                Resolve::Any => {
                    let digest = Sha256::digest(host.to_ascii_lowercase().as_bytes());
                    vec![IpAddr::from([192, 0, 2, 1 + digest[0] % 254])]
                }
                Resolve::System => {
                    use std::net::ToSocketAddrs;
                    let mut found: Vec<IpAddr> = (host, 443)
                        .to_socket_addrs()
                        .map_err(|_| unknown())?
                        .map(|addr| addr.ip())
                        .collect();
                    found.sort();
                    found.dedup();
                    found
                }
            }
        };
        if addresses.is_empty() {
            return Err(unknown());
        }
        Ok(addresses
            .into_iter()
            .map(|ip| match ip {
                IpAddr::V4(ip) => format!("{ip}/32"),
                IpAddr::V6(ip) => format!("{ip}/128"),
            })
            .collect())
    }
}

/// `SMOLVM_DOUBLE_HOSTS=host=ip[,host=ip]`.
fn extra_hosts() -> Result<BTreeMap<String, Vec<IpAddr>>, Failure> {
    let mut hosts: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    if let Some(value) = var("SMOLVM_DOUBLE_HOSTS") {
        for item in value.split(',').map(str::trim) {
            let bad = || knob_error("SMOLVM_DOUBLE_HOSTS", &value, "HOST=IP[,HOST=IP]");
            let (host, ip) = item.split_once('=').ok_or_else(bad)?;
            let ip: IpAddr = ip.trim().parse().map_err(|_| bad())?;
            hosts
                .entry(host.trim().to_ascii_lowercase())
                .or_default()
                .push(ip);
        }
    }
    Ok(hosts)
}

fn etc_hosts() -> BTreeMap<String, Vec<IpAddr>> {
    let text = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    let mut hosts: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or_default();
        let mut words = line.split_whitespace();
        let Some(Ok(ip)) = words.next().map(str::parse::<IpAddr>) else {
            continue;
        };
        for name in words {
            hosts.entry(name.to_ascii_lowercase()).or_default().push(ip);
        }
    }
    hosts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolution_modes() {
        let hosts = Knobs {
            resolve: Resolve::Hosts(BTreeMap::from([(
                "api.example.com".to_owned(),
                vec!["10.1.2.3".parse().unwrap(), "::1".parse().unwrap()],
            )])),
            ..Knobs::default()
        };
        assert_eq!(
            hosts.resolve("API.example.com").unwrap(),
            ["10.1.2.3/32", "::1/128"]
        );
        assert_eq!(hosts.resolve("10.9.9.9").unwrap(), ["10.9.9.9/32"]);
        assert_eq!(
            hosts.resolve("nowhere.invalid").unwrap_err(),
            "failed to resolve 'nowhere.invalid': failed to lookup address information: Name or service not known"
        );

        let any = Knobs {
            resolve: Resolve::Any,
            ..Knobs::default()
        };
        let first = any.resolve("api.anthropic.com").unwrap();
        assert_eq!(first, any.resolve("api.anthropic.com").unwrap());
        assert!(first[0].starts_with("192.0.2."), "{first:?}");
        assert!(any.resolve("bad host!").is_err());
    }

    #[test]
    fn fail_knob_matches_verb_and_call_number() {
        let knobs = Knobs {
            fail: vec![("create".into(), 2)],
            ..Knobs::default()
        };
        assert!(!knobs.fails("create", 1));
        assert!(knobs.fails("create", 2));
        assert!(!knobs.fails("start", 2));
    }
}
