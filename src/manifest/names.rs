//! The naming rule for agents, bottles, projects and setup steps.
//!
//! A name is 1–48 characters of lower-case ASCII letters, digits and `-`,
//! starts with a letter, does not end with `-` and has no `--`. Machine names
//! are `bottle_<project>_<agent>`: since names never contain `_`, the mapping
//! is unambiguous, and the result always satisfies smolvm's rule (letters,
//! digits, `-`, `_`; starts with a letter or digit; no trailing `-`; no `--`;
//! at most 128 characters).

pub const MAX_NAME_LEN: usize = 48;

/// The rule as a regular expression, for the JSON schema (with a maximum
/// length of [`MAX_NAME_LEN`]).
pub const NAME_PATTERN: &str = "^[a-z]([a-z0-9]|-[a-z0-9])*$";

/// Environment variable names (env keys, secret names, `from_env`).
pub const ENV_NAME_PATTERN: &str = "^[A-Za-z_][A-Za-z0-9_]*$";

/// The rule, for help lines.
pub const RULE: &str = "names are 1-48 characters: lower-case letters, digits and '-', \
     starting with a letter, not ending with '-', without '--'";

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

/// Names in the order a person expects: runs of digits compare as numbers
/// (`a2` before `a10`), everything else byte by byte. Every list of agents,
/// bottles or machines shown to a user is in this order. Total and
/// consistent with `==`: numbers that tie (`a01`, `a1`) fall back to bytes.
pub fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    let (x, y) = (a.as_bytes(), b.as_bytes());
    let (mut i, mut j) = (0, 0);
    while i < x.len() && j < y.len() {
        if x[i].is_ascii_digit() && y[j].is_ascii_digit() {
            /// Where the run of digits at `k` ends, and it without leading zeros.
            fn run(s: &[u8], k: usize) -> (usize, &[u8]) {
                let end = k + s[k..].iter().take_while(|c| c.is_ascii_digit()).count();
                let start = k + s[k..end].iter().take_while(|&&c| c == b'0').count();
                (end, &s[start..end])
            }
            let ((ei, ni), (ej, nj)) = (run(x, i), run(y, j));
            // Without leading zeros, the longer number is the larger one.
            let order = ni.len().cmp(&nj.len()).then_with(|| ni.cmp(nj));
            if order != Ordering::Equal {
                return order;
            }
            (i, j) = (ei, ej);
        } else {
            if x[i] != y[j] {
                return x[i].cmp(&y[j]);
            }
            (i, j) = (i + 1, j + 1);
        }
    }
    (x.len() - i).cmp(&(y.len() - j)).then_with(|| a.cmp(b))
}

/// `names` in [`natural_cmp`] order.
pub fn sorted_naturally<'a>(names: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
    let mut names: Vec<&str> = names.into_iter().collect();
    names.sort_by(|a, b| natural_cmp(a, b));
    names
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
    fn digits_sort_as_numbers() {
        let mut names = [
            "a10",
            "a2",
            "b",
            "a1",
            "a",
            "a1-x",
            "a01",
            "a10b",
            "a9z",
            "a-1",
            "bottle_p_a10",
            "bottle_p_a9",
        ];
        names.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            names,
            [
                "a",
                "a-1",
                "a01",
                "a1",
                "a1-x",
                "a2",
                "a9z",
                "a10",
                "a10b",
                "b",
                "bottle_p_a9",
                "bottle_p_a10"
            ]
        );
        // Equal only when equal; reversed arguments, reversed order.
        for a in names {
            for b in names {
                assert_eq!(natural_cmp(a, b) == std::cmp::Ordering::Equal, a == b);
                assert_eq!(natural_cmp(a, b), natural_cmp(b, a).reverse(), "{a} {b}");
            }
        }
        let long = "9".repeat(40);
        assert_eq!(
            natural_cmp(&format!("a{long}"), &format!("a1{long}")),
            std::cmp::Ordering::Less
        );
    }

    #[test]
    fn sanitizes_directory_names() {
        assert_eq!(sanitize("My Project").as_deref(), Some("my-project"));
        assert_eq!(sanitize("--42_agents--").as_deref(), Some("agents"));
        assert_eq!(sanitize("___"), None);
    }
}
