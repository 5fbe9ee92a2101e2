//! A bottle's `env` and `secrets`: names, shapes, and values that look like
//! secrets where only references belong.

use std::path::Path;

use super::{ENV_NAME_HELP, diag, is_env_name, literal_secret};
use crate::manifest::load::Cx;
use crate::manifest::model::BottleSpec;
use crate::manifest::source::Want;
use crate::manifest::{FileId, KeyPath};

pub(super) fn check_env_and_secrets(
    cx: &mut Cx,
    file: FileId,
    base: &KeyPath,
    what: &str,
    spec: &BottleSpec,
) {
    for (var, value) in &spec.env {
        let path = base.clone().key("env").key(var);
        if !is_env_name(var) {
            cx.report(
                file,
                &path,
                Want::Key,
                diag(
                    "bottle::invalid-env-name",
                    format!("`{var}` in {what}'s `env` is not a valid variable name"),
                    ENV_NAME_HELP,
                ),
                "invalid variable name",
            );
        }
        if value.contains('\0') {
            // An environment value is a C string: it cannot hold a NUL,
            // and the runtime would fail at spawn.
            cx.report(
                file,
                &path,
                Want::Value,
                diag(
                    "bottle::env-nul",
                    format!("`{var}` in {what}'s `env` holds a NUL character"),
                    "environment values cannot contain NUL (`\\u0000`): remove it",
                ),
                "holds a NUL character",
            );
        } else if spec.secrets.contains_key(var) {
            cx.report(
                file,
                &path,
                Want::Key,
                diag(
                    "bottle::env-secret-conflict",
                    format!("`{var}` is set in both `env` and `secrets` of {what}"),
                    "keep one: a secret reference in `secrets`, or a plain value in `env`",
                ),
                "also a secret",
            );
        } else if literal_secret(var, value) {
            cx.report(
                file,
                &path,
                Want::Value,
                diag(
                    "bottle::literal-secret",
                    format!("`{var}` in {what}'s `env` looks like a secret written as a literal"),
                    format!(
                        "move it to `secrets` as a reference: \
                         `{var} = {{ from_env = \"HOST_VAR\" }}`; if the value was committed, \
                         rotate it"
                    ),
                ),
                "literal value (not shown)",
            );
        } else if value.contains("${") {
            cx.report(
                file,
                &path,
                Want::Value,
                diag(
                    "bottle::env-interpolation",
                    format!("`{var}` in {what}'s `env` uses `${{...}}`, which is not expanded"),
                    format!(
                        "env values are passed literally; to pass a host variable into the guest, \
                         declare it in `secrets`: `{var} = {{ from_env = \"HOST_VAR\" }}`"
                    ),
                ),
                "not expanded",
            );
        }
    }

    for (var, secret) in &spec.secrets {
        let path = base.clone().key("secrets").key(var);
        if !is_env_name(var) {
            cx.report(
                file,
                &path,
                Want::Key,
                diag(
                    "bottle::invalid-env-name",
                    format!("secret `{var}` in {what} is not a valid variable name"),
                    format!("a secret is set as a guest environment variable; {ENV_NAME_HELP}"),
                ),
                "invalid variable name",
            );
        }
        match (&secret.from_env, &secret.from_file) {
            (Some(_), Some(_)) | (None, None) => {
                let both = secret.from_env.is_some();
                cx.report(
                    file,
                    &path,
                    Want::Value,
                    diag(
                        "bottle::secret-source",
                        format!(
                            "secret `{var}` in {what} names {} source",
                            if both { "more than one" } else { "no" }
                        ),
                        format!(
                            "give exactly one: `{var} = {{ from_env = \"HOST_VAR\" }}` or \
                             `{var} = {{ from_file = \"/abs/path\" }}`"
                        ),
                    ),
                    if both {
                        "both from_env and from_file"
                    } else {
                        "no from_env or from_file"
                    },
                );
            }
            (Some(env), None) if !is_env_name(env) => {
                cx.report(
                    file,
                    &path.clone().key("from_env"),
                    Want::Value,
                    diag(
                        "bottle::invalid-env-name",
                        format!(
                            "`from_env` of secret `{var}` in {what} is not a valid variable name"
                        ),
                        format!(
                            "name the host environment variable holding the value; {ENV_NAME_HELP}"
                        ),
                    ),
                    "invalid variable name",
                );
            }
            (None, Some(path_str)) if !Path::new(path_str).is_absolute() => {
                cx.report(
                    file,
                    &path.clone().key("from_file"),
                    Want::Value,
                    diag(
                        "bottle::relative-secret-file",
                        format!("`from_file` of secret `{var}` in {what} is not an absolute path"),
                        "secret files are read on the host at each launch: give an absolute path \
                         (`~` is not expanded), e.g. `from_file = \"/run/secrets/github\"`",
                    ),
                    "not absolute",
                );
            }
            _ => {}
        }
    }
}
