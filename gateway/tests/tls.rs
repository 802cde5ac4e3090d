//! TLS on the meter port (`[broker] tls_listen`), with real TLS clients: mosquitto's clients
//! (OpenSSL) with `--cafile`, and a rustls client for TLS 1.2 and 1.3 by name. The site CA
//! and server certificate are the ones `umeme-gateway tls init` makes.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

const M: &str = "METER001";
const SECRET: &str = "meter-001-secret";
const CONSUMPTION: &str = "smartmeter/METER001/consumption";
const BALANCE: &str = "smartmeter/METER001/command/balance";

/// A gateway with a site CA for `localhost` only, TLS on a free port, and `extra_broker`
/// keys; started, with meter M provisioned.
fn tls_gateway(extra_broker: &str) -> (Gateway, SocketAddr) {
    let tls: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut gw =
        Gateway::new("").with_broker_keys(&format!("tls_listen = \"{tls}\"\n{extra_broker}"));
    let out = gw.cli(&["tls", "init", "--name", "localhost"]);
    assert!(out.status.success(), "tls init: {}", text(&out));
    gw.start();
    gw.add_meter(M, SECRET);
    (gw, tls)
}

fn ca_file(gw: &Gateway) -> PathBuf {
    gw.dir.path().join("data/tls/ca.crt")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `mosquitto_pub` of one QoS 1 report to `host:port` trusting `cafile` (it waits for the
/// PUBACK, which the gateway sends after the commit).
fn mosquitto_pub(host: &str, port: u16, cafile: &Path, extra: &[&str], payload: &str) -> Output {
    Command::new(require_tool("mosquitto_pub"))
        .args([
            "-h",
            host,
            "-p",
            &port.to_string(),
            "-i",
            M,
            "-u",
            M,
            "-P",
            SECRET,
        ])
        .args(["-V", "mqttv311", "--cafile"])
        .arg(cafile)
        .args(extra)
        .args(["-t", CONSUMPTION, "-q", "1", "-m", payload])
        .output()
        .expect("run mosquitto_pub")
}

#[test]
fn a_report_published_by_mosquitto_pub_over_tls_is_applied_and_the_balance_comes_back() {
    let (gw, tls) = tls_gateway("");
    gw.simulate(M, 100.0);
    let out = mosquitto_pub(
        "localhost",
        tls.port(),
        &ca_file(&gw),
        &[],
        &v1_payload(M, 0.04, 4.96),
    );
    assert!(
        out.status.success(),
        "mosquitto_pub over TLS: {}",
        text(&out)
    );
    eventually("the report's debit", || {
        (gw.balance_wh(M) == 4960).then_some(())
    });
    // The meter's own command topic, down the same TLS port: the retained balance.
    let out = Command::new(require_tool("mosquitto_sub"))
        .args(["-h", "localhost", "-p", &tls.port().to_string()])
        .args(["-i", M, "-u", M, "-P", SECRET, "-V", "mqttv311", "--cafile"])
        .arg(ca_file(&gw))
        .args(["-t", BALANCE, "-q", "1", "-C", "1", "-W", "15"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mosquitto_sub over TLS: {}",
        text(&out)
    );
    let cmd: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    assert_eq!(cmd["balance"], 4.96);
    assert!(gw.metric("umeme_mqtt_tls_connections_total") >= 2.0);
}

#[test]
fn a_client_trusting_another_ca_is_refused_and_nothing_is_applied() {
    let (gw, tls) = tls_gateway("");
    gw.simulate(M, 100.0);
    let other = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["tls", "init", "--name", "localhost", "--data-dir"])
        .arg(other.path())
        .arg("--config")
        .arg(&gw.config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let out = mosquitto_pub(
        "localhost",
        tls.port(),
        &other.path().join("tls/ca.crt"),
        &[],
        &v1_payload(M, 0.04, 4.96),
    );
    assert!(!out.status.success(), "a foreign CA must not verify");
    eventually("the failed handshake counted", || {
        (gw.metric("umeme_mqtt_tls_handshake_failures_total{reason=\"alert\"}") >= 1.0)
            .then_some(())
    });
    gw.assert_log("TLS handshake failed");
    assert_eq!(gw.balance_wh(M), 5000, "nothing was applied");
}

#[test]
fn a_host_name_not_in_the_certificate_is_refused() {
    let (gw, tls) = tls_gateway("");
    gw.simulate(M, 100.0);
    // The certificate names only `localhost`; 127.0.0.1 is the same socket by another name.
    let out = mosquitto_pub(
        "127.0.0.1",
        tls.port(),
        &ca_file(&gw),
        &[],
        &v1_payload(M, 0.04, 4.96),
    );
    assert!(
        !out.status.success(),
        "the name check must fail: {}",
        text(&out)
    );
    // The same by rustls, as a meter's TLS stack checks it.
    let err = rustls_connect(tls, &ca_file(&gw), "127.0.0.1", &rustls::version::TLS13)
        .expect_err("127.0.0.1 is not a name of the certificate");
    assert!(err.contains("NotValidForName"), "{err}");
    assert_eq!(gw.balance_wh(M), 5000);
}

#[test]
fn tls_1_2_and_1_3_clients_both_get_a_session() {
    let (gw, tls) = tls_gateway("");
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let code = rustls_connect(tls, &ca_file(&gw), "localhost", version).unwrap();
        assert_eq!(code, 0, "CONNACK accepted over {version:?}");
    }
    // mosquitto_pub asking for TLS 1.2 by name.
    gw.simulate(M, 100.0);
    let out = mosquitto_pub(
        "localhost",
        tls.port(),
        &ca_file(&gw),
        &["--tls-version", "tlsv1.2"],
        &v1_payload(M, 0.04, 4.96),
    );
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn plain_1883_keeps_serving_beside_tls() {
    let (gw, _tls) = tls_gateway("");
    let meter = gw.connect(M, SECRET);
    meter.disconnect();
}

#[test]
fn with_listen_off_only_the_tls_port_serves_meters() {
    let (gw, tls) = tls_gateway("listen = \"off\"\n");
    assert!(
        TcpStream::connect_timeout(&gw.broker, Duration::from_secs(2)).is_err(),
        "nothing listens on the plain port"
    );
    gw.simulate(M, 100.0);
    let out = mosquitto_pub(
        "localhost",
        tls.port(),
        &ca_file(&gw),
        &[],
        &v1_payload(M, 0.04, 4.96),
    );
    assert!(out.status.success(), "{}", text(&out));
    eventually("the report's debit", || {
        (gw.balance_wh(M) == 4960).then_some(())
    });
}

#[test]
fn a_client_that_opens_tls_and_stalls_is_closed_after_the_handshake_timeout() {
    let (gw, tls) = tls_gateway("tls_handshake_timeout_ms = 500\n");
    let started = Instant::now();
    let mut s = TcpStream::connect(tls).unwrap();
    // The start of a ClientHello record, then nothing.
    s.write_all(&[0x16, 0x03, 0x01, 0x00, 0x80]).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap_or(0);
    let waited = started.elapsed();
    assert_eq!(n, 0, "closed without an answer");
    assert!(
        waited >= Duration::from_millis(450) && waited < Duration::from_secs(5),
        "closed after {waited:?}"
    );
    eventually("the timeout counted", || {
        (gw.metric("umeme_mqtt_tls_handshake_failures_total{reason=\"timeout\"}") == 1.0)
            .then_some(())
    });
}

#[test]
fn handshakes_in_flight_per_address_are_capped_and_the_rest_closed_at_once() {
    let (gw, tls) =
        tls_gateway("max_tls_handshakes_per_ip = 2\ntls_handshake_timeout_ms = 30000\n");
    let stalled: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(tls).unwrap()).collect();
    eventually("both handshakes admitted", || {
        (gw.metric("umeme_mqtt_connections_total") >= 2.0).then_some(())
    });
    let mut third = TcpStream::connect(tls).unwrap();
    third.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(third.read(&mut buf).unwrap_or(0), 0, "closed at once");
    assert_eq!(
        gw.metric("umeme_mqtt_connect_refused_total{reason=\"tls_handshakes_per_ip\"}"),
        1.0
    );
    // A real client still gets in once a stalled handshake is gone.
    drop(stalled);
    eventually("a place freed", || {
        rustls_connect(tls, &ca_file(&gw), "localhost", &rustls::version::TLS13)
            .ok()
            .filter(|c| *c == 0)
    });
}

#[test]
fn check_config_reports_the_certificate_and_refuses_a_key_that_does_not_match() {
    let (gw, tls) = tls_gateway("");
    let out = gw.cli(&["check-config"]);
    assert!(out.status.success(), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains("TLS certificate") && said.contains("localhost"),
        "{said}"
    );
    assert!(said.contains(&format!("TLS on {tls}")), "{said}");
    let show = gw.cli(&["tls", "show"]);
    assert!(show.status.success(), "{}", text(&show));
    assert!(
        text(&show).contains("SHA-256 fingerprint"),
        "{}",
        text(&show)
    );

    // Another site's key under this site's certificate.
    let other = tempfile::tempdir().unwrap();
    let st = Command::new(BIN)
        .args(["tls", "init", "--data-dir"])
        .arg(other.path())
        .arg("--config")
        .arg(&gw.config)
        .output()
        .unwrap();
    assert!(st.status.success(), "{}", text(&st));
    std::fs::write(
        gw.dir.path().join("conf.d/60-key.toml"),
        format!(
            "[broker]\ntls_key_file = {:?}\n",
            other.path().join("tls/server.key").display().to_string()
        ),
    )
    .unwrap();
    let out = gw.cli(&["check-config"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("does not match"), "{}", text(&out));
}

#[test]
fn tls_init_refuses_to_replace_the_site_ca_without_force() {
    let gw = Gateway::new("");
    let out = gw.cli(&["tls", "init", "--name", "gw.example", "--ip", "192.0.2.10"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("gw.example, 192.0.2.10"),
        "{}",
        text(&out)
    );
    let out = gw.cli(&["tls", "init"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("--force"), "{}", text(&out));
    let out = gw.cli(&["tls", "init", "--force"]);
    assert!(out.status.success(), "{}", text(&out));
}

/// Opens TLS to `addr` as `name` trusting `ca` with only `version`, sends a meter's CONNECT
/// and returns the CONNACK return code; `Err` with rustls's reason when the handshake fails.
fn rustls_connect(
    addr: SocketAddr,
    ca: &Path,
    name: &str,
    version: &'static rustls::SupportedProtocolVersion,
) -> Result<u8, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let server = ServerName::try_from(name.to_string()).unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), server).unwrap();
    let sock = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(WAIT)).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, sock);
    let connect = pubsubclient_connect(M, Some((M, SECRET)));
    tls.write_all(&connect).map_err(|e| format!("{e:?}"))?;
    tls.flush().map_err(|e| format!("{e:?}"))?;
    let mut connack = [0u8; 4];
    tls.read_exact(&mut connack).map_err(|e| format!("{e:?}"))?;
    assert_eq!(connack[0], 0x20, "CONNACK");
    assert_eq!(
        tls.conn.protocol_version(),
        Some(version.version),
        "negotiated"
    );
    Ok(connack[3])
}

#[test]
fn an_expired_certificate_fails_check_config_and_is_served_with_a_warning() {
    let tls: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut gw = Gateway::new("");
    let dir = gw.dir.path().join("expired");
    std::fs::create_dir_all(&dir).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(dir.join("server.crt"), cert.pem()).unwrap();
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dir.join("server.key"))
            .unwrap();
        f.write_all(key.serialize_pem().as_bytes()).unwrap();
    }
    let mut gw_keys = format!(
        "tls_listen = \"{tls}\"\ntls_cert_file = {:?}\ntls_key_file = {:?}\n",
        dir.join("server.crt").display().to_string(),
        dir.join("server.key").display().to_string()
    );
    gw_keys.push('\n');
    gw = gw.with_broker_keys(&gw_keys);
    let out = gw.cli(&["check-config"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("expired on 2021-01-01"),
        "{}",
        text(&out)
    );
    gw.start();
    gw.assert_log("TLS certificate has expired");
    assert!(TcpStream::connect(tls).is_ok(), "served anyway");
}

#[test]
fn the_meters_tls_stack_gets_a_session_with_the_site_ca_and_refuses_another_name() {
    let (gw, tls) = tls_gateway("");
    gw.simulate(M, 100.0);
    let ca = std::fs::read(ca_file(&gw)).unwrap();
    let ca = {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::from_pem_slice(&ca).unwrap()
    };
    let puback = embedded_tls_report(tls, &ca, "localhost").expect("a session");
    assert_eq!(puback, [0x40, 2, 0, 1], "PUBACK after the commit");
    eventually("the report's debit", || {
        (gw.balance_wh(M) == 4960).then_some(())
    });
    let err = embedded_tls_report(tls, &ca, "gateway.local").unwrap_err();
    assert!(err.contains("InvalidCertificate"), "{err}");
}

/// What the ESP32-C3 firmware does (`firmware/esp32c3/src/link.rs`): embedded-tls 0.19, TLS
/// 1.3 with AES-128-GCM, the site CA as the only trust anchor, the gateway's name checked, no
/// clock, a 4,352-byte record buffer; then a meter's CONNECT and one QoS 1 report. Returns the
/// PUBACK's bytes.
fn embedded_tls_report(addr: SocketAddr, ca: &[u8], name: &str) -> Result<[u8; 4], String> {
    use embedded_io_async::{Read as _, Write as _};
    use embedded_tls::pki::CertVerifier;
    use embedded_tls::{
        Aes128GcmSha256, Certificate, CryptoProvider, NoClock, TlsConfig, TlsConnection,
        TlsContext, TlsError, TlsVerifier,
    };

    struct SiteCa<'a> {
        verifier: CertVerifier<'a, Aes128GcmSha256, NoClock, 1536>,
    }
    impl CryptoProvider for SiteCa<'_> {
        type CipherSuite = Aes128GcmSha256;
        type Signature = [u8; 0];
        fn rng(&mut self) -> impl embedded_tls::CryptoRngCore {
            rand::rngs::OsRng
        }
        fn verifier(&mut self) -> Result<&mut impl TlsVerifier<Aes128GcmSha256>, TlsError> {
            Ok(&mut self.verifier)
        }
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let mut read = [0u8; 4096 + 256];
        let mut write = [0u8; 1024];
        let mut tls: TlsConnection<_, Aes128GcmSha256> = TlsConnection::new(
            embedded_io_adapters::tokio_1::FromTokio::new(stream),
            &mut read,
            &mut write,
        );
        let config = TlsConfig::new().with_server_name(name);
        let provider = SiteCa {
            verifier: CertVerifier::new(Certificate::X509(ca)),
        };
        let io = |e: TlsError| format!("{e:?}");
        tokio::time::timeout(WAIT, tls.open(TlsContext::new(&config, provider)))
            .await
            .map_err(|_| "handshake timed out".to_string())?
            .map_err(io)?;
        tls.write_all(&pubsubclient_connect(M, Some((M, SECRET))))
            .await
            .map_err(io)?;
        tls.flush().await.map_err(io)?;
        let mut connack = [0u8; 4];
        tls.read_exact(&mut connack)
            .await
            .map_err(|e| format!("{e:?}"))?;
        assert_eq!(connack, [0x20, 2, 0, 0], "CONNACK accepted");
        let payload = v1_payload(M, 0.04, 4.96);
        let mut publish = bytes::BytesMut::new();
        let mut p = rumqttc::mqttbytes::v4::Publish::new(
            CONSUMPTION,
            rumqttc::mqttbytes::QoS::AtLeastOnce,
            payload.into_bytes(),
        );
        p.pkid = 1;
        p.write(&mut publish).unwrap();
        tls.write_all(&publish).await.map_err(io)?;
        tls.flush().await.map_err(io)?;
        let mut puback = [0u8; 4];
        tokio::time::timeout(WAIT, tls.read_exact(&mut puback))
            .await
            .map_err(|_| "no PUBACK".to_string())?
            .map_err(|e| format!("{e:?}"))?;
        Ok(puback)
    })
}

#[test]
fn plain_and_tls_meters_share_one_connection_cap() {
    let (gw, tls) = tls_gateway("max_connections = 1\n");
    let meter = gw.connect(M, SECRET);
    let err = rustls_connect(tls, &ca_file(&gw), "localhost", &rustls::version::TLS13)
        .expect_err("the one place is taken by the plain meter");
    assert!(!err.is_empty());
    assert_eq!(
        gw.metric("umeme_mqtt_connect_refused_total{reason=\"max_connections\"}"),
        1.0
    );
    meter.disconnect();
    eventually("the place freed for TLS", || {
        rustls_connect(tls, &ca_file(&gw), "localhost", &rustls::version::TLS13)
            .ok()
            .filter(|c| *c == 0)
    });
}

/// A measurement, not a check (docs/benchmarks.md, "TLS on the meter port"): the daemon's RSS
/// with `N` idle connections that finished the TLS handshake, against `N` idle plain ones, in
/// one run. `cargo test -p umeme-gateway --release --test tls memory -- --ignored --nocapture`
#[test]
#[ignore]
fn memory_per_idle_tls_connection_compared_with_plain() {
    const N: usize = 500;
    let rss_kib = |gw: &Gateway| -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", gw.pid().unwrap())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    let keys = "max_unauthenticated_per_ip = 100000\nconnect_timeout_ms = 600000\nmax_tls_handshakes_per_ip = 100000\n";
    // One gateway per kind, so neither reuses memory the other freed.
    let (gw, _) = tls_gateway(keys);
    let plain_before = rss_kib(&gw);
    let plain: Vec<TcpStream> = (0..N)
        .map(|_| TcpStream::connect(gw.broker).unwrap())
        .collect();
    eventually("plain connections accepted", || {
        (gw.metric("umeme_mqtt_connections_total") >= N as f64).then_some(())
    });
    let plain_added = rss_kib(&gw).saturating_sub(plain_before);
    drop(plain);
    drop(gw);
    let (gw, tls) = tls_gateway(keys);
    let ca = ca_file(&gw);
    let before = rss_kib(&gw);
    let mut roots = rustls::RootCertStore::empty();
    {
        use rustls::pki_types::pem::PemObject;
        for c in rustls::pki_types::CertificateDer::pem_file_iter(&ca).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
    }
    let config = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    let started = Instant::now();
    let sessions: Vec<_> = (0..N)
        .map(|_| {
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let mut conn = rustls::ClientConnection::new(config.clone(), name).unwrap();
            let mut sock = TcpStream::connect(tls).unwrap();
            while conn.is_handshaking() {
                conn.complete_io(&mut sock).unwrap();
            }
            (conn, sock)
        })
        .collect();
    let handshakes = started.elapsed();
    eventually("TLS connections accepted", || {
        (gw.metric("umeme_mqtt_tls_connections_total") >= N as f64).then_some(())
    });
    let tls_added = rss_kib(&gw).saturating_sub(before);
    println!(
        "RSS: {before} KiB idle; +{plain_added} KiB with {N} plain connections before CONNECT ({:.1} KiB each); +{tls_added} KiB with {N} TLS connections after the handshake ({:.1} KiB each); {N} sequential TLS 1.3 handshakes (client in the same test process) in {handshakes:?}",
        plain_added as f64 / N as f64,
        tls_added as f64 / N as f64,
    );
    drop(sessions);
}
