//! smolvm's gateway, as the double plays it.
//!
//! smolvm relays the guest's gateway `100.96.0.1` (`host.smolvm.internal`)
//! to the host's loopback on any port, and a machine whose egress is
//! `--allow-cidr 100.96.0.1/32` reaches that and nothing else. The double
//! gives such a machine a network namespace of its own (loopback only, as
//! the local runtime gives a gated machine), with `100.96.0.1` on its
//! loopback, where a connection to any port is relayed to the same port on
//! the host's loopback (the local runtime's [`Gateway`]: one listener, and
//! a BPF `sk_lookup` program that hands it every connection to the
//! address).

use std::net::Ipv4Addr;

use bottle::runtime::local::Gateway;

/// The guest's gateway address.
const ADDRESS: Ipv4Addr = Ipv4Addr::new(100, 96, 0, 1);
/// The `--allow-cidr` (normalised) that gives a machine the gateway.
const CIDR: &str = "100.96.0.1/32";

/// The local runtime's gateway for the double's machines.
pub fn gateway() -> Gateway {
    Gateway { address: ADDRESS }
}

/// Whether a machine with these (normalised) allowed CIDRs gets the
/// gateway, and only it.
pub fn gated(allowed_cidrs: &[String]) -> bool {
    allowed_cidrs.iter().any(|cidr| cidr == CIDR)
}

/// The `gate_port` of a gated machine's spec: with a [`Gateway`] the local
/// runtime relays every port, so the value only marks the machine gated.
pub const ANY_PORT: u16 = 0;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gated_by_the_gateway_cidr_only() {
        assert!(gated(&[CIDR.to_owned(), "10.8.0.0/16".to_owned()]));
        assert!(!gated(&["10.8.0.0/16".to_owned()]));
        assert!(!gated(&["100.96.0.0/24".to_owned()]));
        assert!(!gated(&[]));
    }
}
