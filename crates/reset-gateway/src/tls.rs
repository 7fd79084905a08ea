//! TLS termination with rustls: ALPN h2 and http/1.1, and a certificate that a config
//! reload can replace without dropping a connection.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use rustls::crypto::ring::default_provider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

/// The certificate in force; swapped whole on reload.
#[derive(Debug)]
pub struct CertStore {
    current: ArcSwap<CertifiedKey>,
}

impl CertStore {
    /// Loads the certificate chain and key.
    pub fn load(tls: &TlsConfig) -> anyhow::Result<Arc<CertStore>> {
        Ok(Arc::new(CertStore {
            current: ArcSwap::from_pointee(certified_key(
                "server.tls",
                &tls.cert_file,
                &tls.key_file,
            )?),
        }))
    }

    /// Replaces the certificate; new handshakes use it, open connections keep theirs.
    pub fn reload(&self, tls: &TlsConfig) -> anyhow::Result<()> {
        self.current.store(Arc::new(certified_key(
            "server.tls",
            &tls.cert_file,
            &tls.key_file,
        )?));
        Ok(())
    }

    /// An acceptor that offers HTTP/2 and HTTP/1.1.
    pub fn acceptor(self: &Arc<Self>) -> anyhow::Result<TlsAcceptor> {
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(default_provider()))
            .with_safe_default_protocol_versions()
            .context("TLS setup")?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// Every certificate in the PEM file at `path` (at least one); errors name the config `key`.
pub fn read_certificates(key: &str, path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path)
        .with_context(|| format!("{key}: cannot read certificates from {}", path.display()))?;
    certificates_in(key, path, &pem)
}

/// Every certificate in `pem`, the contents of the file at `path` (at least one); errors
/// name the config `key`. For a caller that keeps the bytes it checked.
pub fn certificates_in(
    key: &str,
    path: &Path,
    pem: &[u8],
) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{key}: cannot read certificates from {}", path.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "{key}: no certificate in {}",
        path.display()
    );
    // Read as X.509 now, as a connection would read it (a PEM block whose contents were cut
    // or changed is framed well): check-config and a reload then refuse a file that would
    // stop the next start, rather than every restarted replica failing on it.
    for (at, cert) in certs.iter().enumerate() {
        rustls::RootCertStore::empty()
            .add(cert.clone())
            .map_err(|e| {
                // rustls words it as a peer's ("invalid peer certificate: ..."): only the
                // cause is said.
                let why = match e {
                    rustls::Error::InvalidCertificate(cause) => format!("{cause:?}"),
                    other => other.to_string(),
                };
                anyhow::anyhow!(
                    "{key}: certificate {} in {} is not a certificate that can be read ({why})",
                    at + 1,
                    path.display()
                )
            })?;
    }
    Ok(certs)
}

/// The certificate chain in `cert_file` with the private key in `key_file`, checked to
/// match; errors name the config keys `{section}.cert_file` and `{section}.key_file`.
pub fn certified_key(
    section: &str,
    cert_file: &Path,
    key_file: &Path,
) -> anyhow::Result<CertifiedKey> {
    let cert_pem = std::fs::read(cert_file).with_context(|| {
        format!(
            "{section}.cert_file: cannot read certificates from {}",
            cert_file.display()
        )
    })?;
    // The path is not echoed: a private key pasted in its place would be.
    let key_pem = std::fs::read(key_file)
        .with_context(|| format!("{section}.key_file: cannot read the file it names"))?;
    certified_key_in(section, (cert_file, &cert_pem), (key_file, &key_pem))
}

/// [`certified_key`] of files already read: each is its path (for errors) and contents.
pub fn certified_key_in(
    section: &str,
    (cert_file, cert_pem): (&Path, &[u8]),
    (key_file, pem): (&Path, &[u8]),
) -> anyhow::Result<CertifiedKey> {
    let chain = certificates_in(&format!("{section}.cert_file"), cert_file, cert_pem)?;
    // The key's own parse error is not shown: it could quote key material.
    let key = PrivateKeyDer::from_pem_slice(pem).map_err(|_| {
        anyhow::anyhow!(
            "{section}.key_file: no PEM private key in {} (an encrypted key is not read)",
            key_file.display()
        )
    })?;
    let signing = default_provider()
        .key_provider
        .load_private_key(key)
        .map_err(|_| {
            anyhow::anyhow!(
                "{section}.key_file: unsupported private key in {}",
                key_file.display()
            )
        })?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| match e {
        // The certificate itself is not read as an end entity's: one of X.509 version 1,
        // which `openssl x509 -req` makes when given no extensions, or one the TLS library
        // does not take (a critical extension it does not know).
        rustls::Error::InvalidCertificate(cause) => {
            let why = format!("{cause:?}");
            let advice = if why.contains("UnsupportedCertVersion") {
                "; a certificate of X.509 version 1 is not read: make one of version 3 \
                 (openssl x509 -req ... -extfile with basicConstraints=CA:FALSE)"
            } else {
                " (the first certificate of the file is the one the key is checked against)"
            };
            anyhow::anyhow!(
                "{section}.cert_file: the certificate in {} cannot be read to check it \
                 against the key ({why}){advice}",
                cert_file.display()
            )
        }
        _ => anyhow::anyhow!(
            "{section}: the key in {} does not match the certificate",
            key_file.display()
        ),
    })?;
    Ok(certified)
}
