//! The gate inside a local machine's network.
//!
//! A machine of a gated bottle gets a network namespace of its own with
//! loopback only (bwrap's `--unshare-net`): nothing outside it is
//! reachable. The bottle's gate listens on the host's loopback, so the
//! runtime makes exactly that one port reachable inside: a listening socket
//! on `127.0.0.1:<port>` created *in the guest's namespace* (from a thread
//! that joined it), handed to a relay process that runs in the host's
//! namespace and forwards each connection to the host's `127.0.0.1:<port>`.
//!
//! The address inside is `127.0.0.1` by default; a runtime opened with a
//! [`Gateway`](super::Gateway) (the smolvm double, which plays smolvm's
//! `100.96.0.1`) uses its address instead, added to the namespace's
//! loopback as a `/32` first, and relays one port per relay process.
//!
//! The relay is the bottle executable (`bottle local-gate-relay`, hidden),
//! started detached in its own session, outside the guest's pid namespace
//! (the guest cannot signal it). It ends when the machine's init does, and
//! serves at most [`MAX_CONNECTIONS`] connections at once.

use std::io;
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rustix::event::{PollFd, PollFlags, poll};
use rustix::fs::{Mode, OFlags};
use rustix::process::{Pid, PidfdFlags, pidfd_open};
use rustix::thread::LinkNameSpaceType;

use super::sandbox::InitProcess;

/// The fd the relay finds its listening socket on.
pub const LISTEN_FD: i32 = 3;

/// Connections relayed at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 256;

/// Listen on `address:port` inside the network namespace of `init`; an
/// address other than `127.0.0.1` is added to the namespace's loopback.
pub fn listen_in(init: &InitProcess, address: Ipv4Addr, port: u16) -> io::Result<TcpListener> {
    let ns = rustix::fs::open(
        format!("/proc/{}/ns/net", init.pid),
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    if !init.is_alive() {
        return Err(io::Error::other("the machine's init is gone"));
    }
    // Only this short-lived thread joins the guest's namespace; the socket
    // it creates stays in that namespace wherever its fd goes.
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                rustix::thread::move_into_link_name_space(
                    ns.as_fd(),
                    Some(LinkNameSpaceType::Network),
                )?;
                if address != Ipv4Addr::LOCALHOST {
                    add_to_loopback(address)?;
                }
                TcpListener::bind((address, port))
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the namespace thread panicked")))
    })
}

/// Give the calling thread's network namespace `address/32` on its
/// loopback (`ip address add ADDRESS/32 dev lo label lo:gw`), with the
/// classic interface ioctls: an alias of `lo` takes the address, then the
/// netmask. Setting an address an alias already has changes nothing.
fn add_to_loopback(address: Ipv4Addr) -> io::Result<()> {
    fn sockaddr(address: Ipv4Addr) -> libc::sockaddr {
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(address).to_be(),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: sockaddr_in and sockaddr have the same size; the kernel
        // reads it as a sockaddr_in by its family.
        unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
    }
    // SAFETY: a socket of our own, and ioctls on a fully initialized ifreq.
    unsafe {
        let raw = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        let socket = OwnedFd::from_raw_fd(raw);
        let mut request: libc::ifreq = std::mem::zeroed();
        for (slot, byte) in request.ifr_name.iter_mut().zip(b"lo:gw\0") {
            *slot = *byte as libc::c_char;
        }
        request.ifr_ifru.ifru_addr = sockaddr(address);
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFADDR, &request) < 0 {
            return Err(io::Error::last_os_error());
        }
        request.ifr_ifru.ifru_netmask = sockaddr(Ipv4Addr::BROADCAST);
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFNETMASK, &request) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Start the relay for a running machine: `program local-gate-relay` with
/// the listening socket on fd 3, detached (`setsid -f`).
pub fn spawn(
    setsid: &Path,
    program: &Path,
    listener: TcpListener,
    init: &InitProcess,
    port: u16,
) -> io::Result<()> {
    let fd = OwnedFd::from(listener);
    let raw = fd.as_raw_fd();
    let mut command = Command::new(setsid);
    command
        .arg("-f")
        .arg(program)
        .args([
            "local-gate-relay",
            "--port",
            &port.to_string(),
            "--init-pid",
            &init.pid.to_string(),
            "--init-start",
            &init.start_time.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .env_clear()
        .env("PATH", super::exec::ROOT_PATH);
    // SAFETY: dup2, fcntl and close_range only, on fds known before the fork.
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(move || {
            if raw == LISTEN_FD {
                let fd = std::os::fd::BorrowedFd::borrow_raw(raw);
                rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty())?;
            } else if libc::dup2(raw, LISTEN_FD) < 0 {
                return Err(io::Error::last_os_error());
            }
            super::exec::cloexec_from(LISTEN_FD as u32 + 1, None)?;
            Ok(())
        });
    }
    let status = command.status()?;
    drop(fd);
    if !status.success() {
        return Err(io::Error::other(format!(
            "the gate relay did not start ({status})"
        )));
    }
    Ok(())
}

/// The relay itself (`bottle local-gate-relay`): forward every connection
/// accepted on fd 3 to the host's `127.0.0.1:port` until the machine's
/// init (`pid`, with its start time) is gone.
pub fn serve(port: u16, pid: u32, start_time: u64) -> io::Result<()> {
    let init = InitProcess {
        pid,
        start_time,
        boot_id: super::sandbox::boot_id().to_owned(),
    };
    let pidfd = Pid::from_raw(pid as i32)
        .ok_or_else(|| io::Error::other("no such process"))
        .and_then(|p| pidfd_open(p, PidfdFlags::empty()).map_err(io::Error::from))?;
    if !init.is_alive() {
        return Ok(());
    }
    // SAFETY: fd 3 was set up by `spawn` as the listening socket.
    let listener = unsafe { TcpListener::from_raw_fd(LISTEN_FD) };
    std::thread::spawn(move || {
        // Readable once the init exits.
        let mut fds = [PollFd::new(&pidfd, PollFlags::IN)];
        loop {
            match poll(&mut fds, None) {
                Ok(n) if n > 0 => std::process::exit(0),
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    });
    let active = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        let Ok(inside) = conn else { continue };
        if active.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
            // Over the limit: this one is refused, the others go on.
            let _ = inside.shutdown(Shutdown::Both);
            continue;
        }
        active.fetch_add(1, Ordering::SeqCst);
        let active = active.clone();
        std::thread::spawn(move || {
            if let Ok(outside) = TcpStream::connect((Ipv4Addr::LOCALHOST, port)) {
                pipe(inside, outside);
            }
            active.fetch_sub(1, Ordering::SeqCst);
        });
    }
    Ok(())
}

/// Copy both ways until both sides are done.
fn pipe(a: TcpStream, b: TcpStream) {
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else {
        return;
    };
    let up = std::thread::spawn(move || copy_then_close(a2, b2));
    copy_then_close(b, a);
    let _ = up.join();
}

fn copy_then_close(mut from: TcpStream, mut to: TcpStream) {
    let _ = io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}
