//! TLS toward the broker (rustls with ring, never rumqttc's panicking default config) and
//! what a failed connection means, in words an operator can act on.

use std::path::Path;
use std::sync::Arc;

use rumqttc::{ConnectReturnCode, ConnectionError, TlsConfiguration};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{CertificateError, ClientConfig, RootCertStore};

use crate::config::Tls;

/// The CA certificates of a PEM file, as DER.
pub fn read_cas(path: &Path) -> Result<Vec<Vec<u8>>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("ca_file {}: {e}", path.display()))?;
    let cas: Vec<Vec<u8>> = CertificateDer::pem_slice_iter(&bytes)
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("ca_file {}: {e}", path.display()))?;
    if cas.is_empty() {
        return Err(format!(
            "ca_file {}: no PEM certificate in it",
            path.display()
        ));
    }
    Ok(cas)
}

/// The rustls client configuration: ring provider, TLS 1.2/1.3, the given roots.
pub fn client_config(tls: &Tls) -> Result<TlsConfiguration, String> {
    let mut roots = RootCertStore::empty();
    match tls {
        Tls::PublicRoots => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        Tls::Cas(path, cas) => {
            for der in cas {
                roots
                    .add(CertificateDer::from(der.clone()))
                    .map_err(|e| format!("ca_file {}: {e}", path.display()))?;
            }
        }
    }
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
    Ok(TlsConfiguration::Rustls(Arc::new(config)))
}

/// Why the link is down, by what the operator has to do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The broker refused the username or password (or the client id).
    Login,
    /// The broker's certificate chains to no CA we trust.
    UnknownCa,
    /// The broker's certificate does not name the host we asked for.
    WrongHost,
    /// Any other TLS failure (expired certificate, protocol mismatch, …).
    Tls,
    /// Cannot reach the broker, or the connection dropped: usually passes by itself.
    Network,
}

/// One failed connection, classified, with the sentence shown in `outbox status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub kind: FailureKind,
    pub message: String,
}

/// Classifies a rumqttc error from connecting to (or talking with) `host:port`.
pub fn classify(e: &ConnectionError, host: &str, port: u16) -> Failure {
    let at = format!("{host}:{port}");
    if let ConnectionError::ConnectionRefused(code) = e {
        let (kind, why) = match code {
            ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized => (
                FailureKind::Login,
                format!(
                    "the broker at {at} refused the login ({code:?}): check username and password_file"
                ),
            ),
            ConnectReturnCode::BadClientId => (
                FailureKind::Login,
                format!("the broker at {at} refused the client id: check client_id"),
            ),
            other => (
                FailureKind::Network,
                format!("the broker at {at} refused the connection ({other:?})"),
            ),
        };
        return Failure { kind, message: why };
    }
    if let Some(tls) = rustls_error(e) {
        return match tls {
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => Failure {
                kind: FailureKind::UnknownCa,
                message: format!(
                    "TLS: the certificate of {at} is signed by an unknown CA: set ca_file to the CA that signs it (or leave ca_file out for a public CA)"
                ),
            },
            rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            ) => Failure {
                kind: FailureKind::WrongHost,
                message: format!(
                    "TLS: the certificate of {at} is not valid for host name {host:?} (SNI): set host to the name on the broker's certificate ({tls})"
                ),
            },
            other => Failure {
                kind: FailureKind::Tls,
                message: format!("TLS with {at} failed: {other}"),
            },
        };
    }
    let message = match e {
        ConnectionError::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            format!("cannot connect to {at}: connection refused (is the broker up?)")
        }
        ConnectionError::NetworkTimeout => format!("no answer from {at} in time"),
        ConnectionError::Tls(rumqttc::TlsError::DNSName(_)) => {
            format!("{host:?} is not a valid host name for TLS")
        }
        other => format!("connection to {at} failed: {other}"),
    };
    Failure {
        kind: FailureKind::Network,
        message,
    }
}

/// The rustls error inside a rumqttc error, however it is wrapped.
fn rustls_error(e: &ConnectionError) -> Option<&rustls::Error> {
    let io = match e {
        ConnectionError::Tls(rumqttc::TlsError::TLS(t)) => return Some(t),
        ConnectionError::Tls(rumqttc::TlsError::Io(io)) | ConnectionError::Io(io) => io,
        ConnectionError::MqttState(rumqttc::StateError::Io(io)) => io,
        _ => return None,
    };
    io.get_ref()?.downcast_ref::<rustls::Error>()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wrapped(e: rustls::Error) -> ConnectionError {
        ConnectionError::Tls(rumqttc::TlsError::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            e,
        )))
    }

    #[test]
    fn each_cause_gets_its_own_kind_and_advice() {
        let login = classify(
            &ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized),
            "h",
            8883,
        );
        assert_eq!(login.kind, FailureKind::Login);
        assert!(login.message.contains("password_file"), "{}", login.message);

        let ca = classify(
            &wrapped(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer,
            )),
            "h",
            8883,
        );
        assert_eq!(ca.kind, FailureKind::UnknownCa);
        assert!(ca.message.contains("unknown CA"), "{}", ca.message);

        let name = classify(
            &ConnectionError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                rustls::Error::InvalidCertificate(CertificateError::NotValidForName),
            )),
            "broker.example",
            8883,
        );
        assert_eq!(name.kind, FailureKind::WrongHost);
        assert!(
            name.message.contains("\"broker.example\""),
            "{}",
            name.message
        );

        let down = classify(
            &ConnectionError::Io(std::io::ErrorKind::ConnectionRefused.into()),
            "h",
            1,
        );
        assert_eq!(down.kind, FailureKind::Network);
        assert!(down.message.contains("connection refused"));
        let messages = [&login.message, &ca.message, &name.message, &down.message];
        for (i, a) in messages.iter().enumerate() {
            for b in &messages[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn public_roots_and_a_pem_ca_file_both_build_a_config() {
        assert!(client_config(&Tls::PublicRoots).is_ok());
        let dir = std::env::temp_dir().join(format!("sink-mqtt-ca-{}", std::process::id()));
        std::fs::write(&dir, "not a certificate").unwrap();
        assert!(read_cas(&dir).unwrap_err().contains("no PEM certificate"));
        let _ = std::fs::remove_file(&dir);
    }
}
