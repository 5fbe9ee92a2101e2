//! The grammar of `egress.allow_hosts`, a secret's `hosts` and supervise's
//! `request_egress`: `host` (ports 443 and 80), `host:port`, `*.domain`
//! (any name below `domain`, not `domain` itself), `*.domain:port`. Names
//! are compared in lower case, without a trailing dot.

use std::fmt;
use std::net::IpAddr;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostPattern {
    /// `Some(domain)` for `*.domain`, else the exact name.
    wildcard: bool,
    name: String,
    /// `None`: 443 and 80.
    port: Option<u16>,
}

impl HostPattern {
    /// Parse one entry; the error is (what is wrong, what to write instead).
    pub fn parse(raw: &str) -> Result<Self, (String, String)> {
        let err = |p: &str, h: String| Err((p.to_owned(), h));
        if let Some((_, rest)) = raw.split_once("://") {
            let bare = rest.split(['/', '?']).next().unwrap_or(rest);
            return err(
                "is a URL, not a host",
                format!("write only the host (and a port, if not 443 or 80): `{bare}`"),
            );
        }
        if raw.contains('/') {
            return err(
                "has a path",
                "write only the host, e.g. `api.example.com` or `api.example.com:8443`".into(),
            );
        }
        let (host, port) = match raw.rsplit_once(':') {
            Some((host, port))
                if !host.contains(':') || (host.starts_with('[') && host.ends_with(']')) =>
            {
                match port.parse::<u16>() {
                    Ok(p) if p > 0 => (host, Some(p)),
                    _ => {
                        return err(
                            "has a port that is not a number from 1 to 65535",
                            format!("write `{host}:PORT`, or `{host}` for ports 443 and 80"),
                        );
                    }
                }
            }
            _ => (raw, None),
        };
        if let Ok(ip) = host.trim_matches(['[', ']']).parse::<IpAddr>() {
            let bits = if ip.is_ipv4() { 32 } else { 128 };
            return err(
                "is an IP address",
                format!("put addresses in `allow_cidrs`: `\"{ip}/{bits}\"`"),
            );
        }
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let (wildcard, name) = match host.strip_prefix("*.") {
            Some(rest) => (true, rest.to_owned()),
            None => (false, host.clone()),
        };
        let labels_ok = name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
        if name.is_empty() || name.len() > 253 || !labels_ok {
            return err(
                "is not a valid host",
                "write a host name (dot-separated labels of letters, digits and '-'), \
                 optionally `*.` before it for every name below it and `:PORT` after it, \
                 e.g. `api.anthropic.com`, `*.githubusercontent.com`, `registry.example:5000`"
                    .into(),
            );
        }
        if wildcard && !name.contains('.') {
            return err(
                "is a wildcard over a whole top-level domain",
                format!("name the domain: `*.example.{name}`"),
            );
        }
        Ok(Self {
            wildcard,
            name,
            port,
        })
    }

    /// Whether a request to `host:port` matches.
    pub fn matches(&self, host: &str, port: u16) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let port_ok = match self.port {
            Some(p) => p == port,
            None => port == 443 || port == 80,
        };
        let host_ok = if self.wildcard {
            host.len() > self.name.len() + 1
                && host.ends_with(&self.name)
                && host.as_bytes()[host.len() - self.name.len() - 1] == b'.'
        } else {
            host == self.name
        };
        port_ok && host_ok
    }

    /// The host name part (`domain` for `*.domain`).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn is_wildcard(&self) -> bool {
        self.wildcard
    }

    pub fn port(&self) -> Option<u16> {
        self.port
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.wildcard {
            f.write_str("*.")?;
        }
        f.write_str(&self.name)?;
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        Ok(())
    }
}

/// A parsed list; entries that do not parse are left out (validation
/// reports them before anything reaches the gate).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostList(pub Vec<HostPattern>);

impl HostList {
    pub fn parse<'a>(entries: impl IntoIterator<Item = &'a String>) -> Self {
        Self(
            entries
                .into_iter()
                .filter_map(|e| HostPattern::parse(e).ok())
                .collect(),
        )
    }

    /// The first entry that lets `host:port` through.
    pub fn matching(&self, host: &str, port: u16) -> Option<&HostPattern> {
        self.0.iter().find(|p| p.matches(host, port))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> HostPattern {
        HostPattern::parse(s).unwrap_or_else(|e| panic!("{s}: {e:?}"))
    }

    #[test]
    fn a_bare_host_means_ports_443_and_80() {
        let api = p("API.Anthropic.com.");
        assert_eq!(api.to_string(), "api.anthropic.com");
        assert!(api.matches("api.anthropic.com", 443));
        assert!(api.matches("api.anthropic.com", 80));
        assert!(api.matches("Api.Anthropic.Com.", 443));
        assert!(!api.matches("api.anthropic.com", 8443));
        assert!(!api.matches("x.api.anthropic.com", 443));
        assert!(!api.matches("anthropic.com", 443));
    }

    #[test]
    fn a_port_is_that_port_only() {
        let r = p("registry.local:5000");
        assert!(r.matches("registry.local", 5000));
        assert!(!r.matches("registry.local", 443));
    }

    #[test]
    fn a_wildcard_covers_names_below_its_domain_only() {
        let w = p("*.githubusercontent.com");
        assert!(w.matches("raw.githubusercontent.com", 443));
        assert!(w.matches("a.b.githubusercontent.com", 80));
        assert!(!w.matches("githubusercontent.com", 443));
        assert!(!w.matches("evilgithubusercontent.com", 443));
        assert!(!w.matches("raw.githubusercontent.com", 22));
        assert!(p("*.example.com:8443").matches("a.example.com", 8443));
    }

    #[test]
    fn bad_entries_say_what_to_write() {
        for (raw, problem) in [
            ("https://api.example.com/v1", "is a URL, not a host"),
            ("api.example.com/v1", "has a path"),
            (
                "api.example.com:0",
                "has a port that is not a number from 1 to 65535",
            ),
            (
                "api.example.com:http",
                "has a port that is not a number from 1 to 65535",
            ),
            ("10.0.0.1", "is an IP address"),
            ("[::1]:443", "is an IP address"),
            ("*.com", "is a wildcard over a whole top-level domain"),
            ("a..b", "is not a valid host"),
            ("-a.b", "is not a valid host"),
            ("", "is not a valid host"),
            ("*.", "is not a valid host"),
            ("a b", "is not a valid host"),
        ] {
            let (got, help) = HostPattern::parse(raw).expect_err(raw);
            assert_eq!(got, problem, "{raw}");
            assert!(!help.is_empty());
        }
    }
}
