//! The MQTT uplink plugin (`umeme-sink-mqtt`) against a real broker: Debian's mosquitto,
//! started by each test on loopback with TLS (certificates made here with the `openssl` CLI),
//! a password file and an ACL, and the real gateway binary loading the plugin from its
//! plugin folder.
//!
//! The broker has three listeners: TLS with a certificate for `localhost` (the gateway's
//! uplink), TLS with a certificate for another name (the wrong-host-name case), and plain TCP
//! for the test's own observer and "cloud" clients (so the test needs no TLS client; the same
//! password file and ACL apply to every listener).
//!
//! "Killed" means SIGTERM. What is under test is the gateway's side: everything the broker
//! PUBACKed is at the broker, everything else is sent again. With SIGKILL, mosquitto itself
//! loses what it accepted since its last autosave (its persistence is a periodic snapshot),
//! messages it had PUBACKed to the gateway included, and no client can make up for that. With
//! SIGTERM it writes its snapshot (`persistence true`) and exits at once, dropping every
//! connection in mid-stream just the same: the gateway sees the same broken link and refused
//! reconnects, while the messages the broker accepted for the observer's persistent session
//! survive the restart.
//!
//! Needs `mosquitto` (package `mosquitto`, which also brings `mosquitto_passwd`) and `openssl`
//! (package `openssl`); each test fails at once with a clear message when one is missing.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::*;
use rumqttc::mqttbytes::v4::{Connect, Login, Packet, Publish, Subscribe};
use rumqttc::mqttbytes::{self, QoS};

const PLUGIN: &str = "libumeme_sink_mqtt.so";
const GATEWAY_PASSWORD: &str = "gw-uplink-secret";

/// Builds the plugin once per test binary.
fn plugin() -> PathBuf {
    built_plugin("umeme-sink-mqtt")
}

fn require(tool: &str, package: &str) {
    let found = std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .any(|d| Path::new(d).join(tool).exists());
    assert!(
        found,
        "`{tool}` is not installed: these tests need Debian's `{package}` package (apt-get install mosquitto openssl)"
    );
}

fn tool(name: &str) -> PathBuf {
    for d in std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
    {
        let p = Path::new(d).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} not found")
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run a tool");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and the certificates the tests need, made with the openssl CLI.
struct Pki {
    ca: PathBuf,
    other_ca: PathBuf,
    /// (cert, key) for DNS:localhost.
    localhost: (PathBuf, PathBuf),
    /// (cert, key) for DNS:broker.invalid only.
    wrong_name: (PathBuf, PathBuf),
}

fn openssl(dir: &Path, args: &[&str]) {
    run(Command::new(tool("openssl")).current_dir(dir).args(args));
}

fn make_ca(dir: &Path, name: &str) -> PathBuf {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.crt"),
        ],
    );
    dir.join(format!("{name}.crt"))
}

fn make_server_cert(dir: &Path, ca: &str, name: &str, dns: &str) -> (PathBuf, PathBuf) {
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/CN={dns}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
        ],
    );
    std::fs::write(
        dir.join(format!("{name}.ext")),
        format!(
            "subjectAltName=DNS:{dns}\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n"
        ),
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
            "-out",
            &format!("{name}.crt"),
        ],
    );
    (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    )
}

impl Pki {
    fn new(dir: &Path) -> Pki {
        let ca = make_ca(dir, "test-ca");
        let other_ca = make_ca(dir, "other-ca");
        Pki {
            localhost: make_server_cert(dir, "test-ca", "localhost", "localhost"),
            wrong_name: make_server_cert(dir, "test-ca", "wrong-name", "broker.invalid"),
            ca,
            other_ca,
        }
    }
}

/// A mosquitto process with TLS, passwords, an ACL and persistence, in its own folder.
struct Broker {
    dir: PathBuf,
    pki: Pki,
    tls_port: u16,
    wrong_name_port: u16,
    plain: SocketAddr,
    child: Option<Child>,
    starts: usize,
}

const ACL: &str = "\
user gateway
topic write umeme/test-site/#
topic read umeme/test-site/command/#

user observer
topic read umeme/#

user cloud
topic write umeme/+/command/#
topic read umeme/+/command_result/#
";

impl Broker {
    fn new(dir: &Path) -> Broker {
        require("mosquitto", "mosquitto");
        require("mosquitto_passwd", "mosquitto");
        require("openssl", "openssl");
        let dir = dir.join("broker");
        std::fs::create_dir_all(&dir).unwrap();
        let pki = Pki::new(&dir);
        let passwd = dir.join("passwd");
        for (i, (user, pass)) in [
            ("gateway", GATEWAY_PASSWORD),
            ("observer", "observer-secret"),
            ("cloud", "cloud-secret"),
        ]
        .iter()
        .enumerate()
        {
            let mut cmd = Command::new(tool("mosquitto_passwd"));
            if i == 0 {
                cmd.arg("-c");
            }
            run(cmd.arg("-b").arg(&passwd).args([user, pass]));
        }
        std::fs::write(dir.join("acl"), ACL).unwrap();
        let tls_port = free_port();
        let wrong_name_port = free_port();
        let plain: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        // As root, mosquitto would switch to user `mosquitto`, who cannot read our temp dir.
        let is_root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
        let d = dir.display();
        let conf = format!(
            "{user}per_listener_settings false\nallow_anonymous false\npassword_file {d}/passwd\nacl_file {d}/acl\n\
             persistence true\npersistence_location {d}/\nautosave_interval 3600\n\
             max_queued_messages 100000\nmax_inflight_messages 100\n\
             log_dest file {d}/mosquitto.log\nlog_type all\nconnection_messages true\n\
             listener {tls_port} 127.0.0.1\ncafile {ca}\ncertfile {c1}\nkeyfile {k1}\n\
             listener {wrong_name_port} 127.0.0.1\ncafile {ca}\ncertfile {c2}\nkeyfile {k2}\n\
             listener {plain_port} 127.0.0.1\n",
            user = if is_root { "user root\n" } else { "" },
            ca = pki.ca.display(),
            c1 = pki.localhost.0.display(),
            k1 = pki.localhost.1.display(),
            c2 = pki.wrong_name.0.display(),
            k2 = pki.wrong_name.1.display(),
            plain_port = plain.port(),
        );
        std::fs::write(dir.join("mosquitto.conf"), conf).unwrap();
        Broker {
            dir,
            pki,
            tls_port,
            wrong_name_port,
            plain,
            child: None,
            starts: 0,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default()
    }

    fn start(&mut self) {
        assert!(self.child.is_none());
        let child = Command::new(tool("mosquitto"))
            .arg("-c")
            .arg(self.dir.join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto");
        self.child = Some(child);
        self.starts += 1;
        let want = self.starts;
        eventually("mosquitto to be running", || {
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("mosquitto exited ({st}); its log:\n{}", self.log());
            }
            (self.log().matches(" running").count() >= want).then_some(())
        });
    }

    /// SIGTERM (see the module comment) and wait for the process to end.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child process.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            c.wait().expect("reap mosquitto");
        }
    }

    /// Connections the broker accepted on `port` so far.
    fn connections_on(&self, port: u16) -> usize {
        self.log().matches(&format!(" on port {port}.")).count()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The sink's TOML, with `[sink.config]` extended by `extra` lines.
fn sink_toml(secrets: &Path, port: u16, ca: &Path, password: &str, extra: &str) -> String {
    let pw = secrets.join(format!("mqtt-password-{port}-{}", password.len()));
    std::fs::write(&pw, format!("{password}\n")).unwrap();
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
    let key = secrets.join("command.key");
    std::fs::write(&key, format!("{COMMAND_KEY}\n")).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    format!(
        "[[sink]]\nname = \"hivemq\"\nplugin = \"{PLUGIN}\"\nretry_max = \"2s\"\ntimeout = \"10s\"\n\
         [sink.config]\nhost = \"localhost\"\nport = {port}\nca_file = {ca:?}\nusername = \"gateway\"\n\
         password_file = {pw:?}\ngateway_id = \"test-site\"\ncommand_key_file = {key:?}\n{extra}\n",
        ca = ca.display().to_string(),
        pw = pw.display().to_string(),
        key = key.display().to_string(),
    )
}

/// The site's command key, as `openssl rand -hex 32` would make it.
const COMMAND_KEY: &str = "5f0c6a1e9d2b47c8a3e1f0b2d4c6e8a0197b3d5f7a9c1e3b5d7f9a1c3e5b7d9f";

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// `command` with `ts` and `nonce`, signed the way the README tells a cloud operator to:
/// `openssl dgst -sha256 -hmac KEY` over the exact payload, in the `{"payload","sig"}` envelope.
fn signed_with(key: &str, mut command: serde_json::Value, ts: i64, nonce: &str) -> String {
    command["ts"] = ts.into();
    command["nonce"] = nonce.into();
    let payload = command.to_string();
    let mut child = Command::new(tool("openssl"))
        .args(["dgst", "-sha256", "-hmac", key, "-r"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run openssl dgst");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(payload.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let sig = String::from_utf8(out.stdout).unwrap();
    let sig = sig.split_whitespace().next().unwrap().to_string();
    serde_json::json!({"payload": payload, "sig": sig}).to_string()
}

fn signed(command: serde_json::Value, nonce: &str) -> String {
    signed_with(COMMAND_KEY, command, unix_now(), nonce)
}

/// A gateway whose plugin folder holds the freshly built MQTT plugin (0755 folder, 0644 file).
fn gateway(scratch: &Path, sink: &str) -> Gateway {
    let plugins = install_plugins(scratch, &[plugin()]);
    Gateway::with_plugins(&plugins, sink)
}

fn outbox(gw: &Gateway) -> serde_json::Value {
    let (status, v) = gw.http("GET", "/api/outbox", None);
    assert_eq!(status, 200, "{v}");
    v["sinks"][0].clone()
}

/// Polls `f` (with growing pauses) until it returns `Some` or `limit` passes.
fn within<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    let mut pause = Duration::from_millis(10);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(250));
    }
}

/// A plain MQTT 3.1.1 client for the observer: survives the broker going away.
struct Client {
    stream: TcpStream,
    buf: BytesMut,
}

enum Got {
    Packet(Packet),
    Quiet,
    Closed,
}

impl Client {
    fn connect(addr: SocketAddr, id: &str, user: &str, pass: &str, clean: bool) -> Option<Client> {
        let stream = TcpStream::connect(addr).ok()?;
        let mut c = Client {
            stream,
            buf: BytesMut::new(),
        };
        let mut connect = Connect::new(id);
        connect.keep_alive = 120;
        connect.clean_session = clean;
        connect.login = Some(Login::new(user, pass));
        c.send(Packet::Connect(connect));
        match c.recv(WAIT) {
            Got::Packet(Packet::ConnAck(a)) if a.code == rumqttc::ConnectReturnCode::Success => {
                Some(c)
            }
            _ => None,
        }
    }

    fn send(&mut self, p: Packet) {
        let mut out = BytesMut::new();
        p.write(&mut out, usize::MAX).expect("encode");
        let _ = self.stream.write_all(&out);
    }

    fn recv(&mut self, wait: Duration) -> Got {
        self.stream.set_read_timeout(Some(wait)).unwrap();
        loop {
            match Packet::read(&mut self.buf, 1 << 20) {
                Ok(p) => return Got::Packet(p),
                Err(mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("bad packet from mosquitto: {e}"),
            }
            let mut chunk = [0u8; 16384];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Got::Closed,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Got::Quiet
                }
                Err(_) => return Got::Closed,
            }
        }
    }

    fn subscribe(&mut self, filter: &str) {
        let mut s = Subscribe::new(filter, QoS::AtLeastOnce);
        s.pkid = 1;
        self.send(Packet::Subscribe(s));
        loop {
            match self.recv(WAIT) {
                Got::Packet(Packet::SubAck(a)) => {
                    assert_eq!(
                        a.return_codes,
                        vec![rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce)],
                        "SUBACK for {filter}"
                    );
                    return;
                }
                Got::Packet(Packet::Publish(p)) => self.ack(&p),
                Got::Packet(_) => {}
                _ => panic!("no SUBACK for {filter}"),
            }
        }
    }

    fn ack(&mut self, p: &Publish) {
        if p.qos == QoS::AtLeastOnce {
            self.send(Packet::PubAck(rumqttc::PubAck::new(p.pkid)));
        }
    }

    fn publish(&mut self, topic: &str, payload: &str, pkid: u16) {
        let mut p = Publish::new(topic, QoS::AtLeastOnce, payload.as_bytes().to_vec());
        p.pkid = pkid;
        self.send(Packet::Publish(p));
    }

    /// The next publish on `topic` (acking every QoS 1 publish on the way).
    fn next_on(&mut self, topic: &str) -> serde_json::Value {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Got::Packet(Packet::Publish(p)) = self.recv(Duration::from_millis(500)) {
                self.ack(&p);
                if p.topic == topic {
                    return serde_json::from_slice(&p.payload).expect("JSON");
                }
            }
        }
        panic!("nothing on {topic} within {WAIT:?}")
    }
}

/// What the observer saw: every copy of every event, by seq.
struct Seen {
    seq: i64,
    id: String,
    body: serde_json::Value,
}

/// Watches `umeme/test-site/#` on a persistent session; reconnects when told the broker is
/// back (`up`), ends when `stop` is set.
fn observer(
    addr: SocketAddr,
    seen: mpsc::Sender<Seen>,
    up: mpsc::Receiver<()>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    let mut c = Client::connect(addr, "observer", "observer", "observer-secret", false)
        .expect("observer connects");
    c.subscribe("umeme/test-site/#");
    std::thread::spawn(move || {
        let mut client = Some(c);
        while !stop.load(Ordering::Acquire) {
            let Some(c) = client.as_mut() else {
                // The broker went away: wait (bounded) until the test says it is back.
                if up.recv_timeout(Duration::from_secs(60)).is_err() {
                    return;
                }
                client = Client::connect(addr, "observer", "observer", "observer-secret", false);
                assert!(
                    client.is_some(),
                    "observer reconnects to the restarted broker"
                );
                continue;
            };
            match c.recv(Duration::from_millis(200)) {
                Got::Packet(Packet::Publish(p)) => {
                    c.ack(&p);
                    let body: serde_json::Value =
                        serde_json::from_slice(&p.payload).expect("event JSON");
                    if let Some(seq) = body["seq"].as_i64() {
                        let id = body["id"].as_str().unwrap_or_default().to_string();
                        if seen.send(Seen { seq, id, body }).is_err() {
                            return;
                        }
                    }
                }
                Got::Packet(_) | Got::Quiet => {}
                Got::Closed => client = None,
            }
        }
    })
}

fn attempts(gw: &Gateway) -> usize {
    gw.log_text().matches("mqtt: connecting to").count()
}

#[test]
fn thousands_of_events_reach_a_subscriber_across_two_broker_restarts_with_duplicates_only_as_retries(
) {
    const REPORTS: u32 = 3000;
    let started = Instant::now();
    let scratch = tempfile::tempdir().unwrap();
    let mut broker = Broker::new(scratch.path());
    broker.start();
    let (seen_tx, seen) = mpsc::channel();
    let (up_tx, up_rx) = mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = observer(broker.plain, seen_tx, up_rx, stop.clone());

    let sink = sink_toml(
        scratch.path(),
        broker.tls_port,
        &broker.pki.ca,
        GATEWAY_PASSWORD,
        "reconnect_min_ms = 250\nreconnect_max_secs = 2",
    );
    let mut gw = gateway(scratch.path(), &sink).with_broker_keys(UNLIMITED_REPORTS);
    gw.start();
    gw.add_meter("METER001", "uplink-test-secret");

    // The meter reports in a thread while the broker goes down twice.
    let addr = gw.broker;
    let producer = std::thread::spawn(move || {
        let (mut m, code) = RawMeter::connect(
            addr,
            "METER001",
            "METER001",
            "uplink-test-secret",
            true,
            None,
        );
        assert_eq!(code, rumqttc::ConnectReturnCode::Success);
        for i in 1..=REPORTS {
            let pkid = (i % 60_000 + 1) as u16;
            m.publish(
                "smartmeter/METER001/consumption",
                &v2_payload("METER001", i, u64::from(i)),
                QoS::AtLeastOnce,
                pkid,
            );
            if i % 200 == 0 {
                m.barrier("METER001", 60_001 + (i / 200 % 2) as u16);
            }
        }
        m.barrier("METER001", 65_000);
    });

    let mut copies: BTreeMap<i64, Vec<Seen>> = BTreeMap::new();
    let take = |copies: &mut BTreeMap<i64, Vec<Seen>>, until: usize, limit: Duration| {
        let deadline = Instant::now() + limit;
        while copies.len() < until {
            let left = deadline.saturating_duration_since(Instant::now());
            let s = seen.recv_timeout(left).unwrap_or_else(|_| {
                panic!("only {} distinct events within {limit:?}", copies.len())
            });
            copies.entry(s.seq).or_default().push(s);
        }
    };
    for (restart, at) in [(1, REPORTS as usize / 4), (2, REPORTS as usize / 2)] {
        take(&mut copies, at, Duration::from_secs(60));
        broker.stop();
        broker.start();
        up_tx.send(()).unwrap();
        eprintln!(
            "broker restarted ({restart}) after {} distinct events",
            copies.len()
        );
    }
    producer
        .join()
        .expect("the meter's reports were all PUBACKed by the gateway");
    let drained = within("the outbox to drain", Duration::from_secs(120), || {
        let o = outbox(&gw);
        (o["backlog"] == 0).then_some(o)
    });
    let db = rusqlite::Connection::open(gw.db_path()).unwrap();
    let last: i64 = db
        .query_row("SELECT MAX(seq) FROM events", [], |r| r.get(0))
        .unwrap();
    take(&mut copies, last as usize, Duration::from_secs(60));
    stop.store(true, Ordering::Release);
    watcher.join().unwrap();
    while let Ok(s) = seen.try_recv() {
        copies.entry(s.seq).or_default().push(s);
    }

    assert_eq!(
        copies.keys().copied().collect::<Vec<_>>(),
        (1..=last).collect::<Vec<_>>(),
        "every event, and nothing else, arrived"
    );
    let mut duplicates = 0;
    for (seq, all) in &copies {
        assert_eq!(all[0].id, format!("test-site-{seq:012}"));
        for s in &all[1..] {
            assert_eq!(
                s.body, all[0].body,
                "a second copy of seq {seq} is the same event"
            );
        }
        duplicates += all.len() - 1;
    }
    let kinds: BTreeSet<&str> = copies
        .values()
        .map(|c| c[0].body["kind"].as_str().unwrap())
        .collect();
    assert!(kinds.contains("consumption"), "{kinds:?}");
    assert!(last >= i64::from(REPORTS), "{last}");
    // Each restart cut the uplink and it came back (a restart is felt as a failed batch only
    // when a batch was in flight at that moment).
    let connects = gw
        .log_text()
        .matches("mqtt: connected to localhost")
        .count();
    assert!(connects >= 3, "connected {connects} times: {drained}");
    // Reconnects are logged.
    gw.assert_log("mqtt: connected to localhost");
    gw.assert_log("again");
    eprintln!(
        "{last} events delivered to the subscriber, {duplicates} duplicate copies, {} failed batches retried, {:?} in all",
        drained["failures_total"],
        started.elapsed()
    );
}

#[test]
fn a_wrong_password_an_unknown_ca_and_a_wrong_host_name_each_say_so_and_back_off() {
    let scratch = tempfile::tempdir().unwrap();
    let mut broker = Broker::new(scratch.path());
    broker.start();
    let cases = [
        (
            "wrong password",
            broker.tls_port,
            broker.pki.ca.clone(),
            "not-the-password",
            "refused the login",
        ),
        (
            "unknown CA",
            broker.tls_port,
            broker.pki.other_ca.clone(),
            GATEWAY_PASSWORD,
            "signed by an unknown CA",
        ),
        (
            "wrong host name",
            broker.wrong_name_port,
            broker.pki.ca.clone(),
            GATEWAY_PASSWORD,
            "is not valid for host name \"localhost\"",
        ),
    ];
    let mut gateways = Vec::new();
    for (i, (case, port, ca, password, _)) in cases.iter().enumerate() {
        let dir = scratch.path().join(format!("gw{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let sink = sink_toml(&dir, *port, ca, password, "");
        let mut gw = gateway(&dir, &sink);
        gw.start();
        gw.add_meter("METER001", "uplink-test-secret");
        gateways.push((case, gw));
    }
    let mut errors = Vec::new();
    for ((case, gw), (_, _, _, _, phrase)) in gateways.iter().zip(&cases) {
        let error = within(&format!("{case}: an outbox error"), WAIT, || {
            outbox(gw)["last_error"].as_str().map(str::to_string)
        });
        assert!(error.contains(phrase), "{case}: {error}");
        // The gateway log says why.
        gw.assert_log(phrase);
        errors.push(error);
    }
    for (i, (_, _, _, _, phrase)) in cases.iter().enumerate() {
        for (j, e) in errors.iter().enumerate() {
            assert_eq!(e.contains(phrase), i == j, "{phrase:?} in {e:?}");
        }
    }

    // No busy loop: few attempts, and few connections at the broker, over six seconds.
    let before: Vec<usize> = gateways.iter().map(|(_, gw)| attempts(gw)).collect();
    let at_broker =
        broker.connections_on(broker.tls_port) + broker.connections_on(broker.wrong_name_port);
    std::thread::sleep(Duration::from_secs(6));
    for ((case, gw), before) in gateways.iter().zip(before) {
        let n = attempts(gw) - before;
        assert!(n <= 5, "{case}: {n} connection attempts in 6 s");
        assert!(
            outbox(gw)["backlog"].as_i64().unwrap() >= 1,
            "{case}: events are kept"
        );
    }
    let at_broker = broker.connections_on(broker.tls_port)
        + broker.connections_on(broker.wrong_name_port)
        - at_broker;
    assert!(
        at_broker <= 15,
        "{at_broker} connections at the broker in 6 s"
    );
    eprintln!("errors: {errors:#?}; {at_broker} connections at the broker in 6 s from 3 gateways");
}

#[test]
fn a_credit_command_sent_twice_with_one_reference_credits_once_and_the_meter_hears_its_balance() {
    let scratch = tempfile::tempdir().unwrap();
    let mut broker = Broker::new(scratch.path());
    broker.start();
    let sink = sink_toml(
        scratch.path(),
        broker.tls_port,
        &broker.pki.ca,
        GATEWAY_PASSWORD,
        "",
    );
    let mut gw = gateway(scratch.path(), &sink);
    gw.start();
    gw.add_meter("METER001", "uplink-test-secret");
    gw.wait_log("mqtt: taking commands on umeme/test-site/command/#");

    let mut meter = gw.connect("METER001", "uplink-test-secret");
    meter.subscribe("smartmeter/METER001/command/#", 1);
    meter.barrier("METER001", 2);

    let mut cloud = Client::connect(broker.plain, "cloud", "cloud", "cloud-secret", true)
        .expect("cloud client connects");
    cloud.subscribe("umeme/test-site/command_result/#");
    let credit = |id: &str| {
        signed(
            serde_json::json!({"id": id, "meter": "METER001", "reference": "HQ-0001", "amount_kes": 100}),
            &format!("nonce-{id}"),
        )
    };
    cloud.publish("umeme/test-site/command/credit", &credit("cmd-1"), 1);
    let first = cloud.next_on("umeme/test-site/command_result/cmd-1");
    cloud.publish("umeme/test-site/command/credit", &credit("cmd-2"), 2);
    let second = cloud.next_on("umeme/test-site/command_result/cmd-2");
    assert_eq!(first["ok"], true, "{first}");
    assert_eq!(first["duplicate"], false, "{first}");
    assert_eq!(first["credit_wh"], 5000, "{first}");
    assert_eq!(second["ok"], true, "{second}");
    assert_eq!(second["duplicate"], true, "{second}");
    assert_eq!(second["balance_wh"], first["balance_wh"]);
    assert_eq!(gw.balance_wh("METER001"), 5000);
    let (_, payments) = gw.http("GET", "/api/meters/METER001/payments", None);
    let payments = payments
        .as_array()
        .or_else(|| payments["payments"].as_array())
        .cloned()
        .unwrap_or_default();
    assert_eq!(payments.len(), 1, "one payment: {payments:?}");

    // The meter hears its new balance from the gateway.
    let deadline = Instant::now() + WAIT;
    loop {
        let p = meter.next_publish("smartmeter/METER001/command/balance");
        if balance_json(&p)["balanceWh"] == 5000 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no balance of 5000 Wh reached the meter"
        );
    }

    // A relay command goes through to the meter too, and is answered.
    cloud.publish(
        "umeme/test-site/command/relay",
        &signed(
            serde_json::json!({"id": "cmd-3", "meter": "METER001", "relay": "off", "reason": "maintenance"}),
            "nonce-cmd-3",
        ),
        3,
    );
    let relay = meter.next_publish("smartmeter/METER001/command/relay");
    let relay: serde_json::Value = serde_json::from_slice(&relay.payload).unwrap();
    assert_eq!(relay["relay"], "off");
    assert_eq!(
        cloud.next_on("umeme/test-site/command_result/cmd-3")["ok"],
        true
    );
}

/// A broker, a gateway whose uplink takes commands with [`COMMAND_KEY`], meters METER001 and
/// METER002, and a "cloud" client subscribed to the results.
fn command_site(scratch: &Path, extra: &str) -> (Broker, Gateway, Client) {
    let mut broker = Broker::new(scratch);
    broker.start();
    let sink = sink_toml(
        scratch,
        broker.tls_port,
        &broker.pki.ca,
        GATEWAY_PASSWORD,
        extra,
    );
    let mut gw = gateway(scratch, &sink);
    gw.start();
    gw.add_meter("METER001", "uplink-test-secret");
    gw.add_meter("METER002", "uplink-test-secret-2");
    gw.wait_log("mqtt: taking commands on umeme/test-site/command/#");
    let mut cloud = Client::connect(broker.plain, "cloud", "cloud", "cloud-secret", true)
        .expect("cloud client connects");
    cloud.subscribe("umeme/test-site/command_result/#");
    (broker, gw, cloud)
}

fn credit_json(id: &str, meter: &str, reference: &str, kes: u64) -> serde_json::Value {
    serde_json::json!({"id": id, "meter": meter, "reference": reference, "amount_kes": kes})
}

const CREDIT: &str = "umeme/test-site/command/credit";

fn result_of(id: &str) -> String {
    format!("umeme/test-site/command_result/{id}")
}

#[test]
fn unsigned_forged_expired_and_replayed_credit_commands_credit_nothing_and_are_answered_why() {
    let scratch = tempfile::tempdir().unwrap();
    let (_broker, gw, mut cloud) = command_site(scratch.path(), "");

    let cases = [
        (
            "unsigned",
            credit_json("unsigned", "METER001", "R-1", 100).to_string(),
            "unsigned command refused",
        ),
        (
            "forged",
            signed_with(
                &"0".repeat(64),
                credit_json("forged", "METER001", "R-2", 100),
                unix_now(),
                "n-forged",
            ),
            "bad signature",
        ),
        (
            "expired",
            signed_with(
                COMMAND_KEY,
                credit_json("expired", "METER001", "R-3", 100),
                unix_now() - 600,
                "n-expired",
            ),
            "expired: ts is",
        ),
    ];
    for (i, (id, payload, why)) in cases.iter().enumerate() {
        cloud.publish(CREDIT, payload, 10 + i as u16);
        let r = cloud.next_on(&result_of(id));
        assert_eq!(r["ok"], false, "{id}: {r}");
        assert!(r["error"].as_str().unwrap().starts_with(why), "{id}: {r}");
    }
    assert_eq!(gw.balance_wh("METER001"), 0, "nothing credited");
    gw.wait_log("refused");

    // A genuine command, then the very same bytes again: credited once, the replay answered
    // with the first result.
    let genuine = signed(credit_json("genuine", "METER001", "R-4", 100), "n-genuine");
    cloud.publish(CREDIT, &genuine, 20);
    let first = cloud.next_on(&result_of("genuine"));
    assert_eq!(first["ok"], true, "{first}");
    cloud.publish(CREDIT, &genuine, 21);
    let replay = cloud.next_on(&result_of("genuine"));
    assert_eq!(replay["replayed"], true, "{replay}");
    assert_eq!(replay["balance_wh"], first["balance_wh"]);
    assert_eq!(gw.balance_wh("METER001"), 5000);
    let (_, pays) = gw.http("GET", "/api/meters/METER001/payments", None);
    assert_eq!(pays["payments"].as_array().unwrap().len(), 1, "{pays}");
}

#[test]
fn cloud_credits_over_the_per_command_or_daily_cap_are_refused_and_the_day_survives_a_restart() {
    let scratch = tempfile::tempdir().unwrap();
    let (_broker, mut gw, mut cloud) = command_site(
        scratch.path(),
        "max_credit_kes_per_command = 500\nmax_credit_kes_per_day = 800",
    );
    cloud.publish(
        CREDIT,
        &signed(credit_json("big", "METER001", "R-big", 501), "n-big"),
        1,
    );
    let r = cloud.next_on(&result_of("big"));
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("max_credit_kes_per_command"),
        "{r}"
    );
    cloud.publish(
        CREDIT,
        &signed(credit_json("a", "METER001", "R-a", 500), "n-a"),
        2,
    );
    assert_eq!(cloud.next_on(&result_of("a"))["ok"], true);

    // The day's total is in the gateway's store: a restart does not reset it.
    gw.kill();
    gw.start();
    gw.wait_log("mqtt: taking commands on umeme/test-site/command/#");
    cloud.publish(
        CREDIT,
        &signed(credit_json("b", "METER002", "R-b", 400), "n-b"),
        3,
    );
    let r = cloud.next_on(&result_of("b"));
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("max_credit_kes_per_day 800"),
        "{r}"
    );
    assert!(
        r["error"].as_str().unwrap().contains("KES 300 left today"),
        "{r}"
    );
    cloud.publish(
        CREDIT,
        &signed(credit_json("c", "METER002", "R-c", 300), "n-c"),
        4,
    );
    assert_eq!(cloud.next_on(&result_of("c"))["ok"], true);
    assert_eq!(gw.balance_wh("METER002"), 300 * 50);
}

#[test]
fn a_cloud_credit_reusing_a_reference_is_the_same_payment_or_a_conflict_that_reveals_nothing() {
    let scratch = tempfile::tempdir().unwrap();
    let (_broker, gw, mut cloud) = command_site(scratch.path(), "");
    // An M-Pesa receipt already credited at the site by another source (the operator's CLI).
    let out = gw.cli(&["credit", "METER001", "--kes", "100", "--ref", "RKTQDM7W6S"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let balance_1 = gw.balance_wh("METER001");

    // The same receipt with a trailing space and lower case, same meter and amount: once.
    cloud.publish(
        CREDIT,
        &signed(
            credit_json("same", "METER001", "rktqdm7w6s ", 100),
            "n-same",
        ),
        1,
    );
    let same = cloud.next_on(&result_of("same"));
    assert_eq!(same["duplicate"], true, "{same}");
    assert_eq!(gw.balance_wh("METER001"), balance_1);

    // For another meter: an error that says nothing of METER001's payment.
    cloud.publish(
        CREDIT,
        &signed(
            credit_json("other", "METER002", "RKTQDM7W6S", 100),
            "n-other",
        ),
        2,
    );
    let other = cloud.next_on(&result_of("other"));
    assert_eq!(other["ok"], false, "{other}");
    assert_eq!(other["retryable"], false, "{other}");
    assert!(
        other["error"]
            .as_str()
            .unwrap()
            .contains("reference_conflict"),
        "{other}"
    );
    let text = other.to_string();
    assert!(
        !text.contains("METER001") && !text.contains(&balance_1.to_string()),
        "{text}"
    );
    assert_eq!(gw.balance_wh("METER002"), 0);
    gw.wait_log("its reference was already used for another meter or amount");
}

#[test]
fn a_command_with_a_seventy_thousand_character_id_is_refused_and_the_uplink_stays_connected() {
    let scratch = tempfile::tempdir().unwrap();
    // Unsigned commands allowed, so the id reaches the plugin in the form it always took.
    let (_broker, gw, mut cloud) = command_site(scratch.path(), "allow_unsigned_commands = true");
    gw.assert_log("allow_unsigned_commands = true: anyone who may publish");
    let huge = credit_json(&"x".repeat(70_000), "METER001", "R-huge", 100);
    cloud.publish(CREDIT, &huge.to_string(), 1);
    let r = cloud.next_on(&result_of("invalid"));
    assert_eq!(r["id"], serde_json::Value::Null, "{r}");
    assert!(r["error"].as_str().unwrap().contains("at most 8192"), "{r}");

    // The same link carries the next command; it never reconnected.
    let next = credit_json("next", "METER001", "R-next", 100).to_string();
    cloud.publish(CREDIT, &next, 2);
    assert_eq!(cloud.next_on(&result_of("next"))["ok"], true);
    assert_eq!(gw.log_text().matches("mqtt: connected to").count(), 1);
    assert!(!gw.log_text().contains("connection lost"));
    assert_eq!(gw.balance_wh("METER001"), 5000);
}
