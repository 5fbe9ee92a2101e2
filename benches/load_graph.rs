//! Load + graph benchmark: how long `bottle` takes to read a large manifests
//! directory and build its provisioning graph, hashing every referenced file.
//!
//! Generates, in a temporary directory, 1,000 agents in 200 files: each file
//! one bottle (egress, CA, git, supervise, two setup steps with inputs) and
//! five agents, each agent with its own prompt file and three skills from a
//! pool of 100 skill directories (four files each). Then measures
//! `manifest::load_dir` + `graph::build` over several runs.
//!
//! Run with `cargo bench --bench load_graph` (optionally `-- RUNS`).

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

const FILES: usize = 200;
const AGENTS_PER_FILE: usize = 5;
const SKILLS: usize = 100;
const SKILLS_PER_AGENT: usize = 3;
const FILES_PER_SKILL: usize = 4;
const DEFAULT_RUNS: usize = 20;

fn main() {
    // `cargo bench` passes `--bench`; a bare number sets the run count.
    let runs = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(DEFAULT_RUNS);

    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("manifests");
    let generated = Instant::now();
    generate(&dir);
    println!(
        "generated {} agents in {FILES} files, {SKILLS} skill directories, in {:.0?}",
        FILES * AGENTS_PER_FILE,
        generated.elapsed()
    );

    let mut load = Vec::with_capacity(runs);
    let mut build = Vec::with_capacity(runs);
    let mut total = Vec::with_capacity(runs);
    let mut steps = 0;
    for _ in 0..runs {
        let start = Instant::now();
        let project = match bottle::manifest::load_dir(&dir) {
            Ok(p) => p,
            Err(d) => panic!("{:?}", miette::Report::new(d)),
        };
        let loaded = Instant::now();
        let graph = match bottle::graph::build(&project) {
            Ok(g) => g,
            Err(d) => panic!("{:?}", miette::Report::new(d)),
        };
        let built = Instant::now();
        steps = graph.len();
        load.push(loaded - start);
        build.push(built - loaded);
        total.push(built - start);
    }
    assert_eq!(
        steps,
        FILES * AGENTS_PER_FILE * 8,
        "every agent has 8 steps"
    );

    println!("{runs} runs, {steps} steps");
    report("load_dir", &mut load);
    report("graph::build", &mut build);
    report("load + build", &mut total);
}

fn report(what: &str, times: &mut [Duration]) {
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "{what:>14}: min {:7.2} ms   median {:7.2} ms   max {:7.2} ms",
        ms(times[0]),
        ms(times[times.len() / 2]),
        ms(times[times.len() - 1]),
    );
}

fn write(path: &Path, content: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, content).unwrap();
}

fn generate(dir: &Path) {
    write(&dir.join("bottle.toml"), "[project]\nname = \"bench\"\n");
    // A real certificate, in case the loader parses it.
    write(&dir.join("certs/egress-ca.pem"), CERT);
    write(&dir.join("setup/packages.txt"), "ripgrep\nfd-find\njq\n");
    for i in 0..4 {
        write(
            &dir.join(format!("setup/scripts/step-{i}.sh")),
            &format!("#!/bin/sh\necho step {i}\n"),
        );
    }
    for s in 0..SKILLS {
        let skill = dir.join(format!("skills/skill-{s:03}"));
        write(
            &skill.join("SKILL.md"),
            &format!(
                "---\nname: skill-{s:03}\n---\n{}",
                "Do the thing well.\n".repeat(40)
            ),
        );
        for f in 1..FILES_PER_SKILL {
            write(
                &skill.join(format!("reference/part-{f}.md")),
                &format!("# Part {f} of skill {s}\n{}", "Details.\n".repeat(100)),
            );
        }
    }

    for f in 0..FILES {
        let mut toml = String::new();
        let bottle = format!("bottle-{f:03}");
        let _ = write!(
            toml,
            r#"[bottle.{bottle}]
image = "ghcr.io/acme/agent-base:1.{f}"
cpus = 2
memory_mib = 2048
env = {{ TEAM = "team-{f}" }}
secrets = {{ GITHUB_TOKEN = {{ from_env = "GH_PAT" }} }}

[bottle.{bottle}.egress]
allow_hosts = ["api.anthropic.com", "github.com"]
allow_cidrs = ["10.8.0.0/16"]

[bottle.{bottle}.ca]
cert = "../certs/egress-ca.pem"

[bottle.{bottle}.git]
gateway = "http://10.8.0.2:9418"
user = {{ name = "Bottle Bot", email = "bot@example.com" }}
[[bottle.{bottle}.git.remote]]
name = "app-{f}"
upstream = "git@github.com:acme/app-{f}.git"

[bottle.{bottle}.supervise]
url = "http://10.8.0.2:9100/"

[[bottle.{bottle}.setup]]
name = "packages"
run = "xargs apt-get install -y < /opt/bottle/setup/packages/packages.txt"
after = ["ca"]
inputs = ["../setup/packages.txt"]

[[bottle.{bottle}.setup]]
name = "scripts"
run = "sh /opt/bottle/setup/scripts/scripts/step-0.sh"
after = ["packages", "git"]
inputs = ["../setup/scripts"]
"#
        );
        for a in 0..AGENTS_PER_FILE {
            let n = f * AGENTS_PER_FILE + a;
            let skills: Vec<String> = (0..SKILLS_PER_AGENT)
                .map(|k| format!("\"../skills/skill-{:03}\"", (n * 7 + k * 31) % SKILLS))
                .collect();
            let _ = write!(
                toml,
                "\n[agent.agent-{n:04}]\nbottle = \"{bottle}\"\nprompt = \"../prompts/agent-{n:04}.md\"\nskills = [{}]\n",
                skills.join(", ")
            );
            write(
                &dir.join(format!("prompts/agent-{n:04}.md")),
                &format!(
                    "You are agent {n}.\n{}",
                    "Be careful and thorough.\n".repeat(20)
                ),
            );
        }
        write(&dir.join(format!("teams/team-{f:03}.toml")), &toml);
    }
}

const CERT: &str = include_str!("../tests/fixtures/graph/basic/certs/egress-ca.pem");
