//! The gate's cost on loopback: latency it adds per request (a CONNECT
//! tunnel, and an intercepted request that gets a secret), requests per
//! second through one gate, and its resident memory with 100 agents
//! connected. The gate is the real `bottle gate run` (started as `apply`
//! starts it); upstreams are servers of this program on 127.0.0.1.
//!
//! `cargo bench --bench gate` (add `-- N` to change the sample count).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bottle::gate::config::{AgentCredentials, BottleGate, CONFIG_FORMAT, GateConfig, GateSecret};
use bottle::gate::control::Health;
use http_body_util::BodyExt;
use tokio_rustls::rustls;

const SECRET: &str = "bench-secret-value";

fn summary(name: &str, mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    let pct = |p: usize| samples[(samples.len() * p / 100).min(samples.len() - 1)];
    println!(
        "{name:<44} n={:<5} median {:>7.3} ms   p90 {:>7.3} ms",
        samples.len(),
        pct(50).as_secs_f64() * 1e3,
        pct(90).as_secs_f64() * 1e3,
    );
    pct(50)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// An HTTP echo server (TLS or not) on 127.0.0.1: answers `ok`.
async fn serve(listener: tokio::net::TcpListener, tls: Option<Arc<rustls::ServerConfig>>) {
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let tls = tls.clone();
        tokio::spawn(async move {
            let service = service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                let _ = req.into_body().collect().await;
                Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
                    bytes::Bytes::from_static(b"ok"),
                )))
            });
            let builder = hyper::server::conn::http1::Builder::new();
            match tls {
                Some(tls) => {
                    if let Ok(s) = tokio_rustls::TlsAcceptor::from(tls).accept(stream).await {
                        let _ = builder.serve_connection(TokioIo::new(s), service).await;
                    }
                }
                None => {
                    let _ = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                }
            }
        });
    }
}

fn basic(user_pass: &str) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in user_pass.as_bytes().chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Read one response (headers and a Content-Length body); its status.
fn read_response(reader: &mut impl BufRead) -> String {
    let mut status = String::new();
    reader.read_line(&mut status).unwrap();
    let mut length = 0;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap();
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    status
}

fn get(stream: &mut (impl Read + Write), extra: &str) -> String {
    write!(stream, "GET / HTTP/1.1\r\nHost: localhost\r\n{extra}\r\n").unwrap();
    stream.flush().unwrap();
    let mut reader = BufReader::new(stream);
    read_response(&mut reader)
}

/// A TCP connection through the gate's tunnel to `localhost:port`.
fn tunnel(gate: u16, port: u16, user: &str) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", gate)).unwrap();
    s.set_nodelay(true).unwrap();
    write!(
        s,
        "CONNECT localhost:{port} HTTP/1.1\r\nHost: localhost:{port}\r\nProxy-Authorization: Basic {}\r\n\r\n",
        basic(user)
    )
    .unwrap();
    // Read exactly the CONNECT answer, byte by byte (nothing follows it
    // until the client speaks).
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s
}

fn tls_client(roots: &[&Path]) -> Arc<rustls::ClientConfig> {
    let mut store = rustls::RootCertStore::empty();
    for path in roots {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        for cert in CertificateDer::pem_file_iter(path).unwrap() {
            store.add(cert.unwrap()).unwrap();
        }
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(store)
            .with_no_client_auth(),
    )
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

fn tls_over(config: &Arc<rustls::ClientConfig>, tcp: TcpStream) -> Tls {
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(config.clone(), name).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(500);
    let dir = tempfile::tempdir().unwrap();

    // A CA for the upstream, trusted by the gate through SSL_CERT_FILE.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let upstream_ca = dir.path().join("upstream-ca.pem");
    std::fs::write(&upstream_ca, ca_cert.pem()).unwrap();
    // SAFETY: no other thread exists yet.
    unsafe { std::env::set_var("SSL_CERT_FILE", &upstream_ca) };
    let mut server_tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .unwrap();
    server_tls.alpn_protocols = vec![b"http/1.1".to_vec()];

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (plain, secure) = runtime.block_on(async {
        let bind = || tokio::net::TcpListener::bind("127.0.0.1:0");
        (bind().await.unwrap(), bind().await.unwrap())
    });
    let plain_port = plain.local_addr().unwrap().port();
    let tls_port = secure.local_addr().unwrap().port();
    runtime.spawn(serve(plain, None));
    runtime.spawn(serve(secure, Some(Arc::new(server_tls))));

    // 10 bottles of 10 agents; bottle b0's secret goes to the TLS upstream.
    let mut config = GateConfig {
        format_version: CONFIG_FORMAT,
        project: "bench".into(),
        bottles: BTreeMap::new(),
    };
    for b in 0..10 {
        let agents = (0..10)
            .map(|a| {
                let creds = AgentCredentials {
                    proxy_token: format!("token-{b}-{a}"),
                    placeholders: [("KEY".to_owned(), format!("ph-{b}-{a}"))].into(),
                    ..Default::default()
                };
                (format!("agent{a}"), creds)
            })
            .collect();
        config.bottles.insert(
            format!("b{b}"),
            BottleGate {
                port: 0,
                allow_hosts: vec![format!("localhost:{plain_port}")],
                allow_internal: vec!["127.0.0.0/8".into()],
                secrets: vec![GateSecret {
                    name: "KEY".into(),
                    hosts: vec![format!("localhost:{tls_port}")],
                    value_key: "KEY".into(),
                }],
                agents,
                ..Default::default()
            },
        );
    }
    let secrets = [("KEY".to_owned(), SECRET.to_owned())].into();
    let exe = Path::new(env!("CARGO_BIN_EXE_bottle"));
    let health: Health =
        bottle::gate::server::start_detached(exe, dir.path(), &config, &secrets).unwrap();
    let gate = health.ports["b0"];
    let paths = bottle::gate::paths::GatePaths::new(dir.path(), "bench");
    let user = "agent0:token-0-0";
    println!(
        "gate pid {}, resident at start {:.1} MiB",
        health.pid,
        rss_kib(health.pid) as f64 / 1024.0
    );

    // 1. A new connection and one request: direct, and through a tunnel.
    for _ in 0..50 {
        get(&mut tunnel(gate, plain_port, user), "");
    }
    let mut direct = Vec::new();
    let mut tunnelled = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        let mut s = TcpStream::connect(("127.0.0.1", plain_port)).unwrap();
        s.set_nodelay(true).unwrap();
        get(&mut s, "");
        direct.push(t.elapsed());
        let t = Instant::now();
        get(&mut tunnel(gate, plain_port, user), "");
        tunnelled.push(t.elapsed());
    }
    let d = summary("new connection + GET, direct", direct);
    let v = summary("new connection + GET, CONNECT tunnel", tunnelled);
    println!(
        "  added per tunnelled request (median): {:.3} ms",
        (v.as_secs_f64() - d.as_secs_f64()) * 1e3
    );

    // 2. Requests on an open connection: direct, and in an open tunnel.
    let mut s = TcpStream::connect(("127.0.0.1", plain_port)).unwrap();
    s.set_nodelay(true).unwrap();
    let mut t_open = tunnel(gate, plain_port, user);
    let (mut direct, mut tunnelled) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let t = Instant::now();
        get(&mut s, "");
        direct.push(t.elapsed());
        let t = Instant::now();
        get(&mut t_open, "");
        tunnelled.push(t.elapsed());
    }
    let d = summary("GET on an open connection, direct", direct);
    let v = summary("GET in an open tunnel", tunnelled);
    println!(
        "  added per request in an open tunnel (median): {:.3} ms",
        (v.as_secs_f64() - d.as_secs_f64()) * 1e3
    );

    // 3. HTTPS: direct (upstream CA) vs intercepted (project CA), a new
    // connection per request, and on an open connection.
    let direct_tls = tls_client(&[&upstream_ca]);
    let gate_tls = tls_client(&[&paths.ca_cert()]);
    let header = "x-api-key: ph-0-0\r\n";
    for _ in 0..20 {
        get(
            &mut tls_over(&gate_tls, tunnel(gate, tls_port, user)),
            header,
        );
    }
    let (mut direct, mut intercepted) = (Vec::new(), Vec::new());
    for _ in 0..n / 5 {
        let t = Instant::now();
        let tcp = TcpStream::connect(("127.0.0.1", tls_port)).unwrap();
        tcp.set_nodelay(true).unwrap();
        get(&mut tls_over(&direct_tls, tcp), header);
        direct.push(t.elapsed());
        let t = Instant::now();
        get(
            &mut tls_over(&gate_tls, tunnel(gate, tls_port, user)),
            header,
        );
        intercepted.push(t.elapsed());
    }
    let d = summary("new TLS connection + GET, direct", direct);
    let v = summary("new TLS connection + GET, intercepted", intercepted);
    println!(
        "  added per intercepted request, new connection (median): {:.3} ms",
        (v.as_secs_f64() - d.as_secs_f64()) * 1e3
    );
    let tcp = TcpStream::connect(("127.0.0.1", tls_port)).unwrap();
    tcp.set_nodelay(true).unwrap();
    let mut d_open = tls_over(&direct_tls, tcp);
    let mut i_open = tls_over(&gate_tls, tunnel(gate, tls_port, user));
    let (mut direct, mut intercepted) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let t = Instant::now();
        get(&mut d_open, header);
        direct.push(t.elapsed());
        let t = Instant::now();
        get(&mut i_open, header);
        intercepted.push(t.elapsed());
    }
    let d = summary("GET on an open TLS connection, direct", direct);
    let v = summary("GET on an open intercepted connection", intercepted);
    println!(
        "  added per intercepted request, open connection (median): {:.3} ms",
        (v.as_secs_f64() - d.as_secs_f64()) * 1e3
    );

    // 4. Requests per second through one gate: 16 clients, a new tunnel
    // per request, for 3 s.
    let stop = Instant::now() + Duration::from_secs(3);
    let started = Instant::now();
    let total: usize = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..16)
            .map(|_| {
                scope.spawn(move || {
                    let mut count = 0;
                    while Instant::now() < stop {
                        get(&mut tunnel(gate, plain_port, user), "");
                        count += 1;
                    }
                    count
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    println!(
        "{:<44} {:.0} requests/s (16 clients, a new tunnel each)",
        "throughput",
        total as f64 / started.elapsed().as_secs_f64()
    );
    let mut open = Vec::new();
    let stop = Instant::now() + Duration::from_secs(3);
    let started = Instant::now();
    let total: usize = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..16)
            .map(|_| {
                scope.spawn(move || {
                    let mut s = tunnel(gate, plain_port, user);
                    let mut count = 0;
                    while Instant::now() < stop {
                        get(&mut s, "");
                        count += 1;
                    }
                    count
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    println!(
        "{:<44} {:.0} requests/s (16 clients, open tunnels)",
        "throughput",
        total as f64 / started.elapsed().as_secs_f64()
    );

    // 5. Resident memory with 100 agents connected: each holds an open
    // tunnel and an open intercepted connection on its bottle's listener.
    for b in 0..10 {
        let port = health.ports[&format!("b{b}")];
        for a in 0..10 {
            let user = format!("agent{a}:token-{b}-{a}");
            let mut t = tunnel(port, plain_port, &user);
            get(&mut t, "");
            let mut i = tls_over(&gate_tls, tunnel(port, tls_port, &user));
            get(&mut i, &format!("x-api-key: ph-{b}-{a}\r\n"));
            open.push((t, i));
        }
    }
    println!(
        "{:<44} {:.1} MiB ({} agents, {} open connections)",
        "resident memory of the gate",
        rss_kib(health.pid) as f64 / 1024.0,
        open.len(),
        open.len() * 2
    );
    drop(open);
    bottle::gate::server::stop(&paths, Duration::from_secs(10)).unwrap();
}
