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
//! A runtime opened with a [`Gateway`](super::Gateway) (the smolvm double,
//! which plays smolvm's `100.96.0.1`) relays *every* port of the gateway's
//! address instead, as smolvm does: the address is added to the
//! namespace's loopback as a `/32`, one listener is bound to it, and a BPF
//! `sk_lookup` program attached to the namespace hands that listener every
//! TCP connection to the address, whatever its port (the kernel's own
//! mechanism for "listen on all ports", Linux 5.9+). The relay forwards
//! each to the same port on the host's loopback; it holds the BPF link
//! (fd 4), so the program goes when the relay does.
//!
//! The relay is the bottle executable (`bottle local-gate-relay`, hidden),
//! started detached in its own session, outside the guest's pid namespace
//! (the guest cannot signal it). It ends when the machine's init does, and
//! serves at most [`MAX_CONNECTIONS`] connections at once.

use std::io;
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
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
/// The fd the relay keeps its BPF link on, if it has one.
pub const LINK_FD: i32 = 4;

/// Connections relayed at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 256;

/// Listen on `127.0.0.1:port` inside the network namespace of `init`.
pub fn listen_in(init: &InitProcess, port: u16) -> io::Result<TcpListener> {
    in_namespace_of(init, |_| TcpListener::bind((Ipv4Addr::LOCALHOST, port)))
}

/// Listen inside the network namespace of `init` for TCP connections to
/// `address` on every port (see the module's documentation): the listener,
/// and the BPF link that must stay open for as long as it serves.
pub fn listen_every_port_in(
    init: &InitProcess,
    address: Ipv4Addr,
) -> io::Result<(TcpListener, OwnedFd)> {
    in_namespace_of(init, |ns| {
        add_to_loopback(address)?;
        let listener = TcpListener::bind((address, 0))?;
        let link = sk_lookup::attach(ns, &listener, address)?;
        Ok((listener, link))
    })
}

/// Run `f` on a short-lived thread that joined the network namespace of
/// `init` (given the namespace's fd); only that thread is ever in it, and a
/// socket it creates stays in that namespace wherever its fd goes.
fn in_namespace_of<T: Send>(
    init: &InitProcess,
    f: impl FnOnce(BorrowedFd<'_>) -> io::Result<T> + Send,
) -> io::Result<T> {
    let ns = rustix::fs::open(
        format!("/proc/{}/ns/net", init.pid),
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    if !init.is_alive() {
        return Err(io::Error::other("the machine's init is gone"));
    }
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                rustix::thread::move_into_link_name_space(
                    ns.as_fd(),
                    Some(LinkNameSpaceType::Network),
                )?;
                f(ns.as_fd())
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
/// the listening socket on fd 3 (and `link`, if any, on fd 4), detached
/// (`setsid -f`). `port` 0: each connection goes to its own port.
pub fn spawn(
    setsid: &Path,
    program: &Path,
    listener: TcpListener,
    link: Option<OwnedFd>,
    init: &InitProcess,
    port: u16,
) -> io::Result<()> {
    // Above fd 4 first, so that placing one cannot overwrite the other.
    let high = |fd: &dyn AsFd| rustix::io::fcntl_dupfd_cloexec(fd, LINK_FD + 1);
    let listener = high(&listener)?;
    let link = link.as_ref().map(|l| high(l)).transpose()?;
    let raws = (listener.as_raw_fd(), link.as_ref().map(|l| l.as_raw_fd()));
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
    // SAFETY: dup2 and close_range only, on fds known before the fork.
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(move || {
            // dup2 leaves the copies without CLOEXEC.
            if libc::dup2(raws.0, LISTEN_FD) < 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some(link) = raws.1
                && libc::dup2(link, LINK_FD) < 0
            {
                return Err(io::Error::last_os_error());
            }
            super::exec::cloexec_from(LINK_FD as u32 + 1, None)?;
            Ok(())
        });
    }
    let status = command.status()?;
    drop((listener, link));
    if !status.success() {
        return Err(io::Error::other(format!(
            "the gate relay did not start ({status})"
        )));
    }
    Ok(())
}

/// The relay itself (`bottle local-gate-relay`): forward every connection
/// accepted on fd 3 to the host's `127.0.0.1:port` (port 0: the port the
/// connection was made to) until the machine's init (`pid`, with its start
/// time) is gone.
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
        let port = match port {
            0 => inside.local_addr().map_or(0, |a| a.port()),
            port => port,
        };
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

/// The `sk_lookup` program that hands every TCP connection to one address
/// to one listener, by raw `bpf(2)` calls (no loader library).
mod sk_lookup {
    use std::io;
    use std::net::{Ipv4Addr, TcpListener};
    use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

    // bpf(2) commands, map, program and attach types (linux/bpf.h).
    const BPF_MAP_CREATE: i32 = 0;
    const BPF_MAP_UPDATE_ELEM: i32 = 2;
    const BPF_PROG_LOAD: i32 = 5;
    const BPF_LINK_CREATE: i32 = 28;
    const BPF_MAP_TYPE_SOCKMAP: u32 = 15;
    const BPF_PROG_TYPE_SK_LOOKUP: u32 = 30;
    const BPF_SK_LOOKUP: u32 = 36;
    // Helpers.
    const MAP_LOOKUP_ELEM: i32 = 1;
    const SK_RELEASE: i32 = 86;
    const SK_ASSIGN: i32 = 124;
    // Offsets in `struct bpf_sk_lookup`.
    const PROTOCOL: i16 = 12;
    const LOCAL_IP4: i16 = 40;

    /// A `union bpf_attr`, zeroed, of the size the kernel is told.
    #[repr(C, align(8))]
    struct Attr([u8; 128]);

    impl Attr {
        fn new() -> Self {
            Attr([0; 128])
        }
        fn u32(mut self, offset: usize, value: u32) -> Self {
            self.0[offset..offset + 4].copy_from_slice(&value.to_ne_bytes());
            self
        }
        fn u64(mut self, offset: usize, value: u64) -> Self {
            self.0[offset..offset + 8].copy_from_slice(&value.to_ne_bytes());
            self
        }
    }

    fn bpf(command: i32, attr: &Attr) -> io::Result<i64> {
        // SAFETY: `attr` is a valid, initialized bpf_attr of the size given;
        // pointers in it point to memory that outlives the call.
        let r = unsafe { libc::syscall(libc::SYS_bpf, command, attr.0.as_ptr(), attr.0.len()) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(r)
    }

    fn bpf_fd(command: i32, attr: &Attr) -> io::Result<OwnedFd> {
        let fd = bpf(command, attr)?;
        // SAFETY: these commands return a new fd that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    /// One instruction: opcode, registers, offset, immediate.
    fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> [u8; 8] {
        let mut out = [0; 8];
        out[0] = code;
        out[1] = dst | (src << 4);
        out[2..4].copy_from_slice(&off.to_le_bytes());
        out[4..8].copy_from_slice(&imm.to_le_bytes());
        out
    }

    /// The program: a TCP lookup for `address` gets the socket in slot 0 of
    /// `map`; any other lookup goes on as if there were no program.
    fn program(map: i32, address: Ipv4Addr) -> Vec<[u8; 8]> {
        let ip = i32::from_ne_bytes(address.octets());
        vec![
            insn(0xbf, 6, 1, 0, 0),               // r6 = ctx
            insn(0x61, 2, 6, PROTOCOL, 0),        // r2 = ctx->protocol
            insn(0x55, 2, 0, 16, 6),              // if r2 != TCP goto pass
            insn(0x61, 2, 6, LOCAL_IP4, 0),       // r2 = ctx->local_ip4
            insn(0x55, 2, 0, 14, ip),             // if r2 != address goto pass
            insn(0x18, 1, 1, 0, map),             // r1 = map (two slots)
            insn(0, 0, 0, 0, 0),                  //
            insn(0x62, 10, 0, -4, 0),             // *(u32 *)(fp - 4) = 0
            insn(0xbf, 2, 10, 0, 0),              // r2 = fp
            insn(0x07, 2, 0, 0, -4),              // r2 -= 4
            insn(0x85, 0, 0, 0, MAP_LOOKUP_ELEM), // r0 = map[0]
            insn(0x15, 0, 0, 7, 0),               // if !r0 goto pass
            insn(0xbf, 7, 0, 0, 0),               // r7 = r0
            insn(0xbf, 1, 6, 0, 0),               // r1 = ctx
            insn(0xbf, 2, 7, 0, 0),               // r2 = socket
            insn(0xb7, 3, 0, 0, 0),               // r3 = 0
            insn(0x85, 0, 0, 0, SK_ASSIGN),       // sk_assign(ctx, socket, 0)
            insn(0xbf, 1, 7, 0, 0),               // r1 = socket
            insn(0x85, 0, 0, 0, SK_RELEASE),      // sk_release(socket)
            insn(0xb7, 0, 0, 0, 1),               // pass: r0 = SK_PASS
            insn(0x95, 0, 0, 0, 0),               // exit
        ]
    }

    /// Attach to the network namespace `ns` a program that hands every TCP
    /// connection to `address` to `listener`; the link it returns detaches
    /// it when closed.
    pub fn attach(
        ns: BorrowedFd<'_>,
        listener: &TcpListener,
        address: Ipv4Addr,
    ) -> io::Result<OwnedFd> {
        let context = |what: &'static str| {
            move |e: io::Error| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "{what}: {e} (relaying every port of the gateway needs Linux 5.9 or \
                         later with BPF, and root)"
                    ),
                )
            }
        };
        let map = bpf_fd(
            BPF_MAP_CREATE,
            &Attr::new()
                .u32(0, BPF_MAP_TYPE_SOCKMAP)
                .u32(4, 4)
                .u32(8, 8)
                .u32(12, 1),
        )
        .map_err(context("creating the BPF socket map"))?;
        let key = 0u32;
        let value = listener.as_raw_fd() as u64;
        bpf(
            BPF_MAP_UPDATE_ELEM,
            &Attr::new()
                .u32(0, map.as_raw_fd() as u32)
                .u64(8, &key as *const u32 as u64)
                .u64(16, &value as *const u64 as u64),
        )
        .map_err(context("putting the listener in the BPF socket map"))?;
        let code = program(map.as_raw_fd(), address);
        let license = c"GPL";
        let prog = bpf_fd(
            BPF_PROG_LOAD,
            &Attr::new()
                .u32(0, BPF_PROG_TYPE_SK_LOOKUP)
                .u32(4, code.len() as u32)
                .u64(8, code.as_ptr() as u64)
                .u64(16, license.as_ptr() as u64)
                .u32(68, BPF_SK_LOOKUP),
        )
        .map_err(context("loading the BPF sk_lookup program"))?;
        bpf_fd(
            BPF_LINK_CREATE,
            &Attr::new()
                .u32(0, prog.as_raw_fd() as u32)
                .u32(4, ns.as_raw_fd() as u32)
                .u32(8, BPF_SK_LOOKUP),
        )
        .map_err(context(
            "attaching the BPF program to the machine's network",
        ))
    }
}
