//! Building a machine's persistent root directory at create time.
//!
//! The root holds everything a guest may change (`/etc`, `/root`, `/home`,
//! `/usr/local`, `/var`, `/tmp`, `/workspace`, `/opt`, ... and whatever it
//! creates at the top level). The system directories (`/usr` and `/bin`,
//! `/lib`, ... when they are not merged-usr symlinks) are mount points only:
//! they are bound read-only from the host or from a rootfs at each start.

use std::fs::{self, Metadata, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt, lchown, symlink};
use std::path::{Path, PathBuf};

use super::accounts::{RegularIds, SystemAccounts};

/// Top-level entries that come from the system source, never from the
/// machine: `usr` always, the others when the source has them.
pub const SYSTEM_DIRS: [&str; 7] = ["usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32"];

/// Kernel filesystems mounted fresh at each start.
pub const VIRTUAL_DIRS: [&str; 4] = ["proc", "dev", "sys", "run"];

/// How one of [`SYSTEM_DIRS`] appears in the system source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SystemEntry {
    /// A merged-usr symlink such as `bin -> usr/bin`, reproduced as is.
    Symlink(PathBuf),
    /// A real directory, bound read-only at start.
    Dir,
}

/// The system entries present in `sys_root` (`/` for the host).
pub fn system_entries(sys_root: &Path) -> io::Result<Vec<(&'static str, SystemEntry)>> {
    let mut out = Vec::new();
    for name in SYSTEM_DIRS {
        let path = sys_root.join(name);
        // `/usr` is always mounted as a directory, whatever leads to it.
        if name == "usr" {
            if fs::metadata(&path).is_ok_and(|m| m.is_dir()) {
                out.push((name, SystemEntry::Dir));
            }
            continue;
        }
        match fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => {
                out.push((name, SystemEntry::Symlink(fs::read_link(&path)?)))
            }
            Ok(m) if m.is_dir() => out.push((name, SystemEntry::Dir)),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// What the new root is seeded from.
pub struct SeedSource<'a> {
    /// `/` for the host, or the rootfs directory.
    pub sys_root: &'a Path,
    /// True for the host: only a filtered `/etc` is taken from it.
    pub host: bool,
}

/// Build a machine root at `root` (which must not exist).
pub fn seed_root(
    root: &Path,
    source: &SeedSource,
    hostname: &str,
    network: bool,
) -> io::Result<()> {
    make_dir(root, 0o755)?;
    if source.host {
        copy_host_etc(&source.sys_root.join("etc"), &root.join("etc"))?;
    } else {
        copy_rootfs_top(source.sys_root, root)?;
    }
    skeleton(root, source.sys_root)?;
    for (name, entry) in system_entries(source.sys_root)? {
        let path = root.join(name);
        match entry {
            SystemEntry::Symlink(target) => symlink(target, &path)?,
            SystemEntry::Dir => make_dir(&path, 0o755)?,
        }
    }
    write_identity(root, hostname)?;
    if source.host || network {
        write_resolv_conf(&root.join("etc"))?;
    }
    Ok(())
}

/// The directories every machine has, created if the seed lacked them.
fn skeleton(root: &Path, sys_root: &Path) -> io::Result<()> {
    let dirs: &[(&str, u32)] = &[
        ("etc", 0o755),
        ("root", 0o700),
        ("home", 0o755),
        ("tmp", 0o1777),
        ("workspace", 0o755),
        ("opt", 0o755),
        ("srv", 0o755),
        ("mnt", 0o755),
        ("media", 0o755),
        ("usr", 0o755),
        ("usr/local", 0o755),
        ("usr/local/bin", 0o755),
        ("usr/local/etc", 0o755),
        ("usr/local/games", 0o755),
        ("usr/local/include", 0o755),
        ("usr/local/lib", 0o755),
        ("usr/local/sbin", 0o755),
        ("usr/local/share", 0o755),
        ("usr/local/share/man", 0o755),
        ("usr/local/share/ca-certificates", 0o755),
        ("usr/local/src", 0o755),
        ("var", 0o755),
        ("var/backups", 0o755),
        ("var/cache", 0o755),
        ("var/lib", 0o755),
        ("var/local", 0o755),
        ("var/log", 0o755),
        ("var/mail", 0o755),
        ("var/opt", 0o755),
        ("var/spool", 0o755),
        ("var/tmp", 0o1777),
        ("proc", 0o555),
        ("dev", 0o755),
        ("sys", 0o555),
        ("run", 0o755),
    ];
    for (dir, mode) in dirs {
        let path = root.join(dir);
        if fs::symlink_metadata(&path).is_err() {
            make_dir(&path, *mode)?;
        }
    }
    let links: &[(&str, &str)] = &[
        ("usr/local/man", "share/man"),
        ("var/run", "/run"),
        ("var/lock", "/run/lock"),
    ];
    for (link, target) in links {
        let path = root.join(link);
        if fs::symlink_metadata(&path).is_err() {
            symlink(target, &path)?;
        }
    }
    // The login records Debian's base image has, so `useradd` and `login`
    // tools find them.
    let utmp = group_id(&root.join("etc/group"), "utmp").unwrap_or(0);
    for (file, mode, gid) in [
        ("var/log/lastlog", 0o664, utmp),
        ("var/log/wtmp", 0o664, utmp),
        ("var/log/btmp", 0o660, utmp),
        ("var/log/faillog", 0o644, 0),
    ] {
        let path = root.join(file);
        if fs::symlink_metadata(&path).is_err() {
            write_file(&path, b"", mode, 0, gid)?;
        }
    }
    // Root's shell profile, as Debian's base-files installs it.
    for (from, to) in [
        ("dot.bashrc", "root/.bashrc"),
        ("dot.profile", "root/.profile"),
    ] {
        let src = sys_root.join("usr/share/base-files").join(from);
        let dst = root.join(to);
        if fs::symlink_metadata(&dst).is_err()
            && let Ok(content) = fs::read(&src)
        {
            write_file(&dst, &content, 0o644, 0, 0)?;
        }
    }
    Ok(())
}

fn group_id(group_file: &Path, name: &str) -> Option<u32> {
    let text = fs::read_to_string(group_file).ok()?;
    text.lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 3 && f[0] == name)
        .and_then(|f| f[2].parse().ok())
}

/// `/etc/hostname` and `/etc/hosts` name the machine, as a VM's would.
fn write_identity(root: &Path, hostname: &str) -> io::Result<()> {
    let etc = root.join("etc");
    replace_file(
        &etc.join("hostname"),
        format!("{hostname}\n").as_bytes(),
        0o644,
    )?;
    let hosts = format!(
        "127.0.0.1\tlocalhost\n127.0.1.1\t{hostname}\n\
         ::1\tlocalhost ip6-localhost ip6-loopback\n\
         ff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n"
    );
    replace_file(&etc.join("hosts"), hosts.as_bytes(), 0o644)
}

/// The host's resolver configuration as a plain file: on the host it is
/// often a symlink into `/run`, which the guest does not share.
fn write_resolv_conf(etc: &Path) -> io::Result<()> {
    let content = fs::read("/etc/resolv.conf").unwrap_or_default();
    replace_file(&etc.join("resolv.conf"), &content, 0o644)
}

/// Files of the host's `/etc` never copied: secrets, per-host identity, and
/// backups of the account files.
const HOST_ETC_SKIP: &[&str] = &[
    "passwd-",
    "group-",
    "shadow-",
    "gshadow-",
    "subuid-",
    "subgid-",
    ".pwd.lock",
    "machine-id",
    "hostname",
    "hosts",
    "resolv.conf",
    "adjtime",
    "krb5.keytab",
    "ipsec.secrets",
    "ppp/chap-secrets",
    "ppp/pap-secrets",
    "security/opasswd",
    "docker/key.json",
    "containers/auth.json",
];

/// Directories of the host's `/etc` copied empty: they hold keys and
/// credentials.
const HOST_ETC_EMPTY: &[&str] = &[
    "ssl/private",
    "NetworkManager/system-connections",
    "wireguard",
    "letsencrypt",
    "openvpn",
    "wpa_supplicant",
    "sssd",
    "cups/ssl",
    "pki/tls/private",
    "docker/certs.d",
];

enum Action {
    Copy,
    Skip,
    EmptyDir,
}

fn host_etc_action(rel: &Path) -> Action {
    if HOST_ETC_SKIP.iter().any(|s| rel == Path::new(s)) {
        return Action::Skip;
    }
    if HOST_ETC_EMPTY.iter().any(|s| rel == Path::new(s)) {
        return Action::EmptyDir;
    }
    // SSH host keys identify the host; a guest must make its own.
    if rel.parent() == Some(Path::new("ssh"))
        && rel
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("ssh_host_"))
    {
        return Action::Skip;
    }
    Action::Copy
}

/// Copy the host's `/etc`, leaving its secrets behind and reducing the
/// account files to the system accounts.
fn copy_host_etc(src: &Path, dst: &Path) -> io::Result<()> {
    copy_tree(src, dst, Path::new(""), &host_etc_action)?;

    let read = |name: &str| fs::read_to_string(src.join(name)).unwrap_or_default();
    let ids = RegularIds::from_login_defs(&read("login.defs"));
    let accounts = SystemAccounts::filter(
        ids,
        &read("passwd"),
        &read("group"),
        &read("shadow"),
        &read("gshadow"),
    );
    let kept: Vec<&str> = accounts
        .passwd
        .lines()
        .filter_map(|l| l.split(':').next())
        .collect();
    for (name, content) in [
        ("passwd", accounts.passwd.clone()),
        ("group", accounts.group.clone()),
        ("shadow", accounts.shadow.clone()),
        ("gshadow", accounts.gshadow.clone()),
        ("subuid", filter_sub_ids(&read("subuid"), &kept)),
        ("subgid", filter_sub_ids(&read("subgid"), &kept)),
    ] {
        let path = dst.join(name);
        match fs::symlink_metadata(src.join(name)) {
            // Keep the host file's owner and mode (shadow is root:shadow 640).
            Ok(m) if m.is_file() => {
                replace_file(&path, content.as_bytes(), m.mode() & 0o7777)?;
                lchown(&path, Some(m.uid()), Some(m.gid()))?;
            }
            _ if !content.is_empty() => {
                let mode = if name.ends_with("shadow") {
                    0o640
                } else {
                    0o644
                };
                replace_file(&path, content.as_bytes(), mode)?;
            }
            _ => {}
        }
    }
    Ok(())
}

fn filter_sub_ids(text: &str, users: &[&str]) -> String {
    text.lines()
        .filter(|l| l.split(':').next().is_some_and(|u| users.contains(&u)))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Copy every top-level entry of a rootfs except the system and virtual
/// directories, then its `/usr/local` (the guest's own from then on).
fn copy_rootfs_top(rootfs: &Path, root: &Path) -> io::Result<()> {
    for entry in fs::read_dir(rootfs)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name_str) = name.to_str() else {
            continue;
        };
        if SYSTEM_DIRS.contains(&name_str) || VIRTUAL_DIRS.contains(&name_str) {
            continue;
        }
        let meta = entry.metadata()?;
        copy_entry(
            &entry.path(),
            &root.join(&name),
            &meta,
            Path::new(""),
            &|_| Action::Copy,
        )?;
    }
    let local = rootfs.join("usr/local");
    if fs::symlink_metadata(&local).is_ok_and(|m| m.is_dir()) {
        make_dir(&root.join("usr"), 0o755)?;
        copy_tree(&local, &root.join("usr/local"), Path::new(""), &|_| {
            Action::Copy
        })?;
    }
    Ok(())
}

/// Copy a directory tree without following any symlink: links are copied as
/// links, special files are left out, owners and modes are kept.
fn copy_tree(
    src: &Path,
    dst: &Path,
    rel: &Path,
    action: &dyn Fn(&Path) -> Action,
) -> io::Result<()> {
    let meta = fs::symlink_metadata(src)?;
    copy_entry(src, dst, &meta, rel, action)
}

fn copy_entry(
    src: &Path,
    dst: &Path,
    meta: &Metadata,
    rel: &Path,
    action: &dyn Fn(&Path) -> Action,
) -> io::Result<()> {
    let what = action(rel);
    if matches!(what, Action::Skip) {
        return Ok(());
    }
    let ft = meta.file_type();
    if ft.is_symlink() {
        symlink(fs::read_link(src)?, dst)?;
        lchown(dst, Some(meta.uid()), Some(meta.gid()))?;
    } else if ft.is_dir() {
        fs::create_dir(dst)?;
        if !matches!(what, Action::EmptyDir) {
            for entry in fs::read_dir(src)? {
                let entry = entry?;
                let name = entry.file_name();
                let child_meta = entry.metadata()?;
                copy_entry(
                    &entry.path(),
                    &dst.join(&name),
                    &child_meta,
                    &rel.join(&name),
                    action,
                )?;
            }
        }
        // Owner and mode last: the mode may forbid writing the children.
        lchown(dst, Some(meta.uid()), Some(meta.gid()))?;
        fs::set_permissions(dst, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
    } else if ft.is_file() {
        let mut from = OpenOptions::new()
            .read(true)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(src)?;
        let mut to = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dst)?;
        io::copy(&mut from, &mut to)?;
        // chown before chmod: chown clears set-id bits.
        std::os::unix::fs::fchown(&to, Some(meta.uid()), Some(meta.gid()))?;
        to.set_permissions(fs::Permissions::from_mode(meta.mode() & 0o7777))?;
    }
    // Sockets, FIFOs and device nodes are not copied.
    Ok(())
}

pub fn make_dir(path: &Path, mode: u32) -> io::Result<()> {
    match fs::create_dir(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(e),
    }
    // Explicitly, so the process umask does not change it.
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

/// Create a new file (it must not exist).
pub fn write_file(path: &Path, content: &[u8], mode: u32, uid: u32, gid: u32) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(content)?;
    std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?;
    f.set_permissions(fs::Permissions::from_mode(mode))
}

/// Replace whatever is at `path` (file or symlink) with a new root-owned
/// file. Only used on a root being built, which no guest can see yet.
fn replace_file(path: &Path, content: &[u8], mode: u32) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path)?,
        Ok(_) => fs::remove_file(path)?,
        Err(_) => {}
    }
    write_file(path, content, mode, 0, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_etc_filter() {
        assert!(matches!(
            host_etc_action(Path::new("shadow-")),
            Action::Skip
        ));
        assert!(matches!(
            host_etc_action(Path::new("ssh/ssh_host_ed25519_key")),
            Action::Skip
        ));
        assert!(matches!(
            host_etc_action(Path::new("ssh/ssh_config")),
            Action::Copy
        ));
        assert!(matches!(
            host_etc_action(Path::new("ssl/private")),
            Action::EmptyDir
        ));
        assert!(matches!(
            host_etc_action(Path::new("ssl/certs")),
            Action::Copy
        ));
    }

    #[test]
    fn sub_ids_keep_only_known_users() {
        let out = filter_sub_ids("alice:100000:65536\nroot:200000:65536\n", &["root"]);
        assert_eq!(out, "root:200000:65536\n");
    }
}
