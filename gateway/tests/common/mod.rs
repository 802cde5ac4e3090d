//! Test harness: the real `umeme-gateway` binary on loopback ports, a raw MQTT 3.1.1 client for
//! exact protocol checks, and a tiny HTTP client. Every wait is bounded.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{Connect, LastWill, Login, Packet, Publish, Subscribe};
use rumqttc::mqttbytes::{self, QoS};

pub const BIN: &str = env!("CARGO_BIN_EXE_umeme-gateway");
pub const WAIT: Duration = Duration::from_secs(15);
/// `[broker]` keys lifting the per-meter report rate, for tests that stream reports flat out
/// to test something else (durability, the outbox); `meter_abuse.rs` tests the limits.
pub const UNLIMITED_REPORTS: &str = "reports_per_minute = 6000000\nreport_burst = 1000000\n";

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Where cargo builds for this test run (`target/debug`): plugins built here sit beside it.
pub fn target_debug() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/debug")
        .to_path_buf()
}

/// Runs `cargo build ARGS` in the workspace, once per test binary for the same arguments.
pub fn cargo_build(args: &[&str]) {
    static DONE: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let key = args.join(" ");
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    if done.contains(&key) {
        return;
    }
    let st = Command::new(env!("CARGO"))
        .current_dir(workspace())
        .arg("build")
        .args(args)
        .status()
        .expect("run cargo build");
    assert!(st.success(), "cargo build {key} failed");
    done.push(key);
}

/// Builds a workspace plugin crate (once) and returns its library in `target/debug`.
pub fn built_plugin(package: &str) -> PathBuf {
    cargo_build(&["-p", package]);
    target_debug().join(format!("lib{}.so", package.replace('-', "_")))
}

/// A plugin folder as the package installs it (0755, files 0644) under `root`, holding `libs`.
pub fn install_plugins(root: &Path, libs: &[PathBuf]) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = root.join("plugins");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    for lib in libs {
        let to = dir.join(lib.file_name().expect("a library file"));
        std::fs::copy(lib, &to).unwrap();
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    dir
}

/// `sha256sum` of a file, as a `sha256 = …` config value wants it.
pub fn sha256_hex(path: &Path) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(std::fs::read(path).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind an ephemeral port")
        .local_addr()
        .expect("local addr")
        .port()
}

/// A gateway process with its own data directory and ports.
pub struct Gateway {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub broker: SocketAddr,
    pub api: SocketAddr,
    child: Option<Child>,
    pub log: mpsc::Receiver<String>,
    log_path: PathBuf,
    /// `RLIMIT_NOFILE` (soft and hard) the daemon starts under, when set.
    pub nofile_limit: Option<u64>,
    /// Extra environment variables for the daemon (e.g. `UMEME_TEST_CLOCK_OFFSET_MS`).
    pub env: Vec<(String, String)>,
}

impl Gateway {
    /// A gateway with `extra` appended to its config (extra sections or keys).
    pub fn new(extra: &str) -> Gateway {
        Self::with_gateway_keys("", extra)
    }

    /// A gateway loading plugins from `plugin_dir`, with `extra` appended to its config.
    pub fn with_plugins(plugin_dir: &Path, extra: &str) -> Gateway {
        Self::with_gateway_keys(
            &format!("plugin_dir = {:?}\n", plugin_dir.display().to_string()),
            extra,
        )
    }

    /// A gateway with `gateway_keys` in its `[gateway]` table and `extra` appended.
    pub fn with_gateway_keys(gateway_keys: &str, extra: &str) -> Gateway {
        let dir = tempfile::tempdir().expect("temp dir");
        let broker: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let api: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let config = dir.path().join("gateway.toml");
        let text = format!(
            "[gateway]\nid = \"test-site\"\ndata_dir = {data:?}\n{gateway_keys}\n[broker]\nlisten = \"{broker}\"\n\n[api]\nlisten = \"{api}\"\nallow_simulate = true\n{extra}\n",
            data = dir.path().join("data").display().to_string(),
        );
        std::fs::write(&config, text).expect("write config");
        let (_, log) = mpsc::channel();
        let log_path = dir.path().join("gateway.log");
        Gateway {
            dir,
            config,
            broker,
            api,
            child: None,
            log,
            log_path,
            nofile_limit: None,
            env: Vec::new(),
        }
    }

    /// Adds `keys` to the `[broker]` table through a `conf.d` file, as an operator would (the
    /// main file already has that table).
    pub fn with_broker_keys(self, keys: &str) -> Gateway {
        let conf_d = self.dir.path().join("conf.d");
        std::fs::create_dir_all(&conf_d).expect("conf.d");
        std::fs::write(conf_d.join("50-broker.toml"), format!("[broker]\n{keys}"))
            .expect("write conf.d file");
        self
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("data").join("gateway.db")
    }

    /// Starts the daemon and waits for its "ready" log line.
    pub fn start(&mut self) -> &mut Self {
        assert!(self.child.is_none(), "already running");
        let mut cmd = Command::new(BIN);
        cmd.args(["run", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info,umeme_gateway=debug")
            .envs(self.env.iter().cloned())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(n) = self.nofile_limit {
            use std::os::unix::process::CommandExt;
            let lim = libc::rlimit {
                rlim_cur: n as libc::rlim_t,
                rlim_max: n as libc::rlim_t,
            };
            // SAFETY: setrlimit is async-signal-safe and touches only the child's limits.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let mut child = cmd.spawn().expect("spawn umeme-gateway");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        let log_path = self.log_path.clone();
        std::thread::spawn(move || {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log_path)
                .ok();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(f) = file.as_mut() {
                    let _ = writeln!(f, "{line}");
                }
                if tx.send(line).is_err() {
                    // Nobody listens any more; keep draining so the child never blocks.
                }
            }
        });
        self.log = rx;
        self.child = Some(child);
        self.wait_log("umeme-gateway ready");
        self
    }

    /// Waits for a log line containing `needle`; panics with the log so far on timeout.
    pub fn wait_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(_) => panic!(
                    "no log line containing {needle:?} within {WAIT:?}; log:\n{}",
                    self.log_text()
                ),
            }
        }
    }

    /// Waits (bounded) until the log holds `needle`: log lines reach the file through a pipe and
    /// a thread, a moment after the gateway wrote them.
    pub fn assert_log(&self, needle: &str) {
        let deadline = Instant::now() + WAIT;
        while !self.log_text().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "no log line containing {needle:?}; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().expect("SIGKILL the gateway");
            c.wait().expect("reap");
        }
    }

    /// The daemon's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Runs a CLI subcommand against this gateway's config.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .output()
            .expect("run umeme-gateway CLI")
    }

    pub fn add_meter(&self, id: &str, secret: &str) {
        let out = self.cli(&["meter", "add", id, "--secret", secret]);
        assert!(
            out.status.success(),
            "meter add {id}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn http(&self, method: &str, path: &str, body: Option<&str>) -> (u16, serde_json::Value) {
        http(self.api, method, path, body, &[])
    }

    /// Reads one meter's row through the API.
    pub fn meter(&self, id: &str) -> serde_json::Value {
        let (status, v) = self.http("GET", &format!("/api/meters/{id}"), None);
        assert_eq!(status, 200, "{v}");
        v
    }

    pub fn balance_wh(&self, id: &str) -> i64 {
        self.meter(id)["balance_wh"].as_i64().expect("balance_wh")
    }

    pub fn metrics(&self) -> String {
        let mut s = TcpStream::connect(self.api).expect("connect api");
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    /// The value of one metric series (`name{labels}` exactly as rendered), 0 when absent.
    pub fn metric(&self, series: &str) -> f64 {
        self.metrics()
            .lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|v| v.strip_prefix(' '))
                    .map(|v| v.trim().parse().unwrap())
            })
            .unwrap_or(0.0)
    }

    pub fn simulate(&self, meter: &str, amount: f64) -> serde_json::Value {
        let body = format!(r#"{{"meter_no":"{meter}","amount":{amount}}}"#);
        let (status, v) = self.http("POST", "/daraja/simulate", Some(&body));
        assert_eq!(status, 200, "{v}");
        v
    }

    pub fn connect(&self, id: &str, secret: &str) -> RawMeter {
        let (m, code) = RawMeter::connect(self.broker, id, id, secret, true, None);
        assert_eq!(code, rumqttc::ConnectReturnCode::Success, "CONNECT {id}");
        m
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A minimal HTTP/1.1 client: one request per connection.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> (u16, serde_json::Value) {
    let mut s = TcpStream::connect(addr).expect("connect api");
    s.set_read_timeout(Some(WAIT)).unwrap();
    let body = body.unwrap_or("");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).expect("send request");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read response");
    let text = String::from_utf8_lossy(&raw);
    let status: u16 = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    let json = serde_json::from_str(body).unwrap_or(serde_json::Value::String(body.to_string()));
    (status, json)
}

/// A raw MQTT 3.1.1 client on a blocking socket, for exact protocol checks.
pub struct RawMeter {
    pub stream: TcpStream,
    buf: BytesMut,
}

impl RawMeter {
    pub fn connect(
        addr: SocketAddr,
        client_id: &str,
        user: &str,
        pass: &str,
        clean: bool,
        will: Option<(&str, &str)>,
    ) -> (RawMeter, rumqttc::ConnectReturnCode) {
        Self::try_connect(addr, client_id, user, pass, clean, will)
            .expect("CONNECT answered with a CONNACK")
    }

    /// `None` when the gateway is unreachable or closes the connection before a CONNACK.
    pub fn try_connect(
        addr: SocketAddr,
        client_id: &str,
        user: &str,
        pass: &str,
        clean: bool,
        will: Option<(&str, &str)>,
    ) -> Option<(RawMeter, rumqttc::ConnectReturnCode)> {
        let stream = TcpStream::connect(addr).ok()?;
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let mut m = RawMeter {
            stream,
            buf: BytesMut::new(),
        };
        let mut c = Connect::new(client_id);
        c.keep_alive = 60;
        c.clean_session = clean;
        c.login = Some(Login::new(user, pass));
        c.last_will = will.map(|(t, p)| LastWill::new(t, p, QoS::AtLeastOnce, false));
        let mut out = BytesMut::new();
        Packet::Connect(c)
            .write(&mut out, usize::MAX)
            .expect("encode");
        m.stream.write_all(&out).ok()?;
        match m.recv_within(WAIT) {
            Some(Packet::ConnAck(a)) => Some((m, a.code)),
            _ => None,
        }
    }

    /// Sends `connect` (exact bytes, any CONNECT) on `stream`. `Some` with the client and the
    /// CONNACK's code, `None` when the gateway closed the connection without a CONNACK.
    pub fn connect_bytes(
        stream: TcpStream,
        connect: &[u8],
    ) -> Option<(RawMeter, rumqttc::ConnectReturnCode)> {
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let mut m = RawMeter {
            stream,
            buf: BytesMut::new(),
        };
        m.stream.write_all(connect).ok()?;
        match m.recv_within(WAIT) {
            Some(Packet::ConnAck(a)) => Some((m, a.code)),
            Some(other) => panic!("expected CONNACK, got {other:?}"),
            None => None,
        }
    }

    pub fn send(&mut self, p: Packet) {
        let mut out = BytesMut::new();
        p.write(&mut out, usize::MAX).expect("encode");
        self.stream.write_all(&out).expect("write packet");
    }

    /// The next packet, or `None` when the gateway closed the connection.
    pub fn recv(&mut self) -> Option<Packet> {
        loop {
            match Packet::read(&mut self.buf, 1 << 20) {
                Ok(p) => return Some(p),
                Err(mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("bad packet from gateway: {e}"),
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
                // A signal (a child process ending) interrupts the read: read again.
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => panic!("read from gateway: {e}"),
            }
        }
    }

    /// Like `recv` but gives up after `wait` with `None` (and leaves the stream usable).
    pub fn recv_within(&mut self, wait: Duration) -> Option<Packet> {
        self.stream.set_read_timeout(Some(wait)).unwrap();
        let r = loop {
            match Packet::read(&mut self.buf, 1 << 20) {
                Ok(p) => break Some(p),
                Err(mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("bad packet from gateway: {e}"),
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => break None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break None,
            }
        };
        self.stream.set_read_timeout(Some(WAIT)).unwrap();
        r
    }

    pub fn publish(&mut self, topic: &str, payload: &str, qos: QoS, pkid: u16) {
        self.publish_with(topic, payload.as_bytes(), qos, pkid, false);
    }

    pub fn publish_with(&mut self, topic: &str, payload: &[u8], qos: QoS, pkid: u16, retain: bool) {
        let mut p = Publish::new(topic, qos, payload.to_vec());
        p.pkid = pkid;
        p.retain = retain;
        self.send(Packet::Publish(p));
    }

    /// Publishes QoS 1 and waits for its PUBACK; other packets (commands) are returned.
    pub fn publish_acked(&mut self, topic: &str, payload: &str, pkid: u16) -> Vec<Packet> {
        self.publish(topic, payload, QoS::AtLeastOnce, pkid);
        let mut others = Vec::new();
        loop {
            match self.recv() {
                Some(Packet::PubAck(a)) if a.pkid == pkid => return others,
                Some(p) => others.push(p),
                None => panic!("connection closed before PUBACK {pkid}"),
            }
        }
    }

    /// Publishes an informational QoS 1 `…/balance` report and waits for its PUBACK. The
    /// gateway applies one connection's publishes in order and PUBACKs after the commit, so
    /// everything published before on this connection is committed when this returns.
    pub fn barrier(&mut self, meter: &str, pkid: u16) -> Vec<Packet> {
        let body = format!(r#"{{"meterNo":"{meter}","balance":0,"timestamp":1}}"#);
        self.publish_acked(&format!("smartmeter/{meter}/balance"), &body, pkid)
    }

    pub fn subscribe(&mut self, filter: &str, pkid: u16) -> Vec<rumqttc::SubscribeReasonCode> {
        let mut s = Subscribe::new(filter, QoS::AtLeastOnce);
        s.pkid = pkid;
        self.send(Packet::Subscribe(s));
        loop {
            match self.recv() {
                Some(Packet::SubAck(a)) => return a.return_codes,
                Some(_) => {}
                None => panic!("connection closed before SUBACK"),
            }
        }
    }

    /// Waits for the next publish on `topic`, acknowledging QoS 1 ones.
    pub fn next_publish(&mut self, topic: &str) -> Publish {
        loop {
            match self.recv() {
                Some(Packet::Publish(p)) => {
                    if p.qos == QoS::AtLeastOnce {
                        self.send(Packet::PubAck(rumqttc::PubAck::new(p.pkid)));
                    }
                    if p.topic == topic {
                        return p;
                    }
                }
                Some(_) => {}
                None => panic!("connection closed while waiting for {topic}"),
            }
        }
    }

    pub fn disconnect(mut self) {
        self.send(Packet::Disconnect);
    }
}

pub fn v1_payload(meter: &str, total: f64, remaining: f64) -> String {
    format!(
        r#"{{"meterNo":"{meter}","unitsConsumed":{total},"remainingBalance":{remaining},"totalConsumed":{total},"timestamp":123456}}"#
    )
}

pub fn v2_payload(meter: &str, seq: u32, energy_wh: u64) -> String {
    format!(
        r#"{{"v":2,"meterNo":"{meter}","seq":{seq},"energyWh":{energy_wh},"powerW":120.5,"relay":"on"}}"#
    )
}

pub fn balance_json(p: &Publish) -> serde_json::Value {
    serde_json::from_slice(&p.payload).expect("balance command is JSON")
}

/// A TCP connection to `addr` from the loopback address `source` (127.0.0.2, …), to play a
/// second host on the LAN.
pub fn connect_from(source: [u8; 4], addr: SocketAddr) -> std::io::Result<TcpStream> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    let stream = rt.block_on(async {
        let s = tokio::net::TcpSocket::new_v4()?;
        s.bind(SocketAddr::from((source, 0)))?;
        s.connect(addr).await?.into_std()
    })?;
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// The CONNECT the Arduino PubSubClient library (2.8) sends for `connect(id)` and
/// `connect(id, user, pass)`: MQTT 3.1.1, clean session, keep-alive 60 (the firmwares'
/// `setKeepAlive(60)`), no Will; the username and password flags are set whenever the
/// arguments are given, even as empty strings.
pub fn pubsubclient_connect(client_id: &str, login: Option<(&str, &str)>) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4];
    body.push(0x02 | if login.is_some() { 0xc0 } else { 0 });
    body.extend([0, 60]);
    let mut string = |s: &str| {
        body.extend((s.len() as u16).to_be_bytes());
        body.extend(s.as_bytes());
    };
    string(client_id);
    if let Some((user, pass)) = login {
        string(user);
        string(pass);
    }
    let mut packet = vec![0x10];
    let mut len = body.len();
    loop {
        let byte = (len % 128) as u8;
        len /= 128;
        packet.push(if len > 0 { byte | 0x80 } else { byte });
        if len == 0 {
            break;
        }
    }
    packet.extend(body);
    packet
}

/// Fails clearly when a Debian tool the test needs is not installed.
pub fn require_tool(name: &str) -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!(
        "{name} is not installed; run scripts/test-all (it installs mosquitto, mosquitto-clients and the rest)"
    );
}

/// Polls `f` until it returns `Some`, for state that changes asynchronously (bounded).
pub fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}
