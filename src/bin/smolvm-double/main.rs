//! `smolvm-double`: a test double that speaks smolvm's CLI (the `machine`
//! verbs bottle uses), backed by bottle's local runtime, so tests observe
//! real effects inside real sandboxes rather than recorded argv.
//!
//! It reproduces smolvm 1.9.2 as documented in `smolvm-cli.md` and read from
//! smolvm's source: the same clap definitions (unknown flags exit 2 with
//! clap's text), `Error: <message>` on stderr with exit 1, the same error
//! texts, `ls --json` / `status --json` with the same keys and value types
//! (the array deliberately unsorted), `delete` without `-f` asking and
//! cancelling, `stop` of a stopped machine exiting 0, and the empty data
//! folder prose `status`/`exec`/`cp`/`stop` leave behind for an unknown
//! name (`vm not found: NAME`). Also as the real 1.9.2 binary does:
//! resource validation (`--cpus` 1..=255, more than 16 a warning on
//! stderr, `--mem` at least 64), duplicate mount targets, registry images
//! refused without network, `start` progress on stderr, and one writer at a
//! time: a `create`, `delete`, `update` or `stop` that overlaps another
//! writer fails at once with `Error: database operation failed: reserve vm
//! 'NAME': database is locked` (smolvm fails about half of them; the double
//! all, so a caller that overlaps its writers finds out), and `start`
//! writes its record after the boot, failing the same way with the machine
//! running when a writer is in the way.
//!
//! Crash safety: a call killed at any point leaves either the machine whole
//! or nothing that holds its name (a record without a machine is dropped by
//! the next `create`, as smolvm drops a dead creator's reservation).
//!
//! # State
//!
//! Everything lives in `$SMOLVM_DOUBLE_HOME` (default:
//! `$XDG_DATA_HOME/smolvm-double`, else `~/.local/share/smolvm-double`); see
//! `home.rs` for the layout. Tests give each double its own temporary home.
//!
//! # Knobs (environment variables, read on every call)
//!
//! - `SMOLVM_DOUBLE_LATENCY_MS=N`: sleep N ms before doing anything.
//! - `SMOLVM_DOUBLE_FAIL=VERB:N[,VERB:N]`: the N-th call of VERB (counted
//!   from 1 over the life of the home, across processes) fails with
//!   `Error: smolvm-double: injected failure ...`, exit 1, having done
//!   nothing.
//! - `SMOLVM_DOUBLE_HANG=VERB[,VERB]`: calls of VERB never return (logged
//!   with `"exit": null`).
//! - `SMOLVM_DOUBLE_EXEC_DIE=N`: the N-th `exec` runs its command to
//!   completion, prints half its stdout, then dies by SIGKILL.
//! - `SMOLVM_DOUBLE_EXEC_USER=NAME`: `exec` runs as NAME, as smolvm 1.6+
//!   runs it on a machine whose image says `USER NAME` (1.9.2 cannot be
//!   told otherwise).
//! - `SMOLVM_DOUBLE_BAD_JSON=1`: `ls --json` and `status --json` print
//!   truncated JSON (exit 0).
//! - `SMOLVM_DOUBLE_RESOLVE=hosts|any|system`: how `create --allow-host`
//!   resolves names (smolvm resolves them at create and fails without DNS).
//!   `hosts` (default): `SMOLVM_DOUBLE_HOSTS=HOST=IP[,HOST=IP]`, then
//!   `/etc/hosts`, nothing else. `any`: every well-formed name resolves to a
//!   TEST-NET-1 address. `system`: the system resolver.
//!
//! Verbs: create, start, stop, delete, update, exec, cp, ls, status.
//!
//! A forced state: write `{"NAME": "unreachable"}` (or `failed`, `frozen`,
//! any string) to `$SMOLVM_DOUBLE_HOME/states.json` and `ls`/`status`
//! report it; `exec`/`cp` see the machine as not running, `update` refuses
//! it, and `start`, `stop` or `delete` clear it (`start` recovers an
//! unreachable machine, as smolvm's does).
//!
//! # Call log
//!
//! Every call appends one line to `$SMOLVM_DOUBLE_HOME/calls.jsonl`:
//! `{"time_ms", "pid", "verb", "args", "exit", "note"?}`. `args` is the full
//! argv after the program name. bottle passes secrets by reference only, so
//! no secret value can appear there.
//!
//! # The gateway
//!
//! smolvm relays a networked guest's gateway `100.96.0.1`
//! (`host.smolvm.internal`) to the host's loopback on any port. The double
//! plays it for a machine whose egress includes `--allow-cidr
//! 100.96.0.1/32` (bottle's gated bottles): such a machine gets a network
//! namespace of its own, with loopback only and `100.96.0.1` on it, where a
//! connection to `100.96.0.1:PORT`, any PORT, reaches the host's
//! `127.0.0.1:PORT` (one relay per machine, handed every connection by a
//! BPF `sk_lookup` program: needs Linux 5.9+). Nothing else is reachable
//! from it. Differences from smolvm: the name `host.smolvm.internal` does
//! not resolve in the guest, and the machine's other
//! `--allow-cidr`/`--allow-host` entries are unreachable rather than
//! allowed. See `gateway.rs`.
//!
//! # Not reproduced
//!
//! Egress filtering other than the gateway's (allow-lists without
//! `100.96.0.1/32` are recorded and reported, not enforced: the guest gets
//! the host's network whenever smolvm would give it one), detached `exec` (interactive `exec -it` runs on the double's own
//! terminal), persistent workloads, ports, GPUs,
//! forks, `update --net/--no-net`, VMM process ids (`pid` is `null`).

mod cli;
mod failure;
mod gateway;
mod home;
mod knobs;
mod machine;
mod parse;
mod report;

use std::process::ExitCode;

use bottle::runtime::Runtime;
use clap::Parser;

use crate::cli::{Cli, Command};
use crate::failure::Failure;
use crate::home::Home;
use crate::knobs::Knobs;
use crate::machine::{Double, Exit, Io};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args_os()
        .skip(1)
        .map(|arg| arg.to_string_lossy().into_owned())
        .collect();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            if error.exit_code() != 0
                && let Ok(home) = Home::open()
            {
                let verb = args.get(1).map_or("-", String::as_str);
                home.log_call(verb, &args, Some(error.exit_code()), Some("usage error"));
            }
            error.exit()
        }
    };
    let command = match cli.command {
        Command::Machine(command) => command,
        Command::LocalGateRelay(relay) => {
            return match bottle::runtime::local::relay::serve(
                relay.port,
                relay.init_pid,
                relay.init_start,
            ) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => fail(&Failure::double(format!("the gateway relay: {error}"))),
            };
        }
    };
    let verb = command.verb();
    let home = match Home::open() {
        Ok(home) => home,
        Err(failure) => return fail(&failure),
    };

    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    let stdin = std::io::stdin();
    let (mut out, mut err, mut input) = (stdout.lock(), stderr.lock(), stdin.lock());
    let mut io = Io {
        out: &mut out,
        err: &mut err,
        input: &mut input,
    };
    let result = run(&home, verb, &args, command, &mut io);
    let _ = io.out.flush();
    let _ = io.err.flush();
    match result {
        Ok(Exit::Code(code)) => {
            home.log_call(verb, &args, Some(code), None);
            ExitCode::from(code.clamp(0, 255) as u8)
        }
        Ok(Exit::Killed) => {
            home.log_call(verb, &args, None, Some("killed (SMOLVM_DOUBLE_EXEC_DIE)"));
            let _ = rustix::process::kill_process(
                rustix::process::getpid(),
                rustix::process::Signal::KILL,
            );
            unreachable!("SIGKILL is not survivable")
        }
        Err(failure) => {
            home.log_call(verb, &args, Some(1), None);
            fail(&failure)
        }
    }
}

fn fail(failure: &Failure) -> ExitCode {
    eprintln!("Error: {failure}");
    ExitCode::from(1)
}

fn run(
    home: &Home,
    verb: &str,
    args: &[String],
    command: cli::MachineCmd,
    io: &mut Io<'_>,
) -> Result<Exit, Failure> {
    let knobs = Knobs::from_env()?;
    if let Some(latency) = knobs.latency {
        std::thread::sleep(latency);
    }
    let call = home.count_call(verb)?;
    if knobs.hang.iter().any(|hung| hung == verb) {
        home.log_call(verb, args, None, Some("hang (SMOLVM_DOUBLE_HANG)"));
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
    if knobs.fails(verb, call) {
        return Err(Failure::double(format!(
            "injected failure of call {call} of `{verb}` (SMOLVM_DOUBLE_FAIL)"
        )));
    }
    let runtime = open_runtime(home)?;
    let double = Double {
        home,
        runtime: &runtime,
        knobs: &knobs,
        call,
    };
    double.run(command, io)
}

fn open_runtime(home: &Home) -> Result<impl Runtime, Failure> {
    let dir = home.local_dir();
    let runtime = bottle::runtime::local::LocalRuntime::open(&dir).map_err(|error| {
        Failure::double(format!(
            "opening the local runtime in {}: {error}",
            dir.display()
        ))
    })?;
    // The relays of gated machines are this executable (`local-gate-relay`).
    let program = std::env::current_exe()
        .map_err(|error| Failure::double(format!("finding the double's executable: {error}")))?;
    Ok(runtime.with_relay(program).with_gateway(gateway::gateway()))
}
