//! smolvm's gateway, as far as the double plays it.
//!
//! smolvm relays the guest's gateway `100.96.0.1` (`host.smolvm.internal`)
//! to the host's loopback on any port, and a machine whose egress is
//! `--allow-cidr 100.96.0.1/32` reaches that and nothing else. The double
//! gives such a machine a network namespace of its own (loopback only, as
//! the local runtime gives a gated machine), with `100.96.0.1` on its
//! loopback, and relays the ports the machine's environment names there
//! (`100.96.0.1:PORT` or `host.smolvm.internal:PORT` in a `-e` value, read at
//! each start): that is where bottle puts its gate's listener. It cannot
//! listen on every port, so a port named nowhere in the environment is
//! refused, where smolvm would relay it.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use bottle::runtime::local::Gateway;

/// The guest's gateway address.
pub const ADDRESS: Ipv4Addr = Ipv4Addr::new(100, 96, 0, 1);
/// Its name in smolvm guests.
const NAME: &str = "host.smolvm.internal";
/// The `--allow-cidr` (normalised) that makes a machine gated.
pub const CIDR: &str = "100.96.0.1/32";
/// At most this many ports are relayed per machine.
const MAX_PORTS: usize = 16;

/// The local runtime's gateway for the double's machines.
pub fn gateway() -> Gateway {
    Gateway {
        address: ADDRESS,
        env_ports,
    }
}

/// Whether a machine with these (normalised) allowed CIDRs gets the
/// gateway, and only it.
pub fn gated(allowed_cidrs: &[String]) -> bool {
    allowed_cidrs.iter().any(|cidr| cidr == CIDR)
}

/// The ports the values of `env` name at the gateway, in order, without
/// repeats, at most [`MAX_PORTS`].
pub fn env_ports(env: &BTreeMap<String, String>) -> Vec<u16> {
    let address = ADDRESS.to_string();
    let mut ports = Vec::new();
    for value in env.values() {
        for host in [address.as_str(), NAME] {
            let mut rest = value.as_str();
            while let Some(at) = rest.find(host) {
                let before = rest[..at].chars().next_back();
                let after = &rest[at + host.len()..];
                rest = after;
                // `2100.96.0.1:80` or `xhost.smolvm.internal:80` is another host.
                if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-') {
                    continue;
                }
                let Some(digits) = after.strip_prefix(':') else {
                    continue;
                };
                let end = digits
                    .find(|c: char| !c.is_ascii_digit())
                    .unwrap_or(digits.len());
                if let Ok(port) = digits[..end].parse::<u16>()
                    && port != 0
                    && !ports.contains(&port)
                    && ports.len() < MAX_PORTS
                {
                    ports.push(port);
                }
            }
        }
    }
    ports
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ports(values: &[&str]) -> Vec<u16> {
        let env = values
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("V{i}"), (*v).to_owned()))
            .collect();
        env_ports(&env)
    }

    #[test]
    fn ports_named_at_the_gateway() {
        assert_eq!(
            ports(&[
                "http://coder:tok@100.96.0.1:41234",
                "http://100.96.0.1:41234/mcp/x",
                "host.smolvm.internal:5432,other",
            ]),
            [41234, 5432]
        );
        assert_eq!(
            ports(&[
                "100.96.0.1",
                "100.96.0.1:",
                "100.96.0.1:0",
                "100.96.0.1:70000",
                "2100.96.0.1:80",
                "myhost.smolvm.internal:81",
                "localhost,127.0.0.1,::1,100.96.0.1,host.smolvm.internal",
            ]),
            Vec::<u16>::new()
        );
        let many: Vec<String> = (1..40).map(|p| format!("100.96.0.1:{p}")).collect();
        assert_eq!(ports(&[&many.join(" ")]).len(), MAX_PORTS);
    }

    #[test]
    fn gated_by_the_gateway_cidr_only() {
        assert!(gated(&[CIDR.to_owned(), "10.8.0.0/16".to_owned()]));
        assert!(!gated(&["10.8.0.0/16".to_owned()]));
        assert!(!gated(&["100.96.0.0/24".to_owned()]));
        assert!(!gated(&[]));
    }
}
