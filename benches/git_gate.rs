//! The git gateway's cost: a clone of a 50 MB repository through the gate
//! against a direct local clone (`git clone --no-local`, the same pack
//! protocol without HTTP), and a no-change `git fetch` through the gate
//! against the same fetch straight from upstream. Prints medians.
//!
//! `cargo bench --bench git_gate --profile dev` (add `-- N` for N clones,
//! default 5; fetches are 4N).

#[path = "../tests/support/git_fixture.rs"]
mod fixture;

use std::io::Read;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use fixture::{Fixture, git_ok, remote};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Time one git command (no polling: the wall time of the process).
fn timed(cwd: &Path, args: &[&str]) -> Duration {
    let t = Instant::now();
    let out = Command::new("git")
        .args(args)
        .current_dir(cwd)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", fixture::global_config())
        .env("GIT_TERMINAL_PROMPT", "0")
        .output()
        .expect("git runs");
    let elapsed = t.elapsed();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    elapsed
}

fn main() {
    let clones: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(5);
    let f = Fixture::new();
    let upstream = f.upstream("upstream.git");

    // 50 MB of incompressible content over 10 commits.
    let seed = f.path("upstream.git.seed");
    let mut random = std::fs::File::open("/dev/urandom").unwrap();
    for c in 0..10 {
        for i in 0..5 {
            let mut buf = vec![0u8; 1 << 20];
            random.read_exact(&mut buf).unwrap();
            std::fs::write(seed.join(format!("blob-{c}-{i}.bin")), &buf).unwrap();
        }
        git_ok(&seed, &["add", "-A"]);
        git_ok(&seed, &["commit", "-q", "-m", &format!("batch {c}")]);
    }
    git_ok(&seed, &["push", "-q", &upstream.to_string_lossy(), "main"]);
    git_ok(&upstream, &["gc", "-q"]);
    f.own(&upstream);
    f.serve(&[remote("app", &upstream, &["agent/*"])]);
    let url = f.coder_url("app");
    let up = upstream.to_string_lossy().into_owned();
    let base = f.dir.path();

    // Warm up: the gate's first request clones its mirror.
    timed(base, &["clone", "-q", &url, "warm"]);
    let (mut direct, mut gate) = (vec![], vec![]);
    for i in 0..clones {
        direct.push(timed(
            base,
            &["clone", "-q", "--no-local", &up, &format!("d{i}")],
        ));
        gate.push(timed(base, &["clone", "-q", &url, &format!("g{i}")]));
        let _ = std::fs::remove_dir_all(base.join(format!("d{i}")));
        let _ = std::fs::remove_dir_all(base.join(format!("g{i}")));
    }
    let (d, g) = (median(direct), median(gate));
    println!(
        "clone 50 MB            n={clones:<3} direct {:>8.1} ms   gate {:>8.1} ms   ratio {:.2}",
        ms(d),
        ms(g),
        g.as_secs_f64() / d.as_secs_f64()
    );

    // No-change fetches.
    timed(base, &["clone", "-q", "--no-local", &up, "fd"]);
    let (mut direct, mut gate) = (vec![], vec![]);
    for _ in 0..clones * 4 {
        direct.push(timed(&base.join("fd"), &["fetch", "-q", "origin"]));
        gate.push(timed(&base.join("warm"), &["fetch", "-q", "origin"]));
    }
    let (d, g) = (median(direct), median(gate));
    println!(
        "no-change fetch        n={:<3} direct {:>8.1} ms   gate {:>8.1} ms   added {:.1} ms",
        clones * 4,
        ms(d),
        ms(g),
        ms(g.saturating_sub(d))
    );
}
