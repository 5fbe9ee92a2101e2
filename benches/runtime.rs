//! Latency of the local runtime: `exec true`, create+start, stop, copy_in.
//! Needs root and bwrap. Prints medians (and the 90th percentile).
//!
//! `cargo bench --bench runtime` (add `-- N` to change the exec count).

use std::time::{Duration, Instant};

use bottle::runtime::local::LocalRuntime;
use bottle::runtime::{CopyOptions, ExecRequest, MachineSpec, Runtime};

fn summary(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let pct = |p: usize| samples[(samples.len() * p / 100).min(samples.len() - 1)];
    println!(
        "{name:<22} n={:<4} median {:>8.2} ms   p90 {:>8.2} ms",
        samples.len(),
        pct(50).as_secs_f64() * 1e3,
        pct(90).as_secs_f64() * 1e3,
    );
}

fn main() {
    let execs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(300);
    let dir = tempfile::Builder::new()
        .prefix("bottle-bench-")
        .tempdir()
        .expect("tempdir");
    let rt = LocalRuntime::open(dir.path()).expect("the local runtime needs root and bwrap");

    let (mut create, mut start, mut stop, mut delete) = (vec![], vec![], vec![], vec![]);
    for i in 0..10 {
        let spec = MachineSpec {
            name: format!("bench-{i}"),
            cpus: 1,
            memory_mib: 512,
            ..MachineSpec::default()
        };
        let t = Instant::now();
        rt.create(&spec).unwrap();
        create.push(t.elapsed());
        let t = Instant::now();
        rt.start(&spec.name).unwrap();
        start.push(t.elapsed());
        let t = Instant::now();
        rt.stop(&spec.name).unwrap();
        stop.push(t.elapsed());
        let t = Instant::now();
        rt.delete(&spec.name).unwrap();
        delete.push(t.elapsed());
    }
    let create_start = create.iter().zip(&start).map(|(a, b)| *a + *b).collect();

    let spec = MachineSpec {
        name: "bench".to_owned(),
        ..MachineSpec::default()
    };
    rt.create(&spec).unwrap();
    rt.start("bench").unwrap();
    let request = ExecRequest::new(["true"]);
    for _ in 0..10 {
        rt.exec("bench", &request).unwrap();
    }
    let mut exec = Vec::with_capacity(execs);
    for _ in 0..execs {
        let t = Instant::now();
        let out = rt.exec("bench", &request).unwrap();
        exec.push(t.elapsed());
        assert!(out.success());
    }
    let user_request = ExecRequest::new(["true"]).as_user("nobody");
    let mut exec_user = Vec::with_capacity(execs);
    for _ in 0..execs {
        let t = Instant::now();
        rt.exec("bench", &user_request).unwrap();
        exec_user.push(t.elapsed());
    }
    let file = dir.path().join("payload");
    std::fs::write(&file, vec![b'x'; 64 * 1024]).unwrap();
    let mut copy = Vec::new();
    for i in 0..50 {
        let t = Instant::now();
        rt.copy_in(
            "bench",
            &file,
            &format!("/tmp/copy/{i}"),
            &CopyOptions::default(),
        )
        .unwrap();
        copy.push(t.elapsed());
    }
    rt.delete("bench").unwrap();

    summary("create", create);
    summary("start", start);
    summary("create+start", create_start);
    summary("stop", stop);
    summary("delete", delete);
    summary("exec true (root)", exec);
    summary("exec true (nobody)", exec_user);
    summary("copy_in 64 KiB", copy);
}
