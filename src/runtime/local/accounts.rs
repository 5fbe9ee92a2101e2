//! `/etc/passwd`, `/etc/group` and their shadows: filtering the host's for a
//! new machine, and looking users up in a machine's.

use std::collections::BTreeSet;

/// The ids a process runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserIds {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub home: String,
    pub shell: String,
}

impl UserIds {
    pub fn root() -> Self {
        Self {
            name: "root".to_owned(),
            uid: 0,
            gid: 0,
            groups: vec![0],
            home: "/root".to_owned(),
            shell: "/bin/sh".to_owned(),
        }
    }
}

/// Find `user` (a name, or a numeric uid) in the text of a passwd file, and
/// its supplementary groups in the text of a group file, as `initgroups`
/// would.
pub fn lookup_user(passwd: &str, group: &str, user: &str) -> Option<UserIds> {
    let entry = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 7)
        .find(|f| f[0] == user)
        .or_else(|| {
            let uid: u32 = user.parse().ok()?;
            passwd
                .lines()
                .map(|l| l.split(':').collect::<Vec<_>>())
                .filter(|f| f.len() >= 7)
                .find(|f| f[2].parse() == Ok(uid))
        })?;
    let uid = entry[2].parse().ok()?;
    let gid = entry[3].parse().ok()?;
    let name = entry[0];
    let mut groups = vec![gid];
    for line in group.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 4 {
            continue;
        }
        let Ok(g) = f[2].parse::<u32>() else { continue };
        if f[3].split(',').any(|m| m == name) && !groups.contains(&g) {
            groups.push(g);
        }
    }
    Some(UserIds {
        name: name.to_owned(),
        uid,
        gid,
        groups,
        home: entry[5].to_owned(),
        shell: entry[6].to_owned(),
    })
}

/// The range of ids `useradd` hands out to regular users, from
/// `login.defs` (`UID_MIN`/`UID_MAX`, `GID_MIN`/`GID_MAX`), with Debian's
/// defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegularIds {
    pub uid_min: u32,
    pub uid_max: u32,
    pub gid_min: u32,
    pub gid_max: u32,
}

impl RegularIds {
    pub fn from_login_defs(text: &str) -> Self {
        let mut ids = Self {
            uid_min: 1000,
            uid_max: 60000,
            gid_min: 1000,
            gid_max: 60000,
        };
        for line in text.lines() {
            let mut words = line.split_whitespace();
            let (Some(key), Some(value)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(value) = value.parse() else { continue };
            match key {
                "UID_MIN" => ids.uid_min = value,
                "UID_MAX" => ids.uid_max = value,
                "GID_MIN" => ids.gid_min = value,
                "GID_MAX" => ids.gid_max = value,
                _ => {}
            }
        }
        ids
    }
}

/// The host's account files reduced to what a fresh Debian guest has: the
/// system accounts, without the host's regular users (so the guest's first
/// `useradd` gets the first regular uid, as on a fresh guest) and without
/// any password hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemAccounts {
    pub passwd: String,
    pub group: String,
    pub shadow: String,
    pub gshadow: String,
}

impl SystemAccounts {
    pub fn filter(ids: RegularIds, passwd: &str, group: &str, shadow: &str, gshadow: &str) -> Self {
        let is_regular_uid = |uid: u32| (ids.uid_min..=ids.uid_max).contains(&uid);
        let is_regular_gid = |gid: u32| (ids.gid_min..=ids.gid_max).contains(&gid);

        let mut users = BTreeSet::new();
        let mut out_passwd = String::new();
        for line in passwd.lines() {
            let f: Vec<&str> = line.split(':').collect();
            let Some(uid) = f.get(2).and_then(|u| u.parse::<u32>().ok()) else {
                continue;
            };
            if f.len() < 7 || is_regular_uid(uid) {
                continue;
            }
            users.insert(f[0].to_owned());
            out_passwd.push_str(line);
            out_passwd.push('\n');
        }

        let keep_members = |members: &str| {
            members
                .split(',')
                .filter(|m| !m.is_empty() && users.contains(*m))
                .collect::<Vec<_>>()
                .join(",")
        };

        let mut groups = BTreeSet::new();
        let mut out_group = String::new();
        for line in group.lines() {
            let f: Vec<&str> = line.split(':').collect();
            let Some(gid) = f.get(2).and_then(|g| g.parse::<u32>().ok()) else {
                continue;
            };
            if f.len() < 4 || is_regular_gid(gid) {
                continue;
            }
            groups.insert(f[0].to_owned());
            out_group.push_str(&format!(
                "{}:{}:{}:{}\n",
                f[0],
                f[1],
                f[2],
                keep_members(f[3])
            ));
        }

        // Shadow entries keep their ageing fields; every hash becomes `*`
        // (no password), as in Debian's container images.
        let mut out_shadow = String::new();
        for line in shadow.lines() {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 2 || !users.contains(f[0]) {
                continue;
            }
            let rest = if f.len() > 2 {
                f[2..].join(":")
            } else {
                String::new()
            };
            out_shadow.push_str(&format!("{}:*:{rest}\n", f[0]));
        }
        // Accounts missing from the host's shadow still get a locked entry,
        // so `pwck` and `useradd` see consistent files.
        for user in &users {
            if !out_shadow
                .lines()
                .any(|l| l.split(':').next() == Some(user))
            {
                out_shadow.push_str(&format!("{user}:*:0:0:99999:7:::\n"));
            }
        }

        let mut out_gshadow = String::new();
        for line in gshadow.lines() {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 4 || !groups.contains(f[0]) {
                continue;
            }
            out_gshadow.push_str(&format!(
                "{}:*:{}:{}\n",
                f[0],
                keep_members(f[2]),
                keep_members(f[3])
            ));
        }
        for g in &groups {
            if !out_gshadow.lines().any(|l| l.split(':').next() == Some(g)) {
                out_gshadow.push_str(&format!("{g}:*::\n"));
            }
        }

        Self {
            passwd: out_passwd,
            group: out_group,
            shadow: out_shadow,
            gshadow: out_gshadow,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
        daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
        alice:x:1000:1000:Alice:/home/alice:/bin/bash\n\
        nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n";
    const GROUP: &str = "root:x:0:\nsudo:x:27:alice,daemon\nalice:x:1000:\nnogroup:x:65534:\n";
    const SHADOW: &str = "root:$6$salt$hash:19000:0:99999:7:::\n\
        daemon:*:19000:0:99999:7:::\n\
        alice:$6$other$hash:19000:0:99999:7:::\n";
    const GSHADOW: &str = "root:*::\nsudo:*::alice,daemon\nalice:!::\n";

    #[test]
    fn drops_regular_users_and_every_hash() {
        let ids = RegularIds::from_login_defs("UID_MIN 1000\nUID_MAX 60000\n");
        let acc = SystemAccounts::filter(ids, PASSWD, GROUP, SHADOW, GSHADOW);
        assert!(!acc.passwd.contains("alice"));
        assert!(acc.passwd.contains("nobody:x:65534"));
        assert!(!acc.group.contains("alice"), "{}", acc.group);
        assert!(acc.group.contains("sudo:x:27:daemon\n"));
        assert!(!acc.shadow.contains('$'), "{}", acc.shadow);
        assert!(acc.shadow.starts_with("root:*:19000:"));
        assert!(acc.shadow.contains("nobody:*:"));
        assert!(acc.gshadow.contains("sudo:*::daemon\n"));
        assert!(acc.gshadow.contains("nogroup:*::\n"));
        assert!(!acc.gshadow.contains("alice"));
    }

    #[test]
    fn looks_users_up_with_their_groups() {
        let u = lookup_user(PASSWD, GROUP, "alice").unwrap();
        assert_eq!((u.uid, u.gid), (1000, 1000));
        assert_eq!(u.groups, vec![1000, 27]);
        assert_eq!(u.home, "/home/alice");
        assert_eq!(lookup_user(PASSWD, GROUP, "1").unwrap().name, "daemon");
        assert!(lookup_user(PASSWD, GROUP, "bob").is_none());
    }

    #[test]
    fn reads_login_defs() {
        let ids = RegularIds::from_login_defs("# c\nUID_MIN\t 500\nGID_MIN 600\nX\n");
        assert_eq!((ids.uid_min, ids.gid_min, ids.uid_max), (500, 600, 60000));
    }
}
