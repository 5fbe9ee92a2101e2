//! A property test of the loader over mutated manifests: whatever the bytes
//! of the TOML files, loading, building the graph, the runtime checks and
//! rendering every diagnostic (as the CLI renders it, and as JSON) never
//! panic, and the rendered output stays bounded.
//!
//! Runs in CI with every `cargo test`, bounded in iterations and time:
//! `BOTTLE_FUZZ_ITERATIONS` (default 300) and `BOTTLE_FUZZ_SECONDS`
//! (default 20). `BOTTLE_FUZZ_SEED` replays a run; a failure prints the
//! seed and the mutated files.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bottle::runtime::RuntimeKind;

/// Fragments a mutation inserts: TOML syntax, manifest keys, and values
/// that stress the checks (NUL, huge numbers, option-like, escapes, long
/// lines).
const TOKENS: &[&str] = &[
    "[",
    "]",
    "{",
    "}",
    "=",
    ",",
    "\"",
    "'",
    "\n",
    "\r\n",
    "#",
    ".",
    "[[",
    "]]",
    "\"\"\"",
    "'''",
    "[bottle.x]\n",
    "[agent.y]\nbottle = \"x\"\n",
    "[project]\nname = \"p\"\n",
    "cpus = ",
    "memory_mib = ",
    "image = ",
    "volumes = ",
    "env = ",
    "secrets = ",
    "egress = ",
    "setup = ",
    "after = ",
    "inputs = ",
    "skills = ",
    "prompt = ",
    "prompt_text = ",
    "user = ",
    "git = ",
    "allow_hosts = ",
    "allow_cidrs = ",
    "from_env = ",
    "from_file = ",
    "upstream = ",
    "\\u0000",
    "\\uD800",
    "\\x",
    "\\",
    "18446744073709551616",
    "-1",
    "0",
    "256",
    "1e400",
    "nan",
    "inf",
    "true",
    "1979-05-27T07:32:00Z",
    "\"--net\"",
    "\"../../etc\"",
    "\"/etc/shadow\"",
    "\"./a:/b:ro\"",
    "\"*.\"",
    "\"0.0.0.0/0\"",
    "\"${HOME}\"",
    "é",
    "\u{feff}",
    "\u{202e}",
    "\t",
];

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

fn mutate(rng: &mut Rng, text: &[u8]) -> Vec<u8> {
    let mut out = text.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(out.len() + 1);
        match rng.below(7) {
            // Flip a byte (invalid UTF-8 included).
            0 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] ^= 1 << rng.below(8);
            }
            // Delete a range.
            1 if !out.is_empty() => {
                let end = (at + rng.below(40)).min(out.len());
                out.drain(at.min(end)..end);
            }
            // Repeat a slice many times: long lines, many entries.
            2 if !out.is_empty() => {
                let start = rng.below(out.len());
                let end = (start + 1 + rng.below(30)).min(out.len());
                let piece = out[start..end].to_vec();
                let most = if rng.below(8) == 0 { 20_000 } else { 50 };
                let times = 1 + rng.below(most);
                let repeated: Vec<u8> = piece
                    .iter()
                    .copied()
                    .cycle()
                    .take(piece.len() * times)
                    .collect();
                out.splice(at.min(out.len())..at.min(out.len()), repeated);
            }
            // Duplicate a line (duplicate keys and tables).
            3 => {
                let lines: Vec<&[u8]> = out.split(|b| *b == b'\n').collect();
                let line = lines[rng.below(lines.len())].to_vec();
                let mut with = line;
                with.push(b'\n');
                let at = out
                    .iter()
                    .enumerate()
                    .filter(|(_, b)| **b == b'\n')
                    .map(|(i, _)| i + 1)
                    .nth(rng.below(lines.len()))
                    .unwrap_or(0);
                out.splice(at..at, with);
            }
            // A long single-line array of valid entries, then a bad one.
            4 => {
                let n = 1 + rng.below(12_000);
                let mut line = b"\n[bottle.long]\nvolumes = [".to_vec();
                for i in 0..n {
                    line.extend_from_slice(format!("\"x{i}\",").as_bytes());
                }
                line.extend_from_slice(b"5]\n");
                out.splice(at..at, line);
            }
            // Insert tokens.
            _ => {
                let mut insert = Vec::new();
                for _ in 0..1 + rng.below(3) {
                    insert.extend_from_slice(TOKENS[rng.below(TOKENS.len())].as_bytes());
                }
                out.splice(at..at, insert);
            }
        }
    }
    out
}

fn toml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(toml_files(&path));
        } else if path.extension().is_some_and(|e| e == "toml") {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// Load, build, check and render; the rendered size.
fn exercise(dir: &Path) -> usize {
    let handler =
        miette::GraphicalReportHandler::new_themed(miette::GraphicalTheme::unicode_nocolor())
            .with_width(100)
            .with_links(false);
    let render = |d: &bottle::manifest::Diagnostics| {
        let mut out = String::new();
        handler.render_report(&mut out, d).expect("renders");
        let _ = serde_json::to_string(&d.to_json()).unwrap();
        out.len()
    };
    let project = match bottle::manifest::load_dir(dir) {
        Ok(p) => p,
        Err(d) => return render(&d),
    };
    let graph = match bottle::graph::build(&project) {
        Ok(g) => g,
        Err(d) => return render(&d),
    };
    let desired = bottle::desired::Desired::new(project, &graph);
    let mut size = 0;
    for runtime in [RuntimeKind::Smolvm, RuntimeKind::Local] {
        if let Err(d) = bottle::preflight::runtime_check(&desired, runtime) {
            size = size.max(render(&d));
        }
    }
    size
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn mutated_manifests_never_panic_and_output_stays_bounded() {
    let iterations: usize = env_or("BOTTLE_FUZZ_ITERATIONS", 300);
    let budget = Duration::from_secs(env_or("BOTTLE_FUZZ_SECONDS", 20));
    let seed: u64 = env_or(
        "BOTTLE_FUZZ_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            | 1,
    );
    let current = std::env::temp_dir().join(format!("bottle-fuzz-{seed}-current.toml"));
    eprintln!(
        "fuzz_loader: seed {seed} (replay with BOTTLE_FUZZ_SEED={seed}); the input being tried is {}",
        current.display()
    );
    let mut rng = Rng(seed);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let bases: Vec<tempfile::TempDir> = ["manifests", "tests/fixtures/e2e"]
        .iter()
        .map(|rel| {
            let tmp = tempfile::tempdir().unwrap();
            support::project::copy_dir(&root.join(rel), tmp.path());
            tmp
        })
        .collect();
    let started = Instant::now();
    let mut ran = 0;
    let mut slowest = (Duration::ZERO, PathBuf::new());
    for i in 0..iterations {
        if started.elapsed() > budget {
            break;
        }
        let base = &bases[rng.below(bases.len())];
        let files = toml_files(base.path());
        let originals: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
        let target = rng.below(files.len());
        let mutated = mutate(&mut rng, &originals[target]);
        std::fs::write(&files[target], &mutated).unwrap();
        // A stack overflow aborts the process before any panic handler
        // runs: the input being exercised is always on disk.
        std::fs::write(&current, &mutated).unwrap();
        let dir = base.path().to_owned();
        let began = Instant::now();
        let result = std::panic::catch_unwind(move || exercise(&dir));
        let took = began.elapsed();
        if took > slowest.0 {
            // Kept for a look, not asserted: a test never times itself.
            let keep = std::env::temp_dir().join(format!("bottle-fuzz-{seed}-slowest.toml"));
            std::fs::write(&keep, &mutated).unwrap();
            slowest = (took, keep);
        }
        std::fs::write(&files[target], &originals[target]).unwrap();
        match result {
            // Every diagnostic is capped and windowed: a few hundred KB at
            // most, whatever the input's size.
            Ok(size) => assert!(
                size < 512 * 1024,
                "iteration {i} (seed {seed}): {size} bytes of diagnostics for a mutated {}",
                files[target].display()
            ),
            Err(_) => {
                let keep = std::env::temp_dir().join(format!("bottle-fuzz-{seed}-{i}.toml"));
                std::fs::write(&keep, &mutated).unwrap();
                panic!(
                    "iteration {i} (seed {seed}) panicked on a mutated {}; the file is kept at {}",
                    files[target].display(),
                    keep.display()
                );
            }
        }
        ran += 1;
    }
    eprintln!(
        "fuzz_loader: {ran} mutated manifests in {:.1}s; the slowest took {:.0} ms ({})",
        started.elapsed().as_secs_f64(),
        slowest.0.as_secs_f64() * 1000.0,
        slowest.1.display()
    );
    assert!(ran > 0);
}

#[test]
fn a_label_past_column_65535_renders() {
    let tmp = tempfile::tempdir().unwrap();
    let hosts: Vec<String> = (0..6000).map(|i| format!("\"h{i}.example.com\"")).collect();
    std::fs::write(
        tmp.path().join("bottle.toml"),
        format!(
            "[project]\nname = \"p\"\n[bottle.dev.egress]\nallow_hosts = [{}, 5]\n[agent.a]\nbottle = \"dev\"\n",
            hosts.join(",")
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bottle"))
        .arg("validate")
        .arg(tmp.path())
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    // The real line and column, a window of the line, not all of it.
    assert!(stderr.contains("bottle.toml:4:118907]"), "{stderr}");
    assert!(stderr.contains("h5999.example.com\", 5]"), "{stderr}");
    assert!(stderr.len() < 2000, "{} bytes", stderr.len());
}

#[test]
fn thousands_of_problems_on_one_line_print_a_bounded_report() {
    let tmp = tempfile::tempdir().unwrap();
    let entries = vec!["\"x\""; 5000].join(",");
    std::fs::write(
        tmp.path().join("bottle.toml"),
        format!("[project]\nname = \"p\"\n[bottle.dev]\nvolumes = [{entries}]\n[agent.a]\nbottle = \"dev\"\n"),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bottle"))
        .arg("validate")
        .arg(tmp.path())
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("5000 problems found in"), "{stderr}");
    assert!(stderr.contains("(10 shown)"), "{stderr}");
    assert!(stderr.contains("bottle::problems-omitted"), "{stderr}");
    assert!(stderr.len() < 20_000, "{} bytes", stderr.len());
    // `--json` lists every one.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bottle"))
        .args(["validate", "--json"])
        .arg(tmp.path())
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["error"]["problems"].as_array().unwrap().len(), 5000);
}

/// Found by this fuzzer: a path of thousands of components made the
/// loader's path resolution recurse once per component and overflow the
/// stack (an abort, not a diagnostic).
#[test]
fn a_path_of_thousands_of_components_is_a_diagnostic() {
    let tmp = tempfile::tempdir().unwrap();
    let deep = vec!["x"; 20_000].join("/");
    std::fs::write(
        tmp.path().join("bottle.toml"),
        format!(
            "[project]\nname = \"p\"\n[bottle.dev]\n[agent.a]\nbottle = \"dev\"\nprompt = \"{deep}/p.md\"\n"
        ),
    )
    .unwrap();
    let dir = tmp.path().to_owned();
    // A small stack, so the test does not depend on the thread's default.
    let rendered = std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(move || match bottle::manifest::load_dir(&dir) {
            Ok(_) => panic!("a prompt that does not exist loaded"),
            Err(d) => serde_json::to_string(&d.to_json()).unwrap(),
        })
        .unwrap()
        .join()
        .unwrap();
    assert!(rendered.contains("prompt"), "{rendered}");
}
