//! What it costs to take turns on smolvm's state database (`src/runtime/
//! smolvm/serial.rs`), against the real smolvm CLI: 12 `machine create`
//! calls, 8 at a time, then 12 `machine delete -f`, three ways:
//!
//! - raw: `smolvm` itself, 8 processes at once, no lock, no retry (what
//!   bottle did before): its wall time and how many calls failed with
//!   `database is locked`;
//! - driver: bottle's smolvm driver from 8 threads (writer lock + retry);
//! - sequential: the driver from one thread.
//!
//! Then `bottle apply` of a 12-agent project at `--parallelism 8` (whose
//! starts fail here: no VM boots on these machines).
//!
//! Needs the real CLI: `BOTTLE_TEST_REAL_SMOLVM`, else
//! `../shared/tools/smolvm-1.9.2/smolvm` beside the repository.
//! `cargo bench --bench smolvm_writers` (add `-- N` for N rounds; default 7).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bottle::runtime::smolvm::SmolvmRuntime;
use bottle::runtime::{MachineSpec, Runtime};

const MACHINES: usize = 12;
const PARALLELISM: usize = 8;

fn real_smolvm() -> Option<PathBuf> {
    std::env::var_os("BOTTLE_TEST_REAL_SMOLVM")
        .map(PathBuf::from)
        .or_else(|| {
            let beside =
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/tools/smolvm-1.9.2/smolvm");
            beside.is_file().then_some(beside)
        })
}

/// Run `work(i)` for i in 0..n on `threads` threads; the wall time.
fn fan_out(n: usize, threads: usize, work: impl Fn(usize) + Sync) -> Duration {
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    work(i);
                }
            });
        }
    });
    started.elapsed()
}

fn spec(i: usize) -> MachineSpec {
    MachineSpec {
        name: format!("bench-{i:02}"),
        cpus: 1,
        memory_mib: 512,
        ..MachineSpec::default()
    }
}

fn median(mut samples: Vec<Duration>) -> f64 {
    samples.sort();
    samples[samples.len() / 2].as_secs_f64() * 1e3
}

fn main() {
    let Some(smolvm) = real_smolvm() else {
        println!(
            "skipped: no real smolvm (set BOTTLE_TEST_REAL_SMOLVM, or put smolvm 1.9.2 at \
             ../shared/tools/smolvm-1.9.2/smolvm)"
        );
        return;
    };
    let rounds: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(7);

    let (mut raw_create, mut raw_delete, mut raw_failed) = (vec![], vec![], 0usize);
    let (mut drv_create, mut drv_delete) = (vec![], vec![]);
    let (mut seq_create, mut seq_delete) = (vec![], vec![]);
    for _ in 0..rounds {
        // raw smolvm, 8 at a time
        let data = tempfile::tempdir().unwrap();
        let failed = AtomicUsize::new(0);
        let raw = |args: &[&str]| {
            let output = Command::new(&smolvm)
                .args(args)
                .env("SMOLVM_DATA_DIR", data.path())
                .stdin(Stdio::null())
                .output()
                .unwrap();
            if String::from_utf8_lossy(&output.stderr).contains("database is locked") {
                failed.fetch_add(1, Ordering::Relaxed);
            }
        };
        raw_create.push(fan_out(MACHINES, PARALLELISM, |i| {
            raw(&[
                "machine",
                "create",
                "--name",
                &spec(i).name,
                "--cpus",
                "1",
                "--mem",
                "512",
            ])
        }));
        raw_delete.push(fan_out(MACHINES, PARALLELISM, |i| {
            raw(&["machine", "delete", "--name", &spec(i).name, "-f"])
        }));
        raw_failed += failed.into_inner();

        // the driver, 8 threads, then 1
        for (threads, creates, deletes) in [
            (PARALLELISM, &mut drv_create, &mut drv_delete),
            (1, &mut seq_create, &mut seq_delete),
        ] {
            let data = tempfile::tempdir().unwrap();
            let runtime = SmolvmRuntime::new(Some(smolvm.clone()))
                .unwrap()
                .with_env("SMOLVM_DATA_DIR", data.path());
            runtime.version().unwrap();
            creates.push(fan_out(MACHINES, threads, |i| {
                runtime.create(&spec(i)).unwrap()
            }));
            assert_eq!(runtime.list().unwrap().len(), MACHINES);
            deletes.push(fan_out(MACHINES, threads, |i| {
                runtime.delete(&spec(i).name).unwrap()
            }));
            assert!(runtime.list().unwrap().is_empty());
        }
    }
    println!(
        "{MACHINES} creates then {MACHINES} deletes, {PARALLELISM} at a time, median of {rounds} rounds:"
    );
    println!(
        "  raw smolvm (no lock, no retry): create {:>7.1} ms  delete {:>7.1} ms  \
         {raw_failed} of {} calls failed with `database is locked`",
        median(raw_create),
        median(raw_delete),
        2 * MACHINES * rounds
    );
    println!(
        "  driver, {PARALLELISM} threads (lock + retry): create {:>7.1} ms  delete {:>7.1} ms  0 failed",
        median(drv_create),
        median(drv_delete)
    );
    println!(
        "  driver, 1 thread:                 create {:>7.1} ms  delete {:>7.1} ms",
        median(seq_create),
        median(seq_delete)
    );

    // bottle apply of 12 agents at --parallelism 8
    let project = tempfile::tempdir().unwrap();
    let mut text = "[project]\nname = \"bench\"\n\n[bottle.b]\ncpus = 1\nmemory_mib = 512\n\
                    user = \"agent\"\n"
        .to_owned();
    for i in 0..MACHINES {
        text.push_str(&format!("\n[agent.a{i:02}]\nbottle = \"b\"\n"));
    }
    std::fs::write(project.path().join("bottle.toml"), text).unwrap();
    let mut applies = Vec::new();
    for _ in 0..rounds {
        let data = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let started = Instant::now();
        let output = Command::new(env!("CARGO_BIN_EXE_bottle"))
            .arg("--smolvm")
            .arg(&smolvm)
            .arg("--state-dir")
            .arg(state.path())
            .args(["apply", "--parallelism", "8"])
            .arg(project.path())
            .env("SMOLVM_DATA_DIR", data.path())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        applies.push(started.elapsed());
        assert!(!String::from_utf8_lossy(&output.stderr).contains("database is locked"));
    }
    println!(
        "  bottle apply, {MACHINES} agents, --parallelism {PARALLELISM} (creates + failing starts): {:>7.1} ms",
        median(applies)
    );
}
