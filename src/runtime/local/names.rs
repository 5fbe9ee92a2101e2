//! Machine names, checked by the same rules as smolvm's.

/// The longest machine name smolvm accepts.
pub const MAX_NAME_LEN: usize = 128;

/// Check a machine name: 1–128 ASCII letters, digits, `-` and `_`, starting
/// with a letter or digit, not ending with `-`, without `--`. Upper case is
/// accepted. The message says which rule was broken.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("machine name cannot be empty".to_owned());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "machine name cannot be longer than {MAX_NAME_LEN} characters (got {})",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        return Err(format!(
            "machine name can only contain letters, digits, '-' and '_' (found {c:?})"
        ));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err("machine name must start with a letter or digit".to_owned());
    }
    if name.ends_with('-') {
        return Err("machine name cannot end with a hyphen".to_owned());
    }
    if name.contains("--") {
        return Err("machine name cannot contain consecutive hyphens".to_owned());
    }
    Ok(())
}

/// The guest hostname for a machine: the name, cut to the kernel's 64-byte
/// limit (names may be up to 128 characters).
pub fn hostname_for(name: &str) -> &str {
    let cut = &name[..name.len().min(64)];
    cut.trim_end_matches(['-', '_'])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_smolvm_names() {
        for ok in ["a", "A", "bottle-coder", "t_1", "9lives", &"x".repeat(128)] {
            assert_eq!(validate_name(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn rejects_each_rule() {
        let cases = [
            ("", "empty"),
            (&"x".repeat(129), "longer"),
            ("a.b", "only contain"),
            ("a b", "only contain"),
            ("-a", "start with"),
            ("_a", "start with"),
            ("a-", "end with"),
            ("a--b", "consecutive"),
            ("é", "only contain"),
        ];
        for (name, needle) in cases {
            let err = validate_name(name).unwrap_err();
            assert!(err.contains(needle), "{name:?}: {err}");
        }
    }

    #[test]
    fn hostname_is_cut_to_64_bytes() {
        assert_eq!(hostname_for("coder"), "coder");
        let long = format!("{}-{}", "a".repeat(63), "b".repeat(10));
        assert_eq!(hostname_for(&long), "a".repeat(63));
    }
}
