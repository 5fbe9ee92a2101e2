//! The git gateway behind a small HTTP server on 127.0.0.1, upstreams as
//! local bare repositories, and a real `git` client: shared by
//! tests/git_gate.rs and benches/git_gate.rs.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bottle::gate::config::{AgentCredentials, GateRemote};
use bottle::gate::git::{GitGateway, RunAs};
use bottle::gate::log::GateLog;
use bottle::gate::paths::GatePaths;
use http_body_util::BodyExt;

/// How long any one git command may take before the test fails.
pub const GIT_TIMEOUT: Duration = Duration::from_secs(120);

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub paths: GatePaths,
    pub gateway: Arc<GitGateway>,
    pub port: u16,
    pub run_as: Option<RunAs>,
    _runtime: tokio::runtime::Runtime,
}

impl Fixture {
    /// A gateway serving bottle `dev` (agent `coder`, token `tok-coder`) and
    /// bottle `ops` (agent `opsbot`, token `tok-ops`), with a listener for
    /// `dev` on a loopback port. Remotes are added with [`Fixture::serve`].
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("bottle-git-")
            .tempdir()
            .expect("tempdir");
        // Upstreams live here and the git user must reach them.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir_all(&state).unwrap();
        // The state directory is private: git must not need to traverse it.
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
        let paths = GatePaths::new(&state, "proj");
        std::fs::create_dir_all(&paths.dir).unwrap();
        let log = Arc::new(GateLog::open(&paths.log()).unwrap());
        let run_as = RunAs::for_this_process();
        let gateway = Arc::new(GitGateway::with_run_as(&paths, log, run_as));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let gw = gateway.clone();
        runtime.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                // As the gate's listener must: without it, Nagle's algorithm
                // and delayed ACKs add ~40 ms stalls to every small answer.
                let _ = stream.set_nodelay(true);
                let gw = gw.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let gw = gw.clone();
                            async move {
                                let req = req.map(|b| b.map_err(|e| e.into()).boxed());
                                Ok::<_, std::convert::Infallible>(gw.handle("dev", req).await)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            dir,
            paths,
            gateway,
            port,
            run_as,
            _runtime: runtime,
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Declare `remotes` for bottle `dev` (and none for `ops`).
    pub fn serve(&self, remotes: &[GateRemote]) -> Vec<String> {
        let agent = |token: &str| AgentCredentials {
            git_token: token.into(),
            ..Default::default()
        };
        let dev: BTreeMap<String, AgentCredentials> =
            [("coder".to_owned(), agent("tok-coder"))].into();
        let ops: BTreeMap<String, AgentCredentials> =
            [("opsbot".to_owned(), agent("tok-ops"))].into();
        let mut problems = self
            .gateway
            .configure("dev", remotes, &dev, &BTreeMap::new());
        problems.extend(self.gateway.configure("ops", &[], &ops, &BTreeMap::new()));
        problems
    }

    /// `http://<user>:<password>@127.0.0.1:<port>/git/<remote>.git`.
    pub fn url(&self, userinfo: Option<&str>, remote: &str) -> String {
        match userinfo {
            Some(u) => format!("http://{u}@127.0.0.1:{}/git/{remote}.git", self.port),
            None => format!("http://127.0.0.1:{}/git/{remote}.git", self.port),
        }
    }

    pub fn coder_url(&self, remote: &str) -> String {
        self.url(Some("coder:tok-coder"), remote)
    }

    /// A bare upstream at `rel` with one commit on `main` (`README`), owned
    /// by the git user so the gateway's git can read and push to it.
    pub fn upstream(&self, rel: &str) -> PathBuf {
        let bare = self.path(rel);
        git_ok(
            self.dir.path(),
            &["init", "-q", "--bare", "-b", "main", rel],
        );
        let work = self.path(&format!("{rel}.seed"));
        git_ok(
            self.dir.path(),
            &["init", "-q", "-b", "main", &work.to_string_lossy()],
        );
        std::fs::write(work.join("README"), "hello from upstream\n").unwrap();
        git_ok(&work, &["add", "README"]);
        git_ok(&work, &["commit", "-q", "-m", "first"]);
        git_ok(&work, &["push", "-q", &bare.to_string_lossy(), "main"]);
        self.own(&bare);
        bare
    }

    /// Give `path` (recursively) to the git user.
    pub fn own(&self, path: &Path) {
        if let Some(r) = self.run_as {
            let out = Command::new("chown")
                .arg("-R")
                .arg(format!("{}:{}", r.uid, r.gid))
                .arg(path)
                .output()
                .unwrap();
            assert!(out.status.success(), "chown: {out:?}");
        }
    }

    /// The gate log's lines.
    pub fn log(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.paths.log())
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("every log line is JSON"))
            .collect()
    }
}

/// A remote `name` for `upstream`, pushes allowed to `push`.
pub fn remote(name: &str, upstream: &Path, push: &[&str]) -> GateRemote {
    GateRemote {
        name: name.into(),
        upstream: upstream.to_string_lossy().into_owned(),
        credentials: None,
        push: push.iter().map(|s| s.to_string()).collect(),
        host_key: None,
    }
}

/// A global git configuration for the test's own git: an identity, and
/// upstreams owned by the git user are safe to use.
pub fn global_config() -> &'static Path {
    static CONFIG: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    CONFIG.get_or_init(|| {
        // One file for every run (same content), replaced atomically.
        let path = std::env::temp_dir().join("bottle-git-test.gitconfig");
        let tmp = path.with_extension(std::process::id().to_string());
        std::fs::write(
            &tmp,
            "[user]\n\tname = T\n\temail = t@example.com\n[safe]\n\tdirectory = *\n",
        )
        .unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        path
    })
}

/// Run git in `cwd` with no user or system configuration (bounded).
pub fn git(cwd: &Path, args: &[&str]) -> Output {
    let mut child = Command::new("git")
        .args(args)
        .current_dir(cwd)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", global_config())
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("LC_ALL", "C")
        .env_remove("GIT_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("git runs");
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if start.elapsed() > GIT_TIMEOUT {
            let _ = child.kill();
            panic!("git {args:?} took longer than {GIT_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// As [`git`], failing the test unless it succeeds; its stdout.
pub fn git_ok(cwd: &Path, args: &[&str]) -> String {
    let out = git(cwd, args);
    assert!(
        out.status.success(),
        "git {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Commit a file in the work tree `work`; the new commit's id.
pub fn commit(work: &Path, file: &str, text: &str) -> String {
    std::fs::write(work.join(file), text).unwrap();
    git_ok(work, &["add", file]);
    git_ok(work, &["commit", "-q", "-m", &format!("change {file}")]);
    git_ok(work, &["rev-parse", "HEAD"]).trim().to_owned()
}
