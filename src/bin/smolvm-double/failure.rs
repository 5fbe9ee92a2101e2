//! A failed command: smolvm prints `Error: <message>` on stderr and exits 1.
//! The constructors produce the message shapes of smolvm's error type
//! (`src/data/errors.rs`).

use std::fmt;

use bottle::runtime::RuntimeError;

#[derive(Debug)]
pub struct Failure(String);

impl Failure {
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }

    /// `config operation failed: OP: REASON`
    pub fn config(operation: &str, reason: impl fmt::Display) -> Self {
        Self(format!("config operation failed: {operation}: {reason}"))
    }

    /// `agent operation failed: OP: REASON`
    pub fn agent(operation: &str, reason: impl fmt::Display) -> Self {
        Self(format!("agent operation failed: {operation}: {reason}"))
    }

    /// `vm not found: NAME`
    pub fn vm_not_found(name: &str) -> Self {
        Self(format!("vm not found: {name}"))
    }

    /// What `exec` and `cp` say when the machine is not running.
    pub fn not_running(name: &str) -> Self {
        Self::agent(
            "connect",
            format!(
                "machine '{name}' is not running. Use 'smolvm machine start --name {name}' first."
            ),
        )
    }

    /// `invalid vm state: expected EXPECTED, got ACTUAL`
    pub fn invalid_state(expected: &str, actual: &str) -> Self {
        Self(format!(
            "invalid vm state: expected {expected}, got {actual}"
        ))
    }

    /// A failure of the local runtime under the double, reported the way
    /// smolvm reports a failing guest agent.
    pub fn backend(operation: &str, error: RuntimeError) -> Self {
        Self::agent(operation, error.kind)
    }

    /// A failure of the double itself (its home, its knobs): not something
    /// real smolvm would say, so it says whose it is.
    pub fn double(message: impl fmt::Display) -> Self {
        Self(format!("smolvm-double: {message}"))
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
