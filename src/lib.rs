//! bottle: keep sandboxed coding agents in the state their manifests declare.
//!
//! The pipeline, in the order data flows through it:
//!
//! 1. [`manifest`] reads a directory of TOML files into a validated project.
//! 2. [`graph`] turns each agent into a dependency graph of provisioning
//!    steps, each with a content hash of its inputs.
//! 3. [`runtime`] is what machines run on: the smolvm driver, or the local
//!    bubblewrap runtime.
//! 4. [`cli`] is the command line on top.

pub mod apply;
pub mod base64;
pub mod cli;
pub mod desired;
pub mod gate;
pub mod graph;
pub mod ledger;
pub mod lock;
pub mod manifest;
pub mod observe;
pub mod plan;
pub mod preflight;
pub mod runtime;
pub mod secrets;
pub mod sent;
pub mod steps;
pub mod time;
pub mod watch;
