//! A throwaway CA and a `localhost` server certificate it signed, for the
//! test upstreams the gate dials over TLS: shared by tests/gate.rs and
//! tests/gated.rs.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::rustls;

/// Mint a CA named `name`, write its certificate to `dir/upstream-ca.pem`
/// (what a client trusts through `SSL_CERT_FILE` or `--cacert`), and return
/// that path with a server config presenting a `localhost` leaf it signed.
pub fn localhost_server(dir: &Path, name: &str) -> (PathBuf, rustls::ServerConfig) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let ca_file = dir.join("upstream-ca.pem");
    std::fs::write(&ca_file, ca_cert.pem()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![leaf.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
    )
    .unwrap();
    (ca_file, config)
}
