//! Which smolvm bottle drives: `smolvm --version`, read once per run.
//!
//! - Before 1.8.0 smolvm has no machine labels, which is how bottle knows
//!   its machines: refused.
//! - Since 1.6, `machine exec` on a machine created from an image runs as
//!   the image's `USER`; 1.14 adds `exec --user`. Before 1.14 bottle cannot
//!   choose, so it checks that its commands run as root (see `argv`).

use std::fmt;

/// A smolvm release: `major.minor.patch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u32, pub u32, pub u32);

impl Version {
    /// The first release with machine labels.
    pub const MINIMUM: Version = Version(1, 8, 0);
    /// The first release whose `machine exec` takes `--user`.
    pub const EXEC_USER: Version = Version(1, 14, 0);
    /// The releases bottle's contract tests ran against.
    pub const TESTED: &'static str = "1.9.2";

    /// Whether `machine exec` takes `--user`.
    pub fn has_exec_user(self) -> bool {
        self >= Self::EXEC_USER
    }

    /// Read `smolvm 1.9.2` (clap's `--version` line; anything after the
    /// version, like `-double` or ` (abc123)`, is ignored).
    pub fn parse(output: &str) -> Option<Version> {
        let line = output.lines().next()?.trim();
        let text = line.strip_prefix("smolvm")?.trim_start();
        let text = text.strip_prefix('v').unwrap_or(text);
        let end = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(text.len());
        let mut parts = text[..end].split('.').map(str::parse::<u32>);
        let major = parts.next()?.ok()?;
        let minor = parts.next()?.ok()?;
        let patch = match parts.next() {
            Some(part) => part.ok()?,
            None => 0,
        };
        Some(Version(major, minor, patch))
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_smolvm_prints() {
        assert_eq!(Version::parse("smolvm 1.9.2\n"), Some(Version(1, 9, 2)));
        assert_eq!(
            Version::parse("smolvm 1.9.2-double\n"),
            Some(Version(1, 9, 2))
        );
        assert_eq!(
            Version::parse("smolvm v1.14.0 (a5df5001)"),
            Some(Version(1, 14, 0))
        );
        assert_eq!(Version::parse("smolvm 2.0"), Some(Version(2, 0, 0)));
        for bad in ["", "sh 1.2.3", "smolvm", "smolvm x.y", "smolvm 1"] {
            assert_eq!(Version::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn gates() {
        assert!(Version(1, 7, 9) < Version::MINIMUM);
        assert!(Version(1, 8, 0) >= Version::MINIMUM);
        assert!(Version(1, 10, 0) > Version(1, 9, 2));
        assert!(!Version(1, 9, 2).has_exec_user());
        assert!(Version(1, 14, 0).has_exec_user());
    }
}
