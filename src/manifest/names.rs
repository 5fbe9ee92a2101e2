//! The naming rule for agents, bottles, projects and setup steps.
//!
//! A name is 1–48 characters of lower-case ASCII letters, digits and `-`,
//! starts with a letter, does not end with `-` and has no `--`. Machine names
//! are `bottle_<project>_<agent>`: since names never contain `_`, the mapping
//! is unambiguous, and the result always satisfies smolvm's rule (letters,
//! digits, `-`, `_`; starts with a letter or digit; no trailing `-`; no `--`;
//! at most 128 characters).

pub const MAX_NAME_LEN: usize = 48;

/// Why a name breaks the rule, phrased to finish "name ... ".
pub fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("is empty");
    }
    if name.len() > MAX_NAME_LEN {
        return Err("is longer than 48 characters");
    }
    if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err("must start with a lower-case letter");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return Err("may only contain lower-case letters, digits and '-'");
    }
    if name.ends_with('-') {
        return Err("must not end with '-'");
    }
    if name.contains("--") {
        return Err("must not contain '--'");
    }
    Ok(())
}

/// The smolvm machine name of an agent.
pub fn machine_name(project: &str, agent: &str) -> String {
    format!("bottle_{project}_{agent}")
}

/// Turn an arbitrary directory name into a valid project name, or `None`
/// when nothing usable is left.
pub fn sanitize(raw: &str) -> Option<String> {
    let mut out = String::new();
    for c in raw.chars().flat_map(char::to_lowercase) {
        let c = if c.is_ascii_lowercase() || c.is_ascii_digit() {
            c
        } else {
            '-'
        };
        if c == '-' && (out.is_empty() || out.ends_with('-')) {
            continue;
        }
        out.push(c);
    }
    let out = out.trim_start_matches(|c: char| c.is_ascii_digit() || c == '-');
    let mut out: String = out.chars().take(MAX_NAME_LEN).collect();
    while out.ends_with('-') {
        out.pop();
    }
    (!out.is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for name in ["dev", "reviewer", "code-review", "a1", "x"] {
            assert_eq!(check_name(name), Ok(()), "{name}");
        }
    }

    #[test]
    fn rejects_names_smolvm_or_the_mapping_would_reject() {
        for name in [
            "",
            "Dev",
            "1abc",
            "-a",
            "a-",
            "a--b",
            "a_b",
            "a.b",
            &"a".repeat(49),
        ] {
            assert!(check_name(name).is_err(), "{name:?} should be rejected");
        }
    }

    #[test]
    fn machine_names_are_valid_for_smolvm() {
        let long = "a".repeat(MAX_NAME_LEN);
        let name = machine_name(&long, &long);
        assert!(name.len() <= 128);
        assert!(!name.contains("--") && !name.ends_with('-'));
    }

    #[test]
    fn sanitizes_directory_names() {
        assert_eq!(sanitize("My Project").as_deref(), Some("my-project"));
        assert_eq!(sanitize("--42_agents--").as_deref(), Some("agents"));
        assert_eq!(sanitize("___"), None);
    }
}
