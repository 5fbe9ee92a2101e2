//! Latency of the smolvm double's `machine ls --json` with 100 machines
//! (created, not started): the call bottle's observe step makes first, every
//! time. Target: median under 20 ms (real smolvm answers in 10–15 ms).
//!
//! `cargo bench --bench double` (set `DOUBLE_BENCH_RUNS` for more samples).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MACHINES: usize = 100;
const TARGET: Duration = Duration::from_millis(20);

fn double(home: &Path, args: &[&str]) -> std::process::Output {
    let output = Command::new(env!("CARGO_BIN_EXE_smolvm-double"))
        .args(args)
        .env("SMOLVM_DOUBLE_HOME", home)
        .stdin(Stdio::null())
        .output()
        .expect("running smolvm-double");
    assert!(
        output.status.success(),
        "smolvm-double {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn main() {
    let runs: usize = std::env::var("DOUBLE_BENCH_RUNS")
        .ok()
        .and_then(|runs| runs.parse().ok())
        .unwrap_or(51);
    let home = tempfile::tempdir().expect("temporary home");
    for i in 0..MACHINES {
        let name = format!("bench-{i:03}");
        double(
            home.path(),
            &[
                "machine",
                "create",
                "--name",
                &name,
                "--label",
                "bottle.managed-by=bottle",
                "--label",
                &format!("bottle.agent={name}"),
                "--cpus",
                "2",
                "--mem",
                "2048",
            ],
        );
    }

    // One warm-up call: the first pays for cold page caches.
    let listed: Vec<serde_json::Value> =
        serde_json::from_slice(&double(home.path(), &["machine", "ls", "--json"]).stdout)
            .expect("ls --json parses");
    assert_eq!(listed.len(), MACHINES);

    let mut samples: Vec<Duration> = (0..runs)
        .map(|_| {
            let started = Instant::now();
            double(home.path(), &["machine", "ls", "--json"]);
            started.elapsed()
        })
        .collect();
    samples.sort();
    let median = samples[samples.len() / 2];
    let p90 = samples[samples.len() * 9 / 10];
    let verdict = if median < TARGET { "under" } else { "OVER" };
    println!(
        "smolvm-double machine ls --json, {MACHINES} machines, {runs} runs: \
         median {:.1} ms, p90 {:.1} ms, min {:.1} ms ({verdict} the {} ms target)",
        ms(median),
        ms(p90),
        ms(samples[0]),
        TARGET.as_millis()
    );
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}
