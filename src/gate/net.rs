//! Which addresses the gate may dial: never an internal one (loopback,
//! private, link-local, CGNAT, unspecified, and their IPv6 equivalents)
//! unless the bottle's `allow_internal` lists it. A name is resolved once
//! and the address that passed the check is the one dialled, so a second
//! resolution (DNS rebinding) cannot move the connection inside.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

/// How long a name may take to resolve.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// An address block: `10.0.0.0/8`, `::1/128`, or a bare address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(raw: &str) -> Option<Self> {
        let (addr, prefix) = match raw.trim().split_once('/') {
            Some((a, p)) => (a.parse::<IpAddr>().ok()?, Some(p.parse::<u8>().ok()?)),
            None => (raw.trim().parse::<IpAddr>().ok()?, None),
        };
        let addr = canonical(addr);
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        (prefix <= max).then_some(Self { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// An IPv4 address written as IPv6 (`::ffff:a.b.c.d`) is the IPv4 one.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// Why an address is internal (`None`: it is a public address).
pub fn internal_kind(ip: IpAddr) -> Option<&'static str> {
    match canonical(ip) {
        IpAddr::V4(v4) => v4_kind(v4),
        IpAddr::V6(v6) => v6_kind(v6),
    }
}

fn v4_kind(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = ip.octets();
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() {
        Some("private (RFC 1918)")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if a == 100 && (b & 0xc0) == 64 {
        Some("CGNAT (100.64.0.0/10)")
    } else if a == 0 {
        Some("unspecified (0.0.0.0/8)")
    } else if ip.is_broadcast() || ip.is_multicast() || a >= 240 {
        Some("broadcast, multicast or reserved")
    } else {
        None
    }
}

fn v6_kind(ip: Ipv6Addr) -> Option<&'static str> {
    let seg = ip.segments();
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_unspecified() {
        Some("unspecified")
    } else if seg[0] & 0xffc0 == 0xfe80 {
        Some("link-local")
    } else if seg[0] & 0xfe00 == 0xfc00 {
        Some("private (unique local, fc00::/7)")
    } else if seg[0] & 0xffc0 == 0xfec0 {
        Some("private (site-local, fec0::/10)")
    } else if ip.is_multicast() {
        Some("broadcast, multicast or reserved")
    } else if let Some(v4) = embedded_v4(ip) {
        // NAT64, 6to4 and IPv4-compatible addresses reach the IPv4 one.
        v4_kind(v4)
    } else {
        None
    }
}

fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let seg = ip.segments();
    let o = ip.octets();
    if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] || seg[..6] == [0; 6] {
        Some(Ipv4Addr::new(o[12], o[13], o[14], o[15]))
    } else if seg[0] == 0x2002 {
        Some(Ipv4Addr::new(o[2], o[3], o[4], o[5]))
    } else {
        None
    }
}

/// The addresses `host:port` may be dialled at, and why the others may not.
#[derive(Debug, Default)]
pub struct Resolved {
    pub allowed: Vec<SocketAddr>,
    /// Internal addresses outside `allow_internal`, with their kind.
    pub refused: Vec<(IpAddr, &'static str)>,
}

/// Resolve `host` (a name or an address literal) once and sort its
/// addresses into dialable and refused.
pub async fn resolve(host: &str, port: u16, allow_internal: &[Cidr]) -> std::io::Result<Resolved> {
    let literal = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<SocketAddr> = match literal.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => {
            let lookup = tokio::net::lookup_host((host, port));
            match tokio::time::timeout(RESOLVE_TIMEOUT, lookup).await {
                Ok(result) => result?.collect(),
                Err(_) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("resolving {host} took longer than {RESOLVE_TIMEOUT:?}"),
                    ));
                }
            }
        }
    };
    let mut resolved = Resolved::default();
    for addr in addrs {
        let ip = canonical(addr.ip());
        match internal_kind(ip) {
            Some(kind) if !allow_internal.iter().any(|c| c.contains(ip)) => {
                resolved.refused.push((ip, kind));
            }
            _ => resolved.allowed.push(SocketAddr::new(ip, port)),
        }
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn internal_addresses_are_named_in_both_families() {
        for (addr, kind) in [
            ("127.0.0.1", "loopback"),
            ("127.255.0.9", "loopback"),
            ("10.1.2.3", "private (RFC 1918)"),
            ("172.16.0.1", "private (RFC 1918)"),
            ("172.31.255.255", "private (RFC 1918)"),
            ("192.168.1.1", "private (RFC 1918)"),
            ("169.254.169.254", "link-local"),
            ("100.64.0.1", "CGNAT (100.64.0.0/10)"),
            ("100.127.255.255", "CGNAT (100.64.0.0/10)"),
            ("100.96.0.1", "CGNAT (100.64.0.0/10)"),
            ("0.0.0.0", "unspecified (0.0.0.0/8)"),
            ("::1", "loopback"),
            ("::", "unspecified"),
            ("fe80::1", "link-local"),
            ("fd00::1", "private (unique local, fc00::/7)"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:10.0.0.1", "private (RFC 1918)"),
            ("64:ff9b::a9fe:a9fe", "link-local"),
            ("2002:c0a8:0101::1", "private (RFC 1918)"),
            ("::127.0.0.1", "loopback"),
        ] {
            assert_eq!(internal_kind(ip(addr)), Some(kind), "{addr}");
        }
        for public in [
            "1.1.1.1",
            "172.32.0.1",
            "100.128.0.1",
            "100.63.255.255",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert_eq!(internal_kind(ip(public)), None, "{public}");
        }
    }

    #[test]
    fn cidrs_match_their_block_and_mapped_addresses() {
        let lo = Cidr::parse("127.0.0.0/8").unwrap();
        assert!(lo.contains(ip("127.0.0.1")));
        assert!(lo.contains(ip("::ffff:127.3.2.1")));
        assert!(!lo.contains(ip("128.0.0.1")));
        assert!(!lo.contains(ip("::1")));
        let one = Cidr::parse("10.0.0.5").unwrap();
        assert!(one.contains(ip("10.0.0.5")));
        assert!(!one.contains(ip("10.0.0.6")));
        assert!(Cidr::parse("::1/128").unwrap().contains(ip("::1")));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("10.0.0.1")));
        assert_eq!(Cidr::parse("10.0.0.0/33"), None);
        assert_eq!(Cidr::parse("nope"), None);
    }

    #[tokio::test]
    async fn a_name_resolving_inside_is_refused_unless_allowed() {
        let r = resolve("localhost", 443, &[]).await.unwrap();
        assert!(r.allowed.is_empty());
        assert!(r.refused.iter().all(|(_, kind)| *kind == "loopback"));
        let lo = [Cidr::parse("127.0.0.0/8").unwrap()];
        let r = resolve("127.0.0.1", 443, &lo).await.unwrap();
        assert_eq!(r.allowed, vec!["127.0.0.1:443".parse().unwrap()]);
        let r = resolve("[::ffff:127.0.0.1]", 80, &lo).await.unwrap();
        assert_eq!(r.allowed, vec!["127.0.0.1:80".parse().unwrap()]);
    }
}
