//! Literal secrets in manifests are masked in the text every diagnostic
//! renders from, before any diagnostic exists.

use toml::de::DeValue;

use super::Doc;
use crate::manifest::validate;

/// `text` with the values of literal secrets (`bottle.*.secrets.*` strings,
/// secret-looking `env` values) replaced by `*`, byte for byte so every span
/// stays valid. The quotes stay, so labels still point at something.
pub(super) fn mask_secrets(text: &str, doc: &Doc) -> String {
    let mut ranges = Vec::new();
    let bottles = doc.get_ref().get("bottle").map(|b| b.get_ref());
    if let Some(DeValue::Table(bottles)) = bottles {
        for bottle in bottles.values() {
            if let Some(DeValue::Table(secrets)) =
                bottle.get_ref().get("secrets").map(|s| s.get_ref())
            {
                ranges.extend(
                    secrets
                        .values()
                        .filter(|v| v.get_ref().is_str())
                        .map(|v| v.span()),
                );
            }
            // Passwords in URLs: reported as errors, shown masked.
            let git = bottle.get_ref().get("git").map(|g| g.get_ref());
            let urls = [
                git.and_then(|g| g.get("gateway")),
                bottle
                    .get_ref()
                    .get("supervise")
                    .and_then(|s| s.get_ref().get("url")),
            ];
            let remotes = git
                .and_then(|g| g.get("remote"))
                .and_then(|r| r.get_ref().as_array());
            let upstreams = remotes
                .into_iter()
                .flat_map(|r| r.iter())
                .map(|r| r.get_ref().get("upstream"));
            for url in urls.into_iter().chain(upstreams).flatten() {
                // Only plain one-line strings, whose text maps byte for byte
                // to the value (after the opening quote).
                if let Some(s) = url.get_ref().as_str()
                    && let Some(pw) = validate::url_password(s)
                    && url.span().len() == s.len() + 2
                {
                    let at = url.span().start + 1;
                    // `mask` keeps the first and last byte: widen by one.
                    ranges.push(at + pw.start - 1..at + pw.end + 1);
                }
            }
            if let Some(DeValue::Table(env)) = bottle.get_ref().get("env").map(|s| s.get_ref()) {
                ranges.extend(
                    env.iter()
                        .filter(|(k, v)| {
                            v.get_ref()
                                .as_str()
                                .is_some_and(|v| validate::literal_secret(k.get_ref(), v))
                        })
                        .map(|(_, v)| v.span()),
                );
            }
        }
    }
    ranges.extend(secret_positions(text));
    if ranges.is_empty() {
        return text.to_owned();
    }
    let mut bytes = text.as_bytes().to_vec();
    for r in ranges {
        let inner = r.start + 1..r.end.saturating_sub(1).max(r.start + 1);
        for b in bytes.get_mut(inner).into_iter().flatten() {
            if *b != b'\n' {
                *b = b'*';
            }
        }
    }
    // Multi-byte characters became several ASCII bytes: still UTF-8.
    String::from_utf8(bytes).unwrap_or_default()
}

/// The string literals (quotes included) in a secret's position, whatever
/// its shape, found in the text itself so a file that does not parse (a
/// duplicate key) or a misshapen value (a `value` key, an array, a typo'd
/// `secret` table) is masked too: every string under a key or table whose
/// name (past an entity's own name) contains `secret`. Kept: a `from_env`
/// that is a variable name, a `from_file` that is an absolute path (the
/// references themselves, which diagnostics need to show) and a `hosts`
/// entry shaped like a host or URL.
pub(crate) fn secret_positions(text: &str) -> Vec<std::ops::Range<usize>> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut section_secret = false;
    // Within a key's value: whether it is a secret's, the bracket depth,
    // and the last key seen (inside an inline table).
    let mut value_secret = false;
    let mut depth = 0usize;
    let mut key = String::new();
    let mut at_line_start = true;
    let mut in_value = false;
    let secretish = |segments: &[String], skip_name: bool| {
        segments
            .iter()
            .enumerate()
            .filter(|(i, _)| !(skip_name && *i == 1))
            .any(|(_, s)| s.to_ascii_lowercase().contains("secret"))
    };
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        match c {
            b'\n' => {
                if depth == 0 {
                    in_value = false;
                    value_secret = false;
                }
                at_line_start = true;
                i += 1;
                continue;
            }
            b' ' | b'\t' | b'\r' => {
                i += 1;
                continue;
            }
            b'#' => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            _ => {}
        }
        let line_start = std::mem::replace(&mut at_line_start, false);
        if line_start && !in_value && c == b'[' {
            // A table header: `[a.b.c]` or `[[a.b]]`.
            let end = bytes[i..]
                .iter()
                .position(|b| *b == b'\n')
                .map_or(bytes.len(), |p| i + p);
            let header = text.get(i..end).unwrap_or("").trim_start_matches('[');
            let header = header.split(']').next().unwrap_or("");
            let segments: Vec<String> = split_key(header);
            section_secret = secretish(&segments, true);
            i = end;
            continue;
        }
        if c == b'"' || c == b'\'' {
            let end = string_end(bytes, i);
            if in_value && value_secret {
                let value = text.get(i + 1..end.saturating_sub(1)).unwrap_or("");
                let reference = match key.as_str() {
                    "from_env" => conventional_env_name(value),
                    "from_file" => {
                        value.contains('/')
                            && !value.chars().any(|c| c.is_whitespace() || c.is_control())
                    }
                    // Where a gated secret may go: host names, not values
                    // (anything that does not look like one stays masked).
                    "hosts" => {
                        value.contains('.')
                            && value
                                .chars()
                                .all(|c| c.is_ascii_alphanumeric() || ".-*:/[]".contains(c))
                    }
                    _ => false,
                };
                if !reference {
                    out.push(i..end);
                }
            } else if !in_value || depth > 0 {
                // A quoted key.
                key = text
                    .get(i + 1..end.saturating_sub(1))
                    .unwrap_or("")
                    .to_owned();
            }
            i = end;
            continue;
        }
        match c {
            b'=' => {
                if !in_value {
                    in_value = true;
                    let segments = split_key(&key);
                    value_secret = section_secret || secretish(&segments, false);
                }
                i += 1;
            }
            b'[' | b'{' => {
                depth += 1;
                i += 1;
            }
            b']' | b'}' => {
                depth = depth.saturating_sub(1);
                i += 1;
            }
            b',' => i += 1,
            _ => {
                // A bare key (or a bare value: number, boolean, date).
                let start = i;
                while i < bytes.len()
                    && !matches!(
                        bytes[i],
                        b'=' | b' ' | b'\t' | b'\n' | b'\r' | b',' | b'}' | b']' | b'#'
                    )
                {
                    i += 1;
                }
                let word = text.get(start..i).unwrap_or("");
                // A key before the value, or one inside an inline table.
                let key_in_table = depth > 0
                    && bytes[i..].iter().find(|b| !matches!(b, b' ' | b'\t')) == Some(&b'=');
                if !in_value || key_in_table {
                    key = word.to_owned();
                }
            }
        }
    }
    out
}

/// A `from_env` value shown as written: an upper-case variable name
/// (`GITHUB_TOKEN`). Anything else may be a value pasted in its place.
pub fn conventional_env_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

/// `a.b."c.d"` as its segments.
fn split_key(key: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut quote = None;
    for c in key.chars() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '.') => out.push(String::new()),
            (None, c) if c.is_whitespace() => {}
            (_, c) => out.last_mut().expect("one segment").push(c),
        }
    }
    out
}

/// The byte after the string literal starting at `start` (a quote), or the
/// end of the line for an unterminated one.
fn string_end(bytes: &[u8], start: usize) -> usize {
    let q = bytes[start];
    let triple = bytes.len() >= start + 3 && bytes[start + 1] == q && bytes[start + 2] == q;
    let mut i = start + if triple { 3 } else { 1 };
    while i < bytes.len() {
        let c = bytes[i];
        if c == b'\\' && q == b'"' {
            i += 2;
            continue;
        }
        if !triple && c == b'\n' {
            return i;
        }
        if c == q {
            if !triple {
                return i + 1;
            }
            if bytes.len() >= i + 3 && bytes[i + 1] == q && bytes[i + 2] == q {
                return i + 3;
            }
        }
        i += 1;
    }
    bytes.len()
}
