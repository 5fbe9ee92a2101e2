//! The project CA: minted once per project with rcgen, kept in the gate's
//! state directory (`ca.key` mode 0600, `ca.pem`), never copied anywhere.
//! The gate signs a leaf with it for each host whose TLS it intercepts; the
//! `ca` step installs `ca.pem` in the guests ([`ensure`]).
//!
//! Creation is race-free between processes (the `ca` step of an apply and
//! a gate starting): whoever creates or reads the pair holds an exclusive
//! `flock` on `ca.key`, and the certificate is in place before the key is
//! written, so a non-empty key always has its certificate beside it.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use tokio_rustls::rustls;

use super::paths::GatePaths;

#[derive(Debug, thiserror::Error, miette::Diagnostic)]
pub enum CaError {
    #[error("the project CA {}: {source}", path.display())]
    #[diagnostic(
        code("bottle::gate-ca-io"),
        help("check that the state directory (--state-dir) is writable by you")
    )]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the project CA in {} cannot be read: {message}", dir.display())]
    #[diagnostic(
        code("bottle::gate-ca-invalid"),
        help(
            "remove ca.pem and ca.key from that directory to mint a new CA, then run `bottle apply` so every guest trusts it"
        )
    )]
    Invalid { dir: PathBuf, message: String },
    #[error("cannot mint a certificate: {0}")]
    #[diagnostic(code("bottle::gate-ca-mint"), help("this is a bug; please report it"))]
    Mint(String),
}

/// Leaves kept in memory at most.
const MAX_LEAVES: usize = 1024;

/// The project CA with its key, and the leaves it signed (by host).
pub struct ProjectCa {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
    leaves: Mutex<HashMap<String, Arc<rustls::ServerConfig>>>,
}

impl std::fmt::Debug for ProjectCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProjectCa").finish_non_exhaustive()
    }
}

/// The CA certificate (PEM) of the project whose gate lives in `paths`,
/// minted now if there is none yet. What the `ca` step installs.
pub fn ensure(paths: &GatePaths) -> Result<String, CaError> {
    Ok(ProjectCa::load_or_create(paths)?.cert_pem)
}

impl ProjectCa {
    /// Load the project's CA, or mint one (key mode 0600).
    pub fn load_or_create(paths: &GatePaths) -> Result<Self, CaError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| CaError::Io { path, source }
        };
        create_private_dir(&paths.dir).map_err(io(&paths.dir))?;
        let key_path = paths.ca_key();
        let cert_path = paths.ca_cert();
        let mut key_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&key_path)
            .map_err(io(&key_path))?;
        key_file.lock().map_err(io(&key_path))?;
        // A key left readable by others (copied in by hand) is tightened.
        let mode = key_file.metadata().map_err(io(&key_path))?.permissions();
        if mode.mode() & 0o077 != 0 {
            key_file
                .set_permissions(fs::Permissions::from_mode(0o600))
                .map_err(io(&key_path))?;
        }
        let mut key_pem = String::new();
        key_file
            .read_to_string(&mut key_pem)
            .map_err(io(&key_path))?;
        let invalid = |message: String| CaError::Invalid {
            dir: paths.dir.clone(),
            message,
        };
        let (cert_pem, issuer) = if key_pem.trim().is_empty() {
            let (cert_pem, key) = mint()?;
            write_atomic(&cert_path, cert_pem.as_bytes(), 0o644).map_err(io(&cert_path))?;
            let key_pem = key.serialize_pem();
            key_file
                .write_all(key_pem.as_bytes())
                .and_then(|_| key_file.sync_all())
                .map_err(io(&key_path))?;
            let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
                .map_err(|e| CaError::Mint(e.to_string()))?;
            (cert_pem, issuer)
        } else {
            let key = KeyPair::from_pem(&key_pem)
                .map_err(|e| invalid(format!("ca.key is not a private key ({e})")))?;
            let cert_pem = fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
            let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
                .map_err(|e| invalid(format!("ca.pem is not a certificate ({e})")))?;
            if !cert_matches_key(&cert_pem, issuer.key()) {
                return Err(invalid("ca.pem was not issued for ca.key".into()));
            }
            (cert_pem, issuer)
        };
        let _ = key_file.unlock();
        Ok(Self {
            cert_pem,
            issuer,
            leaves: Mutex::new(HashMap::new()),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A TLS server configuration presenting a leaf for `host` signed by
    /// this CA (made once per host, then cached).
    pub fn server_config(&self, host: &str) -> Result<Arc<rustls::ServerConfig>, CaError> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if let Some(config) = self
            .leaves
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&host)
        {
            return Ok(config.clone());
        }
        let mint_err = |e: &dyn std::fmt::Display| CaError::Mint(e.to_string());
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| mint_err(&e))?;
        let san = match host.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(host.clone().try_into().map_err(|e| mint_err(&e))?),
        };
        params.subject_alt_names = vec![san];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, host.as_str());
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let year = this_year();
        params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
        params.not_after = rcgen::date_time_ymd(year + 2, 1, 1);
        let key = KeyPair::generate().map_err(|e| mint_err(&e))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| mint_err(&e))?;
        let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let mut config = rustls::ServerConfig::builder_with_provider(crypto())
            .with_safe_default_protocol_versions()
            .map_err(|e| mint_err(&e))?
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key_der)
            .map_err(|e| mint_err(&e))?;
        // The gate speaks HTTP/1.1 inside what it intercepts.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let config = Arc::new(config);
        let mut leaves = self.leaves.lock().unwrap_or_else(|e| e.into_inner());
        // A wildcard secret host lets an agent name endless hosts: the
        // cache is bounded, and minting again costs a millisecond.
        if leaves.len() >= MAX_LEAVES {
            leaves.clear();
        }
        leaves.insert(host, config.clone());
        Ok(config)
    }
}

/// The crypto provider every TLS configuration of the gate uses.
pub fn crypto() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn mint() -> Result<(String, KeyPair), CaError> {
    let err = |e: rcgen::Error| CaError::Mint(e.to_string());
    let key = KeyPair::generate().map_err(err)?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "bottle gate CA");
    dn.push(DnType::OrganizationName, "bottle");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let year = this_year();
    params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + 10, 1, 1);
    let cert = params.self_signed(&key).map_err(err)?;
    Ok((cert.pem(), key))
}

/// Whether the certificate's public key is the key's (rustls compares
/// their SubjectPublicKeyInfo).
fn cert_matches_key(cert_pem: &str, key: &KeyPair) -> bool {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let Ok(cert) = CertificateDer::from_pem_slice(cert_pem.as_bytes()) else {
        return false;
    };
    let key = PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let provider = crypto();
    let Ok(certified) = rustls::sign::CertifiedKey::from_der(vec![cert], key, &provider) else {
        return false;
    };
    certified.keys_match().is_ok()
}

/// The current year (UTC), near enough for validity windows that start a
/// year before it.
fn this_year() -> i32 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    1970 + (secs / 31_556_952) as i32
}

/// `dir` and its parents, the last one mode 0700.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    fs::create_dir_all(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
}

/// Write `bytes` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let result = (|| {
        let mut file: File = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_is_minted_once_with_a_private_key() {
        let dir = tempfile::tempdir().unwrap();
        let paths = GatePaths::new(dir.path(), "p");
        let pem = ensure(&paths).unwrap();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert_eq!(ensure(&paths).unwrap(), pem, "loaded, not minted again");
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&paths.ca_key()), 0o600);
        assert_eq!(mode(&paths.dir), 0o700);
        assert_eq!(fs::read_to_string(paths.ca_cert()).unwrap(), pem);
        let key = fs::read_to_string(paths.ca_key()).unwrap();
        assert!(key.contains("PRIVATE KEY"));
        assert!(!pem.contains("PRIVATE KEY"));
    }

    #[test]
    fn a_certificate_of_another_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = GatePaths::new(dir.path(), "a");
        let b = GatePaths::new(dir.path(), "b");
        ensure(&a).unwrap();
        ensure(&b).unwrap();
        fs::copy(b.ca_cert(), a.ca_cert()).unwrap();
        let err = ProjectCa::load_or_create(&a).unwrap_err();
        assert!(
            err.to_string().contains("was not issued for ca.key"),
            "{err}"
        );
    }

    #[test]
    fn leaves_are_cached_per_host() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ProjectCa::load_or_create(&GatePaths::new(dir.path(), "p")).unwrap();
        let one = ca.server_config("API.example.com.").unwrap();
        let two = ca.server_config("api.example.com").unwrap();
        assert!(Arc::ptr_eq(&one, &two));
        assert!(!Arc::ptr_eq(&one, &ca.server_config("127.0.0.1").unwrap()));
    }
}
