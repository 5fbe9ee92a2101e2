//! `git http-backend` as a CGI child: the request body streamed to its
//! stdin, its stdout parsed for the CGI headers and streamed back as the
//! response body, every read and write bounded by an idle timeout.

use std::pin::Pin;
use std::process::{ExitStatus, Stdio};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Frame, SizeHint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::Confine;
use crate::gate::http::{Body, BoxError, Response};

/// Stop waiting for a peer (the client's body, git's output) after this
/// long without a byte.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// The most CGI header bytes read before the body.
const MAX_HEADER: usize = 64 << 10;
/// The most stderr kept (for the log).
const MAX_STDERR: usize = 16 << 10;

/// What the child said and how it ended, handed to the caller's `finish`
/// once the response body has been sent (or abandoned).
#[derive(Debug)]
pub struct Outcome {
    /// `None`: killed (timeout, client gone).
    pub status: Option<ExitStatus>,
    pub stderr: String,
    /// The request body was longer than allowed and was cut off.
    pub body_too_large: bool,
}

pub struct Cgi {
    pub confine: Confine,
    pub env: Vec<(String, String)>,
    /// The most request-body bytes passed to git.
    pub body_limit: u64,
}

/// Run `git http-backend` for one request.
pub async fn run(
    cgi: Cgi,
    body: Body,
    finish: Box<dyn FnOnce(Outcome) + Send>,
) -> Result<Response, String> {
    let mut cmd = tokio::process::Command::new("git");
    cmd.arg("http-backend")
        .env_clear()
        .envs(cgi.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    super::confine(cmd.as_std_mut(), &cgi.confine);
    // Its own process group: receive-pack, the hook and its upstream push
    // are killed with it.
    cmd.process_group(0);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start git http-backend: {e}"))?;
    let group = KillGroup(child.id());
    let mut stdin = child.stdin.take().expect("piped");
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");

    // The request body, pumped concurrently with reading the answer.
    let limit = cgi.body_limit;
    let pump = tokio::spawn(async move {
        let mut body = body;
        let mut sent = 0u64;
        loop {
            let frame = match tokio::time::timeout(IDLE_TIMEOUT, body.frame()).await {
                Ok(Some(Ok(frame))) => frame,
                // End, a broken client or a silent one: git sees EOF.
                _ => return false,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            sent += data.len() as u64;
            if sent > limit {
                return true;
            }
            match tokio::time::timeout(IDLE_TIMEOUT, stdin.write_all(&data)).await {
                Ok(Ok(())) => {}
                _ => return false,
            }
        }
    });
    let errors = tokio::spawn(async move {
        let mut kept = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut buf).await {
            if n == 0 {
                break;
            }
            let room = MAX_STDERR.saturating_sub(kept.len());
            kept.extend_from_slice(&buf[..n.min(room)]);
        }
        String::from_utf8_lossy(&kept).into_owned()
    });

    // The CGI headers.
    let mut head = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let (header_end, body_start) = loop {
        if let Some(found) = find_header_end(&head) {
            break found;
        }
        if head.len() > MAX_HEADER {
            return Err("git http-backend sent an oversized header".into());
        }
        let n = match tokio::time::timeout(IDLE_TIMEOUT, stdout.read(&mut buf)).await {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(format!("reading git http-backend: {e}")),
            Err(_) => return Err("git http-backend did not answer in time".into()),
        };
        if n == 0 {
            let stderr = errors.await.unwrap_or_default();
            return Err(format!(
                "git http-backend ended without an answer: {}",
                stderr.trim()
            ));
        }
        head.extend_from_slice(&buf[..n]);
    };
    let mut response = http::Response::builder().status(200);
    for line in String::from_utf8_lossy(&head[..header_end]).lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("status") {
            let code = value.split(' ').next().unwrap_or("");
            response = response.status(code.parse::<u16>().unwrap_or(502));
        } else if ["content-type", "cache-control", "expires", "pragma"]
            .iter()
            .any(|h| name.eq_ignore_ascii_case(h))
        {
            response = response.header(name, value);
        }
    }
    let first = Bytes::copy_from_slice(&head[body_start..]);

    // The body, streamed; the child is waited for (and `finish` called)
    // when it ends, or killed when the client goes away.
    let (tx, rx) = mpsc::channel::<Result<Bytes, BoxError>>(8);
    tokio::spawn(async move {
        let mut alive = true;
        // A client that stops reading is a client gone.
        let send = |tx: &mpsc::Sender<Result<Bytes, BoxError>>, item| {
            let tx = tx.clone();
            async move {
                matches!(
                    tokio::time::timeout(IDLE_TIMEOUT, tx.send(item)).await,
                    Ok(Ok(()))
                )
            }
        };
        if !first.is_empty() && !send(&tx, Ok(first)).await {
            alive = false;
        }
        while alive {
            match tokio::time::timeout(IDLE_TIMEOUT, stdout.read(&mut buf)).await {
                Ok(Ok(0)) => break,
                Ok(Ok(n)) => {
                    if !send(&tx, Ok(Bytes::copy_from_slice(&buf[..n]))).await {
                        alive = false;
                    }
                }
                Ok(Err(e)) => {
                    let _ = tx.send(Err(Box::new(e))).await;
                    alive = false;
                }
                Err(_) => {
                    let _ = tx.send(Err("git http-backend went silent".into())).await;
                    alive = false;
                }
            }
        }
        drop(tx);
        let status = if alive {
            match tokio::time::timeout(Duration::from_secs(30), child.wait()).await {
                Ok(Ok(status)) => Some(status),
                _ => None,
            }
        } else {
            None
        };
        if status.is_none() {
            group.kill();
            let _ = child.kill().await;
        } else {
            group.disarm();
        }
        let body_too_large = pump.await.unwrap_or(false);
        let stderr = errors.await.unwrap_or_default();
        finish(Outcome {
            status,
            stderr,
            body_too_large,
        });
    });
    response
        .body(Body::new(ChannelBody { rx }))
        .map_err(|e| format!("git http-backend sent a bad header: {e}"))
}

/// Kills a child's whole process group when dropped (unless disarmed):
/// an error path that drops the child takes its descendants with it.
pub struct KillGroup(pub Option<u32>);

impl KillGroup {
    pub fn kill(&self) {
        if let Some(pid) = self.0
            && let Ok(pid) = i32::try_from(pid)
        {
            // SAFETY: a plain system call; the group is the child's own.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
        }
    }
    pub fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for KillGroup {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `(end of the header text, start of the body)`.
fn find_header_end(buf: &[u8]) -> Option<(usize, usize)> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n");
    let lf = buf.windows(2).position(|w| w == b"\n\n");
    match (crlf, lf) {
        (Some(a), Some(b)) if b < a => Some((b, b + 2)),
        (Some(a), _) => Some((a, a + 4)),
        (None, Some(b)) => Some((b, b + 2)),
        (None, None) => None,
    }
}

/// A response body fed by a channel.
struct ChannelBody {
    rx: mpsc::Receiver<Result<Bytes, BoxError>>,
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.rx
            .poll_recv(cx)
            .map(|item| item.map(|r| r.map(Frame::data)))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_end() {
        assert_eq!(find_header_end(b"A: b\r\n\r\nbody"), Some((4, 8)));
        assert_eq!(find_header_end(b"A: b\n\nbody"), Some((4, 6)));
        assert_eq!(find_header_end(b"A: b\r\n"), None);
    }
}
