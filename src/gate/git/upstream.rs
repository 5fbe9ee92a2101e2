//! Upstream URLs and how the gate authenticates to them.
//!
//! Forms accepted: scp-like ssh (`git@host:path`), `ssh://`, `https://`,
//! `git://`, `file://` and absolute paths. Everything else (`ext::`, `fd::`,
//! `http://`, relative paths, anything starting with `-`) is refused when the
//! gate is configured, and git itself is told the same with `protocol.allow`.

use std::path::PathBuf;

/// The transport of an upstream, as git will use it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// `git@host:path` or `ssh://[user@]host[:port]/path`: `host` is the
    /// name ssh checks against its known hosts (`[host]:port` when a port
    /// is given).
    Ssh {
        known_hosts_name: String,
    },
    Https,
    Git,
    /// `file://` or an absolute path: the repository's directory.
    Local {
        path: PathBuf,
    },
}

/// Classify an upstream, or say why the gate will not use it.
pub fn parse(upstream: &str) -> Result<Transport, String> {
    if upstream.is_empty() {
        return Err("the upstream is empty".into());
    }
    if upstream.starts_with('-') {
        return Err("an upstream may not start with `-`".into());
    }
    if upstream
        .chars()
        .any(|c| c.is_control() || c.is_whitespace())
    {
        return Err("an upstream may not contain spaces or control characters".into());
    }
    if let Some(rest) = upstream.strip_prefix("ssh://") {
        let authority = rest.split('/').next().unwrap_or("");
        let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        if host_port.is_empty() || !rest.contains('/') {
            return Err("an ssh:// upstream needs a host and a path".into());
        }
        let name = match host_port.rsplit_once(':') {
            Some((host, port)) if !host.contains(':') && port.parse::<u16>().is_ok() => {
                if port == "22" {
                    host.to_owned()
                } else {
                    format!("[{host}]:{port}")
                }
            }
            _ => host_port.to_owned(),
        };
        check_host(&name)?;
        return Ok(Transport::Ssh {
            known_hosts_name: name,
        });
    }
    if upstream.starts_with("https://") {
        return Ok(Transport::Https);
    }
    if upstream.starts_with("git://") {
        return Ok(Transport::Git);
    }
    if let Some(path) = upstream.strip_prefix("file://") {
        if !path.starts_with('/') {
            return Err("a file:// upstream needs an absolute path (`file:///srv/app.git`)".into());
        }
        return Ok(Transport::Local { path: path.into() });
    }
    if upstream.starts_with('/') {
        return Ok(Transport::Local {
            path: upstream.into(),
        });
    }
    if upstream.contains("://") || upstream.contains("::") {
        return Err(
            "only ssh (`git@host:path`, `ssh://`), `https://`, `git://`, `file://` and absolute \
             paths are served"
                .into(),
        );
    }
    // scp-like: `[user@]host:path`, where the part before the first colon
    // has no slash (otherwise git reads it as a local path).
    match upstream.split_once(':') {
        Some((authority, path)) if !authority.contains('/') && !path.is_empty() => {
            let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            check_host(host)?;
            Ok(Transport::Ssh {
                known_hosts_name: host.to_owned(),
            })
        }
        _ => Err("a relative path is not an upstream: write an absolute path or a URL".into()),
    }
}

fn check_host(host: &str) -> Result<(), String> {
    let ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-_[]:".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!("`{host}` is not a host name"))
    }
}

/// Quote for a POSIX shell: the value between single quotes.
pub fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', "'\\''"))
}

/// The `GIT_SSH_COMMAND` for an ssh upstream: no user configuration, no
/// prompts, a bounded connect, host keys checked against `known_hosts`
/// (a path relative to the mirror, where git runs), and the key either
/// from the gate's ssh-agent for this remote or from the key file itself.
pub fn ssh_command(known_hosts: &str, identity: &SshIdentity) -> String {
    let mut cmd = format!(
        "ssh -F /dev/null -o BatchMode=yes -o ConnectTimeout={} -o StrictHostKeyChecking=yes \
         -o UserKnownHostsFile={} -o GlobalKnownHostsFile=/dev/null -o UpdateHostKeys=no",
        super::CONNECT_TIMEOUT.as_secs(),
        shell_quote(known_hosts),
    );
    match identity {
        SshIdentity::None => cmd.push_str(" -o IdentityAgent=none"),
        SshIdentity::Agent(sock) => {
            cmd.push_str(" -o IdentityAgent=");
            cmd.push_str(&shell_quote(sock));
        }
        SshIdentity::File(path) => {
            cmd.push_str(" -o IdentityAgent=none -o IdentitiesOnly=yes -i ");
            cmd.push_str(&shell_quote(&path.to_string_lossy()));
        }
    }
    cmd
}

/// Where ssh finds the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SshIdentity {
    /// No key declared.
    None,
    /// The gate's ssh-agent for this remote (socket path relative to the
    /// mirror): used when the gate runs as root and git does not, so the
    /// key is read by the gate and never written anywhere.
    Agent(String),
    /// The key file, read by ssh itself (the gate does not run as root, so
    /// git runs as the user who owns the key).
    File(PathBuf),
}

/// The known-hosts file for an ssh upstream: the declared `host_key` (a
/// `known_hosts` line; a bare `type base64` key gets the host put in front)
/// or else the user's own known hosts.
pub fn known_hosts(host_key: Option<&str>, known_hosts_name: &str, user_file: &str) -> String {
    match host_key {
        Some(key) => key
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| {
                let first = l.split_whitespace().next().unwrap_or("");
                if first.starts_with("ssh-")
                    || first.starts_with("ecdsa-")
                    || first.starts_with("sk-")
                {
                    format!("{known_hosts_name} {l}\n")
                } else {
                    format!("{l}\n")
                }
            })
            .collect(),
        None => user_file.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_forms() {
        let ssh = |h: &str| {
            Ok(Transport::Ssh {
                known_hosts_name: h.into(),
            })
        };
        assert_eq!(parse("git@github.com:acme/app.git"), ssh("github.com"));
        assert_eq!(parse("ssh://git@example.com/acme/app"), ssh("example.com"));
        assert_eq!(
            parse("ssh://git@example.com:2222/acme/app"),
            ssh("[example.com]:2222")
        );
        assert_eq!(parse("ssh://example.com:22/x"), ssh("example.com"));
        assert_eq!(parse("https://github.com/a/b.git"), Ok(Transport::Https));
        assert_eq!(parse("git://127.0.0.1:9418/a.git"), Ok(Transport::Git));
        assert_eq!(
            parse("file:///srv/app.git"),
            Ok(Transport::Local {
                path: "/srv/app.git".into()
            })
        );
        assert_eq!(
            parse("/srv/app.git"),
            Ok(Transport::Local {
                path: "/srv/app.git".into()
            })
        );
        for bad in [
            "",
            "-uupload-pack=touch",
            "ext::sh -c touch% /tmp/x",
            "fd::3",
            "http://example.com/a",
            "app.git",
            "./app",
            "file://relative",
            "git@host:path with space",
            "ssh://host",
            "git@ho$t:x",
        ] {
            assert!(parse(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn ssh_command_never_prompts_and_checks_host_keys() {
        let cmd = ssh_command("../kh", &SshIdentity::Agent("../agent/sock".into()));
        assert!(cmd.contains("BatchMode=yes"));
        assert!(cmd.contains("StrictHostKeyChecking=yes"));
        assert!(cmd.contains("ConnectTimeout="));
        assert!(cmd.contains("UserKnownHostsFile='../kh'"));
        assert!(cmd.contains("IdentityAgent='../agent/sock'"));
        let cmd = ssh_command("kh", &SshIdentity::File("/k/it's".into()));
        assert!(cmd.ends_with("-i '/k/it'\\''s'"));
    }

    #[test]
    fn declared_host_keys_get_their_host() {
        assert_eq!(
            known_hosts(Some("ssh-ed25519 AAAA"), "github.com", "ignored"),
            "github.com ssh-ed25519 AAAA\n"
        );
        assert_eq!(
            known_hosts(Some("gh.com ssh-rsa BBB\n# c\n"), "x", ""),
            "gh.com ssh-rsa BBB\n"
        );
        assert_eq!(known_hosts(None, "x", "user's"), "user's");
    }
}
