//! `bottle schema`: print the manifest format's JSON schema.

use clap::Args;

use super::{GlobalArgs, Outcome};

#[derive(Debug, Args)]
pub struct SchemaArgs {}

pub fn run(_global: &GlobalArgs, _args: SchemaArgs) -> miette::Result<Outcome> {
    // schema_json() ends with a newline, exactly as the checked-in file.
    print!("{}", crate::manifest::schema::schema_json());
    Ok(Outcome::Success)
}
