//! TLS on the meter port: the site CA and server certificate `tls init` makes, the checks
//! `check-config` and start-up run on the files `[broker] tls_cert_file` / `tls_key_file`
//! name, and the rustls server configuration the TLS listener serves with.
//!
//! The site CA signs one server certificate for the gateway's names; meters trust the CA
//! (built into the firmware or provisioned) and check the gateway's name against the
//! certificate's SANs. No client certificates: a meter proves itself by its MQTT secret,
//! which TLS now keeps off the air.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Where `tls init` writes, under the data directory.
pub const TLS_DIR: &str = "tls";
pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const SERVER_CERT: &str = "server.crt";
pub const SERVER_KEY: &str = "server.key";
/// The largest plaintext in one TLS record the gateway sends to a meter.
pub const MAX_RECORD_PLAINTEXT: usize = 4096;
/// The name every gateway's certificate carries besides its host name (mDNS).
pub const DEFAULT_NAME: &str = "umeme-gateway.local";
/// A site CA outlives any meter's service life; the firmware has it built in.
const CA_DAYS: i64 = 20 * 365;
/// The server certificate is renewed with `tls init --force` (same CA only if kept: see
/// README); ten years, since meters without a clock source cannot be told to renew.
const SERVER_DAYS: i64 = 10 * 365;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} already exists; pass --force to replace the site CA and server certificate (meters that trust the old CA will refuse the new one)", path.display())]
    Exists { path: PathBuf },
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
    #[error("{0}")]
    Key(#[from] umeme_plugin_sdk::secret::SecretFileError),
    #[error("making the certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the key in {} does not match the certificate in {}: {message}", key.display(), cert.display())]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        message: String,
    },
    #[error("bad name {0:?}: a host name (letters, digits, '-', '.') or an IP address")]
    BadName(String),
}

/// The files of a site's TLS, as `tls init` lays them out.
pub struct Paths {
    pub dir: PathBuf,
}

impl Paths {
    pub fn under(data_dir: &Path) -> Paths {
        Paths {
            dir: data_dir.join(TLS_DIR),
        }
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join(CA_CERT)
    }
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join(CA_KEY)
    }
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join(SERVER_CERT)
    }
    pub fn server_key(&self) -> PathBuf {
        self.dir.join(SERVER_KEY)
    }
}

/// What a certificate says, for `tls show` and `check-config`.
#[derive(Debug, Clone)]
pub struct CertSummary {
    pub subject: String,
    /// DNS names and IP addresses, as text.
    pub names: Vec<String>,
    /// Seconds since the Unix epoch.
    pub not_before: i64,
    pub not_after: i64,
    /// `YYYY-MM-DD HH:MM:SS UTC`.
    pub not_after_text: String,
    /// SHA-256 of the DER, as colon-separated hex (what `openssl x509 -fingerprint -sha256`
    /// prints).
    pub sha256: String,
}

impl CertSummary {
    pub fn expired(&self, now_unix: i64) -> bool {
        now_unix > self.not_after
    }
}

/// The default names: this host's name and [`DEFAULT_NAME`].
pub fn default_names() -> Vec<String> {
    let mut names = Vec::new();
    if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let h = h.trim().to_ascii_lowercase();
        if valid_dns_name(&h) {
            names.push(h);
        }
    }
    names.push(DEFAULT_NAME.to_string());
    names
}

fn valid_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Makes the site CA and a server certificate for `names` and `ips` under `paths.dir`: keys
/// 0600, certificates 0644. Refuses to replace existing files unless `force`. When run as
/// root on a data directory owned by the service user, the files are given to that user, so
/// the daemon can read its key.
pub fn init(
    paths: &Paths,
    names: &[String],
    ips: &[IpAddr],
    force: bool,
) -> Result<(CertSummary, CertSummary), TlsError> {
    for n in names {
        if !valid_dns_name(n) {
            return Err(TlsError::BadName(n.clone()));
        }
    }
    let files = [
        paths.ca_cert(),
        paths.ca_key(),
        paths.server_cert(),
        paths.server_key(),
    ];
    if !force {
        if let Some(p) = files.iter().find(|p| p.exists()) {
            return Err(TlsError::Exists { path: p.clone() });
        }
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TlsError::Io { path, source }
    };
    std::fs::create_dir_all(&paths.dir).map_err(io(&paths.dir))?;

    let now = rcgen::date_time_ymd(1970, 1, 1) + std::time::Duration::from_secs(now_unix() as u64);
    let day = std::time::Duration::from_secs(86_400);
    let site = names.first().map(String::as_str).unwrap_or(DEFAULT_NAME);

    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca = rcgen::CertificateParams::default();
    ca.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("umeme-gateway site CA ({site})"),
    );
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    // A day back: a meter or client whose clock is a little behind still accepts it.
    ca.not_before = now - day;
    ca.not_after = now + day * CA_DAYS as u32;
    let ca = rcgen::CertifiedIssuer::self_signed(ca, ca_key)?;

    let mut sans: Vec<String> = names.to_vec();
    sans.extend(ips.iter().map(IpAddr::to_string));
    let server_key = rcgen::KeyPair::generate()?;
    let mut server = rcgen::CertificateParams::new(sans)?;
    server
        .distinguished_name
        .push(rcgen::DnType::CommonName, site.to_string());
    server.is_ca = rcgen::IsCa::ExplicitNoCa;
    server.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    server.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    server.use_authority_key_identifier_extension = true;
    server.not_before = now - day;
    server.not_after = now + day * SERVER_DAYS as u32;
    let server_cert = server.signed_by(&server_key, &ca)?;

    write_file(&paths.ca_key(), ca.key().serialize_pem().as_bytes(), 0o600)?;
    write_file(&paths.ca_cert(), ca.pem().as_bytes(), 0o644)?;
    write_file(
        &paths.server_key(),
        server_key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_file(&paths.server_cert(), server_cert.pem().as_bytes(), 0o644)?;
    give_to_data_dir_owner(paths, &files)?;
    Ok((
        summary(&paths.ca_cert(), ca.der())?,
        summary(&paths.server_cert(), server_cert.der())?,
    ))
}

/// Writes `bytes` to `path` with `mode`, replacing any file there: written beside it and
/// renamed, so a crash leaves the old file or the new one, and a key is never readable by
/// others, not even for a moment.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("new");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

fn give_to_data_dir_owner(paths: &Paths, files: &[PathBuf]) -> Result<(), TlsError> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(());
    }
    let Some(data_dir) = paths.dir.parent() else {
        return Ok(());
    };
    let Ok(meta) = std::fs::metadata(data_dir) else {
        return Ok(());
    };
    if meta.uid() == 0 {
        return Ok(());
    }
    for p in std::iter::once(&paths.dir).chain(files) {
        std::os::unix::fs::chown(p, Some(meta.uid()), Some(meta.gid())).map_err(|source| {
            TlsError::Io {
                path: p.clone(),
                source,
            }
        })?;
    }
    Ok(())
}

pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Reads the certificates of a PEM file (the first is the end-entity one).
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Invalid {
            path: path.to_path_buf(),
            message: format!("not a PEM certificate file: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Invalid {
            path: path.to_path_buf(),
            message: "holds no certificate (-----BEGIN CERTIFICATE-----)".into(),
        });
    }
    Ok(certs)
}

/// Reads a private key file with the checks every secret file gets (not readable by others,
/// no symbolic link).
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let text = umeme_plugin_sdk::read_secret_file(path)?;
    PrivateKeyDer::from_pem_slice(text.as_bytes()).map_err(|e| TlsError::Invalid {
        path: path.to_path_buf(),
        message: format!("not a PEM private key: {e}"),
    })
}

/// What one DER certificate says.
pub fn summary(path: &Path, der: &[u8]) -> Result<CertSummary, TlsError> {
    use sha2::Digest;
    use x509_parser::extensions::GeneralName;
    let invalid = |message: String| TlsError::Invalid {
        path: path.to_path_buf(),
        message,
    };
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| invalid(format!("not an X.509 certificate: {e}")))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => names.push(d.to_string()),
                GeneralName::IPAddress(b) => match b.len() {
                    4 => names.push(IpAddr::from(<[u8; 4]>::try_from(*b).unwrap()).to_string()),
                    16 => names.push(IpAddr::from(<[u8; 16]>::try_from(*b).unwrap()).to_string()),
                    _ => {}
                },
                _ => {}
            }
        }
    }
    let v = cert.validity();
    let not_after = v.not_after.timestamp();
    Ok(CertSummary {
        subject: cert.subject().to_string(),
        names,
        not_before: v.not_before.timestamp(),
        not_after,
        not_after_text: utc_text(not_after),
        sha256: sha2::Sha256::digest(der)
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<Vec<_>>()
            .join(":"),
    })
}

fn utc_text(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let (y, m, d) = umeme_plugin_sdk::civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// The server certificate and key the TLS listener would serve: both readable, the key
/// matching the certificate. Returns what the certificate says, so callers can report its
/// names and expiry (an expired one is the caller's call: `check-config` refuses it, the
/// daemon warns and serves, since meters without a clock do not check it).
pub fn check_server_files(cert: &Path, key: &Path) -> Result<CertSummary, TlsError> {
    let (summary, _) = load(cert, key)?;
    Ok(summary)
}

/// The rustls configuration of the meter port's TLS listener: TLS 1.2 and 1.3 (ESP32 TLS
/// stacks may speak only 1.2), ring, no client certificates.
pub fn server_config(
    cert: &Path,
    key: &Path,
) -> Result<(CertSummary, Arc<rustls::ServerConfig>), TlsError> {
    load(cert, key)
}

fn load(cert: &Path, key: &Path) -> Result<(CertSummary, Arc<rustls::ServerConfig>), TlsError> {
    let certs = read_certs(cert)?;
    let summary = summary(cert, &certs[0])?;
    let key_der = read_key(key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Invalid {
            path: cert.to_path_buf(),
            message: e.to_string(),
        })?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| TlsError::Mismatch {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            message: e.to_string(),
        })?;
    // Records of at most 4 KiB, so a meter's TLS stack gets by with a 4 KiB read buffer
    // instead of TLS's 16 KiB (the ESP32-C3 firmware's `link::TLS_READ`).
    config.max_fragment_size = Some(MAX_RECORD_PLAINTEXT);
    // No session resumption: meters reconnect seldom and their TLS stack does not resume, so
    // tickets would be bytes a meter must receive and skip, and a cache entry per connection.
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok((summary, Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_makes_a_ca_and_a_server_certificate_for_the_names_with_private_keys() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::under(dir.path());
        let (ca, server) = init(
            &paths,
            &["gw.example".into()],
            &["192.0.2.7".parse().unwrap()],
            false,
        )
        .unwrap();
        assert!(ca.subject.contains("site CA"), "{}", ca.subject);
        assert_eq!(server.names, ["gw.example", "192.0.2.7"]);
        assert!(server.not_after > now_unix() + 9 * 365 * 86_400);
        for key in [paths.ca_key(), paths.server_key()] {
            let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
        let checked = check_server_files(&paths.server_cert(), &paths.server_key()).unwrap();
        assert_eq!(checked.sha256, server.sha256);
    }

    #[test]
    fn init_refuses_to_replace_a_site_ca_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::under(dir.path());
        let (first, _) = init(&paths, &["a.local".into()], &[], false).unwrap();
        let err = init(&paths, &["a.local".into()], &[], false).unwrap_err();
        assert!(err.to_string().contains("--force"), "{err}");
        let again = summary(&paths.ca_cert(), &read_certs(&paths.ca_cert()).unwrap()[0]).unwrap();
        assert_eq!(again.sha256, first.sha256);
        let (second, _) = init(&paths, &["a.local".into()], &[], true).unwrap();
        assert_ne!(second.sha256, first.sha256);
    }

    #[test]
    fn a_key_of_another_certificate_is_refused() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let (pa, pb) = (Paths::under(a.path()), Paths::under(b.path()));
        init(&pa, &["a.local".into()], &[], false).unwrap();
        init(&pb, &["b.local".into()], &[], false).unwrap();
        let err = check_server_files(&pa.server_cert(), &pb.server_key()).unwrap_err();
        assert!(matches!(err, TlsError::Mismatch { .. }), "{err}");
    }

    #[test]
    fn a_bad_name_is_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::under(dir.path());
        assert!(matches!(
            init(&paths, &["bad name".into()], &[], false),
            Err(TlsError::BadName(_))
        ));
        assert!(!paths.dir.exists());
    }
}
