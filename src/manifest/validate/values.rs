//! Checks on single values, free of the loader's context: names of
//! variables, hosts, networks, URLs, repositories, and PEM certificates.
//! Each returns why a value is wrong, phrased to follow its subject.

use std::net::IpAddr;
use std::path::{Component, Path, PathBuf};

/// `[A-Za-z_][A-Za-z0-9_]*`: env keys, secret names, `from_env` values.
pub fn is_env_name(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

pub const ENV_NAME_HELP: &str =
    "variable names are ASCII letters, digits and '_', not starting with a digit";

/// A variable name that by convention holds a credential.
fn secret_shaped(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    let last = upper.rsplit('_').next().unwrap_or("");
    matches!(last, "TOKEN" | "SECRET" | "PASSWORD" | "PASSWD" | "APIKEY")
        || ["_API_KEY", "_ACCESS_KEY", "_PRIVATE_KEY"]
            .iter()
            .any(|s| upper.ends_with(s))
}

/// An `env` entry that is most likely a credential written in the clear.
pub fn literal_secret(var: &str, value: &str) -> bool {
    secret_shaped(var) && value.len() >= 8 && !value.contains(char::is_whitespace)
}

/// Why a host name is not one smolvm's `--allow-host` can take.
pub fn check_host(host: &str) -> Result<(), (String, String)> {
    let err = |p: &str, h: String| Err((p.to_owned(), h));
    if let Some((_, rest)) = host.split_once("://") {
        let bare = rest.split(['/', ':', '?']).next().unwrap_or(rest);
        return err(
            "is a URL, not a host name",
            format!("write only the host name: `{bare}`"),
        );
    }
    if let Ok(ip) = host.trim_matches(['[', ']']).parse::<IpAddr>() {
        let bits = if ip.is_ipv4() { 32 } else { 128 };
        return err(
            "is an IP address",
            format!("put addresses in `allow_cidrs`: `\"{ip}/{bits}\"`"),
        );
    }
    if let Some(rest) = host.strip_prefix("*.") {
        return err(
            "is a wildcard",
            format!(
                "smolvm resolves each allowed host when the machine is created, so wildcards \
                 cannot work: list each host, e.g. `{}`",
                rest
            ),
        );
    }
    if let Some((name, _)) = host.split_once(':') {
        return err(
            "has a port",
            format!("write only the host name, without a port: `{name}`"),
        );
    }
    let labels_ok = host.split('.').all(|l| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    });
    if host.is_empty() || host.len() > 253 || !labels_ok {
        return err(
            "is not a valid host name",
            "host names are dot-separated labels of letters, digits and '-' \
             (each 1-63 characters, not starting or ending with '-'), e.g. `api.anthropic.com`"
                .to_owned(),
        );
    }
    Ok(())
}

/// Why a string is not a network in CIDR notation.
pub fn check_cidr(cidr: &str) -> Result<(), (String, String)> {
    let notation = || {
        Err((
            "is not in CIDR notation".to_owned(),
            "write a network as ADDRESS/PREFIX, e.g. `10.8.0.0/16`".to_owned(),
        ))
    };
    let Some((addr, len)) = cidr.split_once('/') else {
        return match cidr.parse::<IpAddr>() {
            Ok(ip) => Err((
                "has no prefix length".to_owned(),
                format!(
                    "add one: `{ip}/{}` for this one address",
                    if ip.is_ipv4() { 32 } else { 128 }
                ),
            )),
            Err(_) => notation(),
        };
    };
    let Ok(ip) = addr.parse::<IpAddr>() else {
        return notation();
    };
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len: u32 = match len.parse() {
        Ok(n) if n <= max && !len.starts_with('+') => n,
        _ => {
            return Err((
                format!("has an invalid prefix length (0-{max})"),
                "write a network as ADDRESS/PREFIX, e.g. `10.8.0.0/16`".to_owned(),
            ));
        }
    };
    let network = match ip {
        IpAddr::V4(v4) => {
            let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
            IpAddr::from((u32::from(v4) & mask).to_be_bytes())
        }
        IpAddr::V6(v6) => {
            let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
            IpAddr::from((u128::from(v6) & mask).to_be_bytes())
        }
    };
    if network != ip {
        return Err((
            "has bits set past its prefix length".to_owned(),
            format!("did you mean `{network}/{len}`?"),
        ));
    }
    Ok(())
}

/// Why a URL is not an `http(s)://host[:port][/path]` URL. `base` also
/// rejects a query or fragment (the git gateway URL gets paths appended).
pub fn check_http_url(url: &str, base: bool) -> Result<(), (String, String)> {
    let example = if base {
        "e.g. `http://10.8.0.2:9418`"
    } else {
        "e.g. `http://10.8.0.2:9100/`"
    };
    let err = |p: &str| {
        Err((
            p.to_owned(),
            format!("write an http:// or https:// URL, {example}"),
        ))
    };
    let lower = url.to_ascii_lowercase();
    let Some(rest) = lower
        .strip_prefix("http://")
        .or_else(|| lower.strip_prefix("https://"))
    else {
        return err("is not an http(s) URL");
    };
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return err("contains whitespace");
    }
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    if authority.contains('@') {
        return Err((
            "carries credentials".to_owned(),
            format!(
                "remove the `user:password@` part: credentials never go in a manifest; {example}"
            ),
        ));
    }
    if base && tail.contains(['?', '#']) {
        return err("has a query or fragment");
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        match v6.split_once(']') {
            Some((h, p)) if h.parse::<std::net::Ipv6Addr>().is_ok() => (h, p.strip_prefix(':')),
            _ => return err("has an invalid IPv6 host"),
        }
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return err("has no host");
    }
    if !authority.starts_with('[') && check_host(host).is_err() && host.parse::<IpAddr>().is_err() {
        return err("has an invalid host");
    }
    if let Some(port) = port
        && port.parse::<u16>().map_or(true, |p| p == 0)
    {
        return err("has an invalid port");
    }
    Ok(())
}

/// The byte range of the password in a `scheme://user:password@host` URL.
pub fn url_password(url: &str) -> Option<std::ops::Range<usize>> {
    let start = url.find("://")? + 3;
    let end = start
        + url[start..]
            .find(['/', '?', '#'])
            .unwrap_or(url.len() - start);
    let at = start + url[start..end].rfind('@')?;
    let colon = start + url[start..at].find(':')?;
    Some(colon + 1..at)
}

/// Why a name is not a repository name on the git gateway.
pub fn check_repo_name(name: &str) -> Result<(), (String, String)> {
    let rule = "repository names are letters, digits, '.', '_' and '-', not starting with \
                '.' or '-', without '..', e.g. `app`";
    if name.ends_with(".git") && name.len() > 4 {
        return Err((
            "ends with `.git`".to_owned(),
            format!(
                "drop the suffix: `{}`; the gateway URL adds it",
                &name[..name.len() - 4]
            ),
        ));
    }
    let ok = !name.is_empty()
        && name.len() <= 100
        && !name.starts_with(['.', '-'])
        && !name.contains("..")
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(("is not a valid repository name".to_owned(), rule.to_owned()))
    }
}

/// `..` and `.` resolved lexically (symlinks are checked separately).
pub fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

#[derive(Debug, Clone, PartialEq)]
pub enum PemProblem {
    PrivateKey,
    /// Too large or unreadable; phrased to follow "it ...".
    Unreadable(String),
    /// Phrased to follow "it ...".
    Malformed(String),
}

/// Checks that `bytes` holds one or more well-formed PEM certificates and
/// nothing else that matters; returns how many.
pub fn check_pem(bytes: &[u8]) -> Result<usize, PemProblem> {
    let bad = |s: &str| Err(PemProblem::Malformed(s.to_owned()));
    let Ok(text) = std::str::from_utf8(bytes) else {
        return bad("is not text (a DER file?)");
    };
    if text.contains("PRIVATE KEY-----") {
        return Err(PemProblem::PrivateKey);
    }
    let mut count = 0;
    let mut body: Option<String> = None;
    let mut other = None;
    for line in text.lines().map(str::trim) {
        match (&mut body, line) {
            (None, "-----BEGIN CERTIFICATE-----") => body = Some(String::new()),
            (None, l) if l.starts_with("-----BEGIN ") => {
                other.get_or_insert_with(|| {
                    l.trim_matches('-').trim_start_matches("BEGIN ").to_owned()
                });
            }
            (None, _) => {}
            (Some(b), "-----END CERTIFICATE-----") => {
                let der = match crate::base64::decode_strict(b) {
                    Some(der) if !der.is_empty() => der,
                    _ => return bad("has a certificate block that is not valid base64"),
                };
                // Every X.509 certificate is a DER SEQUENCE.
                if der[0] != 0x30 || der.len() < 64 {
                    return bad("has a certificate block that does not hold a DER certificate");
                }
                count += 1;
                body = None;
            }
            (Some(_), l) if l.starts_with("-----") => {
                return bad("has a certificate block without its -----END CERTIFICATE----- line");
            }
            (Some(b), l) => b.push_str(l),
        }
    }
    if body.is_some() {
        return bad("has a certificate block without its -----END CERTIFICATE----- line");
    }
    match (count, other) {
        (0, Some(kind)) => Err(PemProblem::Malformed(format!(
            "holds a `{kind}` block, not a certificate"
        ))),
        (0, None) => bad("has no -----BEGIN CERTIFICATE----- block"),
        (n, _) => Ok(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_is_strict() {
        assert_eq!(crate::base64::decode_strict("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(crate::base64::decode_strict("aGk=").unwrap(), b"hi");
        assert_eq!(crate::base64::decode_strict("YWJj").unwrap(), b"abc");
        assert!(crate::base64::decode_strict("aGVsbG8").is_none());
        assert!(crate::base64::decode_strict("aG=sbG8=").is_none());
        assert!(crate::base64::decode_strict("a$Vs").is_none());
    }

    fn pem(body: &str) -> String {
        format!("-----BEGIN CERTIFICATE-----\n{body}\n-----END CERTIFICATE-----\n")
    }

    #[test]
    fn pem_needs_a_der_certificate_block() {
        // A DER SEQUENCE header followed by filler: well-formed enough.
        let mut der = vec![0x30, 0x82, 0x01, 0x00];
        der.resize(80, 7);
        let body = encode(&der);
        assert_eq!(check_pem(pem(&body).as_bytes()), Ok(1));
        assert_eq!(
            check_pem(format!("{}{}", pem(&body), pem(&body)).as_bytes()),
            Ok(2)
        );
        assert!(matches!(
            check_pem(pem("not base64!").as_bytes()),
            Err(PemProblem::Malformed(_))
        ));
        assert!(matches!(
            check_pem(pem("aGVsbG8=").as_bytes()),
            Err(PemProblem::Malformed(_))
        ));
        assert!(matches!(check_pem(b"hello"), Err(PemProblem::Malformed(_))));
        let truncated = format!("-----BEGIN CERTIFICATE-----\n{body}\n");
        assert!(matches!(
            check_pem(truncated.as_bytes()),
            Err(PemProblem::Malformed(_))
        ));
        // Split so secret scanners do not take this test for a leaked key.
        let key = concat!(
            "-----BEGIN PRIVATE",
            " KEY-----\nAAAA\n-----END PRIVATE",
            " KEY-----\n"
        );
        assert_eq!(check_pem(key.as_bytes()), Err(PemProblem::PrivateKey));
        let public = "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n";
        assert_eq!(
            check_pem(public.as_bytes()),
            Err(PemProblem::Malformed(
                "holds a `PUBLIC KEY` block, not a certificate".into()
            ))
        );
    }

    fn encode(bytes: &[u8]) -> String {
        const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, &b)| n | (b as u32) << (16 - 8 * i));
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    #[test]
    fn hosts() {
        for ok in [
            "api.anthropic.com",
            "github.com",
            "localhost",
            "a-b.example",
        ] {
            assert_eq!(check_host(ok), Ok(()), "{ok}");
        }
        for bad in [
            "https://github.com",
            "10.0.0.1",
            "*.github.com",
            "github.com:443",
            "bad_host.com",
            "-a.com",
            "a..b",
            "",
        ] {
            assert!(check_host(bad).is_err(), "{bad}");
        }
        assert_eq!(
            check_host("https://github.com/acme").unwrap_err().1,
            "write only the host name: `github.com`"
        );
    }

    #[test]
    fn cidrs() {
        for ok in [
            "10.8.0.0/16",
            "0.0.0.0/0",
            "192.168.1.7/32",
            "fd00::/8",
            "::1/128",
        ] {
            assert_eq!(check_cidr(ok), Ok(()), "{ok}");
        }
        assert_eq!(
            check_cidr("10.8.1.0/16").unwrap_err().1,
            "did you mean `10.8.0.0/16`?"
        );
        assert!(
            check_cidr("10.8.0.0")
                .unwrap_err()
                .1
                .contains("10.8.0.0/32")
        );
        for bad in ["10.8.0.0/33", "10.8.0/16", "fd00::/129", "10.8.0.0/x", "/8"] {
            assert!(check_cidr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn urls() {
        for ok in [
            "http://10.8.0.2:9418",
            "https://git.example.com/base",
            "http://[fd00::2]:9100/",
            "http://localhost",
        ] {
            assert_eq!(check_http_url(ok, true), Ok(()), "{ok}");
        }
        for bad in [
            "ftp://x",
            "10.8.0.2:9418",
            "http://",
            "http://user:pw@host/",
            "http://host:99999",
            "http://ho st",
            "http://host/?q=1",
        ] {
            assert!(check_http_url(bad, true).is_err(), "{bad}");
        }
        assert_eq!(check_http_url("http://host/mcp?x=1", false), Ok(()));
    }

    #[test]
    fn finds_passwords_in_urls() {
        let url = "https://user:pw@host:1/x@y";
        assert_eq!(url_password(url).map(|r| &url[r]), Some("pw"));
        assert_eq!(url_password("ssh://git@github.com/a.git"), None);
        assert_eq!(url_password("git@github.com:acme/app.git"), None);
        assert_eq!(url_password("http://host/a:b@c"), None);
    }

    #[test]
    fn repo_names() {
        for ok in ["app", "my.repo", "a_b-c"] {
            assert_eq!(check_repo_name(ok), Ok(()), "{ok}");
        }
        for bad in ["", ".hidden", "-x", "a/b", "a..b", "has space"] {
            assert!(check_repo_name(bad).is_err(), "{bad}");
        }
        assert!(check_repo_name("app.git").unwrap_err().1.contains("`app`"));
    }

    #[test]
    fn env_names_and_secret_shapes() {
        assert!(is_env_name("GITHUB_TOKEN") && is_env_name("_x1"));
        assert!(!is_env_name("1X") && !is_env_name("A-B") && !is_env_name(""));
        assert!(secret_shaped("GITHUB_TOKEN") && secret_shaped("ANTHROPIC_API_KEY"));
        assert!(!secret_shaped("TOKEN_URL") && !secret_shaped("GIT_AUTHOR_NAME"));
    }

    #[test]
    fn normalizes_lexically() {
        assert_eq!(normalize(Path::new("/a/b/../c/./d")), Path::new("/a/c/d"));
        assert_eq!(normalize(Path::new("/a/../../etc")), Path::new("/etc"));
    }
}
