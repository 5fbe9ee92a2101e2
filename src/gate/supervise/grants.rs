//! Grants in force, as the egress proxy asks about them, and as the
//! reconciler reports them.
//!
//! [`Grants`] answers [`ExtraEgress::allows`] from a copy of the grants
//! file it re-reads whenever the file changed (one `stat` per check: every
//! write is a rename, so a new inode), so an approval made by `bottle
//! supervise approve` in another process counts from the next connection
//! on, and expiry is checked against the clock on every call.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::sync::Mutex;

use crate::gate::config::GateConfig;
use crate::gate::hosts::{HostList, HostPattern};
use crate::gate::paths::GatePaths;
use crate::gate::{AgentIdentity, ExtraEgress};

use super::store::{Record, Store, StoreError, now};

/// The grants file, cached for the egress check.
pub struct Grants {
    store: Store,
    cache: Mutex<Cache>,
}

#[derive(Default)]
struct Cache {
    /// (device, inode, mtime ns, length) of the file last read; `None`
    /// when it did not exist.
    stamp: Option<(u64, u64, i128, u64)>,
    read: bool,
    /// Approved egress grants: who, what, until when.
    grants: Vec<(AgentIdentity, HostPattern, u64)>,
}

impl Grants {
    pub fn new(paths: &GatePaths) -> Self {
        Self {
            store: Store::new(paths),
            cache: Mutex::new(Cache::default()),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The grant (its host pattern and expiry) that lets `who` reach
    /// `host:port` now, if any.
    pub fn grant_for(&self, who: &AgentIdentity, host: &str, port: u16) -> Option<(String, u64)> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        self.refresh(&mut cache);
        let now = now();
        cache
            .grants
            .iter()
            .find(|(w, p, until)| w == who && *until > now && p.matches(host, port))
            .map(|(_, p, until)| (p.to_string(), *until))
    }

    fn refresh(&self, cache: &mut Cache) {
        let stamp = stamp(self.store.path());
        if cache.read && stamp == cache.stamp && !recent(stamp) {
            return;
        }
        // Fail closed: a file that cannot be read grants nothing.
        let grants = match self.store.load() {
            Ok(file) => file
                .records
                .iter()
                .filter_map(|r| {
                    let until = r.until()?;
                    let pattern = HostPattern::parse(r.host.as_deref()?).ok()?;
                    (r.kind == super::store::Kind::Egress).then(|| (r.who(), pattern, until))
                })
                .collect(),
            Err(e) => {
                eprintln!("bottle gate: {e}; no supervise grant is in force until it is fixed");
                Vec::new()
            }
        };
        *cache = Cache {
            stamp,
            read: true,
            grants,
        };
    }
}

impl ExtraEgress for Grants {
    fn allows(&self, who: &AgentIdentity, host: &str, port: u16) -> bool {
        self.grant_for(who, host, port).is_some()
    }
}

/// New requests and messages as they arrive (`watch` prints them): each
/// [`Follow::poll`] costs one `stat`, and a read when the file changed.
pub struct Follow {
    store: Store,
    stamp: Option<(u64, u64, i128, u64)>,
    seen: std::collections::BTreeSet<String>,
}

impl Follow {
    /// Start after what is already there.
    pub fn new(paths: &GatePaths) -> Self {
        let store = Store::new(paths);
        let stamp = stamp(store.path());
        let seen = store
            .load()
            .map(|f| f.records.into_iter().map(|r| r.id).collect())
            .unwrap_or_default();
        Self { store, stamp, seen }
    }

    /// Records that appeared since the last call, oldest first.
    pub fn poll(&mut self) -> Result<Vec<Record>, StoreError> {
        let stamp = stamp(self.store.path());
        if stamp == self.stamp && !recent(stamp) {
            return Ok(Vec::new());
        }
        let file = self.store.load()?;
        self.stamp = stamp;
        let fresh: Vec<Record> = file
            .records
            .into_iter()
            .filter(|r| !self.seen.contains(&r.id))
            .collect();
        self.seen.extend(fresh.iter().map(|r| r.id.clone()));
        Ok(fresh)
    }
}

/// Whether a file with this stamp changed less than two seconds ago: two
/// writes that close together may share an mtime tick, a reused inode
/// number and a length, so such a file is read again whatever its stamp
/// (as git does with "racily clean" entries).
fn recent(stamp: Option<(u64, u64, i128, u64)>) -> bool {
    let Some((_, _, mtime_ns, _)) = stamp else {
        return false;
    };
    let now_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or_default();
    now_ns - mtime_ns < 2_000_000_000
}

/// What tells one version of the file from another without reading it:
/// device, inode (every write is a rename), mtime in ns, length.
fn stamp(path: &std::path::Path) -> Option<(u64, u64, i128, u64)> {
    std::fs::metadata(path).ok().map(|m| {
        (
            m.dev(),
            m.ino(),
            i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            m.len(),
        )
    })
}

/// Whether the declared pattern `declared` lets through everything
/// `granted` does.
pub fn covers(declared: &HostPattern, granted: &HostPattern) -> bool {
    let ports_ok = match (declared.port(), granted.port()) {
        (None, None) => true,
        (None, Some(p)) => p == 443 || p == 80,
        (Some(d), Some(g)) => d == g,
        (Some(_), None) => false,
    };
    let names_ok = match (declared.is_wildcard(), granted.is_wildcard()) {
        (false, false) => declared.name() == granted.name(),
        (false, true) => false,
        // `*.d` covers `x.d`, `*.x.d`, not `d` nor `*.d`'s parent.
        (true, g_wild) => {
            let (d, g) = (declared.name(), granted.name());
            (g_wild && g == d)
                || (g.len() > d.len() + 1
                    && g.ends_with(d)
                    && g.as_bytes()[g.len() - d.len() - 1] == b'.')
        }
    };
    ports_ok && names_ok
}

/// Whether a granted `host` is allowed by `allow_hosts` as declared.
pub fn is_declared(host: &str, allow_hosts: &[String]) -> bool {
    let Ok(granted) = HostPattern::parse(host) else {
        return false;
    };
    HostList::parse(allow_hosts)
        .0
        .iter()
        .any(|d| covers(d, &granted))
}

/// What the manifests declare, for grants: each bottle's `allow_hosts`.
pub type Declared = BTreeMap<String, Vec<String>>;

/// [`Declared`] from the config the reconciler derives for the gate.
pub fn declared_from_config(config: &GateConfig) -> Declared {
    config
        .bottles
        .iter()
        .map(|(name, b)| (name.clone(), b.allow_hosts.clone()))
        .collect()
}

/// [`Declared`] from the manifests: each bottle's `egress.allow_hosts`.
pub fn declared_from_project(project: &crate::manifest::Project) -> Declared {
    project
        .bottles
        .iter()
        .map(|(name, b)| {
            let hosts = b
                .spec
                .egress
                .as_ref()
                .map(|e| e.allow_hosts.clone())
                .unwrap_or_default();
            (name.clone(), hosts)
        })
        .collect()
}

fn declared_for(record: &Record, declared: &Declared) -> bool {
    match (&record.host, declared.get(&record.bottle)) {
        (Some(host), Some(allow)) => is_declared(host, allow),
        _ => false,
    }
}

/// A run-time grant the manifests do not declare: the world is wider
/// than declared (`check` exits 3 naming it).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UndeclaredGrant {
    pub id: String,
    pub bottle: String,
    pub agent: String,
    pub host: String,
    /// Why the agent asked: its own words (escape before a terminal).
    pub reason: String,
    /// Unix seconds when it expires.
    pub until: u64,
}

impl std::fmt::Display for UndeclaredGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "supervise grant {} lets agent `{}` reach `{}` (not in bottle `{}`'s allow_hosts; {} left)",
            self.id,
            self.agent,
            self.host,
            self.bottle,
            human_secs(self.until.saturating_sub(now()))
        )
    }
}

/// Every grant in force at `now` that `declared` does not cover, by agent
/// then id. For `plan`, `status` and `check`: reads the file, writes
/// nothing, takes no lock.
pub fn undeclared_grants(
    paths: &GatePaths,
    declared: &Declared,
    now: u64,
) -> Result<Vec<UndeclaredGrant>, StoreError> {
    let file = Store::new(paths).load()?;
    let mut out: Vec<UndeclaredGrant> = file
        .records
        .iter()
        .filter(|r| r.in_force(now) && !declared_for(r, declared))
        .map(|r| UndeclaredGrant {
            id: r.id.clone(),
            bottle: r.bottle.clone(),
            agent: r.agent.clone(),
            host: r.host.clone().unwrap_or_default(),
            reason: r.reason.clone(),
            until: r.until().unwrap_or_default(),
        })
        .collect();
    out.sort_by(|a, b| {
        crate::manifest::names::natural_cmp(&a.agent, &b.agent).then_with(|| a.id.cmp(&b.id))
    });
    Ok(out)
}

/// Retire, as `declared`, every grant in force and every pending request
/// whose host the manifests now allow (the gate does it on each reload;
/// `apply` may too). Returns the records retired.
pub fn retire_declared(
    paths: &GatePaths,
    declared: &Declared,
    now: u64,
) -> Result<Vec<Record>, StoreError> {
    Store::new(paths).retire_declared(|r| declared_for(r, declared), now)
}

/// `90s`, `5m`, `2h`, `3d`: the largest whole unit.
pub fn human_secs(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 2 * 3600 => format!("{}m", s / 60),
        s if s < 2 * 86_400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> HostPattern {
        HostPattern::parse(s).unwrap()
    }

    #[test]
    fn coverage_follows_the_grammar() {
        assert!(covers(&p("a.example"), &p("a.example")));
        assert!(covers(&p("a.example"), &p("a.example:443")));
        assert!(!covers(&p("a.example:443"), &p("a.example")));
        assert!(!covers(&p("a.example"), &p("a.example:8443")));
        assert!(covers(&p("*.example.com"), &p("a.example.com")));
        assert!(covers(&p("*.example.com"), &p("*.a.example.com")));
        assert!(covers(&p("*.example.com"), &p("*.example.com")));
        assert!(!covers(&p("*.example.com"), &p("example.com")));
        assert!(!covers(&p("*.example.com"), &p("badexample.com")));
        assert!(!covers(&p("a.example.com"), &p("*.example.com")));
        assert!(is_declared(
            "A.example.",
            &["x.y".into(), "a.example".into()]
        ));
        assert!(!is_declared("b.example", &["a.example".into()]));
    }

    fn who(agent: &str) -> AgentIdentity {
        AgentIdentity {
            bottle: "dev".into(),
            agent: agent.into(),
        }
    }

    #[test]
    fn a_grant_lets_only_its_agent_through_and_only_while_in_force() {
        let dir = tempfile::tempdir().unwrap();
        let paths = GatePaths::new(dir.path(), "proj");
        let grants = Grants::new(&paths);
        let coder = who("coder");
        assert!(!grants.allows(&coder, "a.example", 443));
        let r = grants
            .store()
            .request_egress(&coder, "a.example", "", now())
            .unwrap();
        assert!(
            !grants.allows(&coder, "a.example", 443),
            "pending is not granted"
        );
        // Another process approves: the cache sees the new file.
        Store::new(&paths).approve(&r.id, 3600, now()).unwrap();
        assert!(grants.allows(&coder, "a.example", 443));
        assert!(grants.allows(&coder, "a.example", 80));
        assert!(!grants.allows(&coder, "a.example", 22));
        assert!(!grants.allows(&coder, "b.example", 443));
        assert!(!grants.allows(&who("other"), "a.example", 443));
        let other_bottle = AgentIdentity {
            bottle: "ops".into(),
            agent: "coder".into(),
        };
        assert!(!grants.allows(&other_bottle, "a.example", 443));
        Store::new(&paths).revoke(&r.id, now()).unwrap();
        assert!(!grants.allows(&coder, "a.example", 443));
    }

    #[test]
    fn an_expired_grant_closes_without_any_write() {
        let dir = tempfile::tempdir().unwrap();
        let paths = GatePaths::new(dir.path(), "proj");
        let grants = Grants::new(&paths);
        let coder = who("coder");
        let store = Store::new(&paths);
        // Approved in the past, for one second: expired already.
        let r = store.request_egress(&coder, "a.example", "", 10).unwrap();
        store.approve(&r.id, 1, 10).unwrap();
        assert!(!grants.allows(&coder, "a.example", 443));
        assert!(
            undeclared_grants(&paths, &Declared::new(), now())
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn follow_yields_each_new_record_once() {
        let dir = tempfile::tempdir().unwrap();
        let paths = GatePaths::new(dir.path(), "proj");
        let store = Store::new(&paths);
        let old = store
            .request_egress(&who("coder"), "a.example", "", 1)
            .unwrap();
        let mut follow = Follow::new(&paths);
        assert!(follow.poll().unwrap().is_empty());
        let new = store
            .request_egress(&who("coder"), "b.example", "", 2)
            .unwrap();
        assert_eq!(follow.poll().unwrap(), vec![new.clone()]);
        assert!(follow.poll().unwrap().is_empty());
        // A decision changes the file but adds nothing new.
        store.approve(&old.id, 60, 3).unwrap();
        assert!(follow.poll().unwrap().is_empty());
        let msg = store.message(&who("other"), "hello", 4).unwrap();
        assert_eq!(follow.poll().unwrap(), vec![msg]);
    }

    #[test]
    fn declaring_the_host_retires_the_grant() {
        let dir = tempfile::tempdir().unwrap();
        let paths = GatePaths::new(dir.path(), "proj");
        let store = Store::new(&paths);
        let coder = who("coder");
        let t = now();
        let a = store.request_egress(&coder, "a.example", "", t).unwrap();
        let b = store.request_egress(&coder, "b.example", "", t).unwrap();
        store.approve(&a.id, 3600, t).unwrap();
        store.approve(&b.id, 3600, t).unwrap();
        let mut declared = Declared::new();
        declared.insert("dev".into(), vec!["a.example".into()]);
        let undeclared = undeclared_grants(&paths, &declared, t).unwrap();
        assert_eq!(undeclared.len(), 1);
        assert_eq!(undeclared[0].id, b.id);
        assert_eq!(undeclared[0].host, "b.example");
        let retired = retire_declared(&paths, &declared, t).unwrap();
        assert_eq!(retired.len(), 1);
        assert_eq!(retired[0].id, a.id);
        // Removing the host again does not bring the grant back.
        let undeclared = undeclared_grants(&paths, &Declared::new(), t).unwrap();
        assert_eq!(undeclared.len(), 1);
        assert_eq!(undeclared[0].id, b.id);
        assert!(retire_declared(&paths, &declared, t).unwrap().is_empty());
    }
}
