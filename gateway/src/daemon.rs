//! `umeme-gateway run`: opens the store, starts the ledger writer, the meter broker and the
//! admin API, and stops on SIGTERM or Ctrl-C.
//!
//! Start-up order matters: the configuration and secret files are checked before the database
//! is touched, and the database is open before anything listens.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::api::{self, ApiState};
use crate::auth::Verifier;
use crate::broker::{self, Broker};
use crate::config::SinkImplementation;
use crate::config::{Config, ConfigError, ConfigSource};
use crate::fds::{self, FdBudget};
use crate::hub::{Hub, Outgoing};
use crate::jsonl::JsonlSink;
use crate::ledger::Rules;
use crate::metrics::Metrics;
use crate::ota::{OtaOp, OtaServer};
use crate::outbox::{self, Bell, SinkRunner};
use crate::plugin::{self, HostServices, Kind, PluginSink, SourceSupervisor};
use crate::store::{self, Reader, StoreError};
use crate::writer::{LedgerSettings, Notice, Writer, WriterOptions};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("state database {path}: {source}")]
    Store { path: String, source: StoreError },
    // `error` is not a `source`: the message already carries it, and the CLI prints the chain.
    #[error("cannot listen on {addr} ({what}): {error}{}", listen_hint(.what, .addr, .error))]
    Listen {
        what: &'static str,
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("[broker] tls_listen: {0}; `umeme-gateway tls init` makes the site CA and the server certificate")]
    Tls(#[from] crate::tls::TlsError),
}

/// What to do about a port that is taken: on a developer's machine the usual culprit is
/// Debian's mosquitto service (scripts/test-all installs the package) holding 1883.
fn listen_hint(what: &str, addr: &SocketAddr, e: &std::io::Error) -> String {
    if e.kind() != std::io::ErrorKind::AddrInUse {
        return String::new();
    }
    let port = addr.port();
    let (who, section) = match what {
        "broker.listen" => ("another MQTT broker (mosquitto?)", "[broker] listen"),
        "broker.tls_listen" => ("another MQTT broker (mosquitto?)", "[broker] tls_listen"),
        _ => ("another program", "[api] listen"),
    };
    let stop = if what.starts_with("broker.") {
        " (`sudo systemctl disable --now mosquitto`)"
    } else {
        ""
    };
    format!(
        ". Port {port} is taken: {who} is listening: stop it{stop} or set {section}; \
         `ss -ltnp 'sport = :{port}'` shows which program holds it"
    )
}

/// A running gateway: its listening addresses and a way to stop it.
pub struct Gateway {
    /// The plain meter port, unless `[broker] listen = "off"`.
    pub broker_addr: Option<SocketAddr>,
    /// The TLS meter port, when `[broker] tls_listen` is set.
    pub tls_addr: Option<SocketAddr>,
    pub api_addr: SocketAddr,
    /// The original firmware's lookups, when `[api] legacy_listen` is set.
    pub legacy_addr: Option<SocketAddr>,
    pub metrics: Arc<Metrics>,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    runners: Vec<SinkRunner>,
    sources: Vec<SourceSupervisor>,
    writer: Writer,
}

impl Gateway {
    /// Starts every part of the daemon on the current tokio runtime.
    pub async fn start(mut config: Config) -> Result<Gateway, StartError> {
        config.check_files()?;
        let token = config.api_token()?;
        let budget = FdBudget::plan(fds::raise_nofile_limit(), &config)?;
        if budget.clamped() {
            warn!("{budget}");
        } else {
            info!("{budget}");
        }
        config.broker.max_connections = budget.meters;
        if config.source == ConfigSource::BuiltInDefaults {
            info!(
                data_dir = %config.gateway.data_dir.display(),
                broker = ?config.broker.listen,
                api = %config.api.listen,
                "no configuration file found: running on built-in development defaults (POST /daraja/simulate enabled)"
            );
        }
        let db_path = config.db_path();
        let store_err = |source| StartError::Store {
            path: db_path.display().to_string(),
            source,
        };
        let conn = store::open(&db_path, config.gateway.id.as_str()).map_err(store_err)?;
        for m in store::meters(&conn).unwrap_or_default() {
            if let Some(t) = m.tariff.filter(|t| !config.ledger.tariff.knows(t)) {
                warn!(meter = %m.id, tariff = %crate::untrusted::Untrusted(&t),
                    default = config.ledger.tariff.default_name(),
                    "the meter's tariff is not configured: the default tariff prices it");
            }
        }
        let reader = Reader::open(&db_path).map_err(store_err)?;

        let metrics = Arc::new(Metrics::default());
        let hub = Arc::new(Hub::default());
        let notify_hub = hub.clone();
        let notify: crate::writer::Notify = Arc::new(move |meter, notice| match notice {
            Notice::Balance(cmd) => {
                let payload = Bytes::from(serde_json::to_vec(&cmd).unwrap_or_default());
                notify_hub.send(
                    meter,
                    Outgoing::Command {
                        leaf: "balance",
                        payload,
                    },
                );
            }
            Notice::Revoked => {
                notify_hub.send(meter, Outgoing::TakenOver);
            }
            Notice::Config(cmd) => {
                let payload = Bytes::from(serde_json::to_vec(&cmd).unwrap_or_default());
                notify_hub.send(
                    meter,
                    Outgoing::Command {
                        leaf: "config",
                        payload,
                    },
                );
            }
        });
        let settings = LedgerSettings {
            rules: Rules {
                low_balance_wh: config.ledger.low_balance_wh,
            },
            tariff: config.ledger.tariff.clone(),
        };
        let options = WriterOptions {
            sinks: config.sinks.iter().map(|s| s.name.clone()).collect(),
            max_bytes: config.outbox.max_bytes,
            retention: config.outbox.retention,
            commit_delay: config.ledger.commit_delay,
            alerts: config.alerts.clone(),
        };
        let bell = Arc::new(Bell::default());
        let (writer, _writer_thread) = Writer::start(
            conn,
            settings.clone(),
            options,
            notify,
            bell.clone(),
            metrics.clone(),
        );
        let mut runners = Vec::new();
        for sink in &config.sinks {
            let at = |message: String| {
                StartError::Config(ConfigError {
                    file: Some(sink.declared_at.0.clone()),
                    position: Some((sink.declared_at.1, sink.declared_at.2)),
                    message,
                })
            };
            let instance: Box<dyn outbox::Sink> = match &sink.implementation {
                SinkImplementation::Builtin(_) => {
                    Box::new(JsonlSink::from_config(&sink.config).map_err(at)?)
                }
                SinkImplementation::Plugin { file, sha256 } => {
                    let lib = plugin::load(
                        &config.gateway.plugin_dir,
                        file,
                        sha256.as_deref(),
                        Kind::Sink,
                    )
                    .map_err(|e| {
                        let at =
                            plugin::error_location(&e, &sink.declared_at, sink.sha256_at.as_ref());
                        StartError::Config(ConfigError::at(at, e.to_string()))
                    })?;
                    let services = HostServices::new(
                        sink.name.clone(),
                        Kind::Sink,
                        writer.clone(),
                        db_path.clone(),
                        hub.clone(),
                        config.ledger.tariff.clone(),
                    );
                    Box::new(PluginSink::new(lib, &sink.config, services, sink.timeout))
                }
            };
            let runner = SinkRunner::start(
                sink.clone(),
                instance,
                &db_path,
                config.gateway.id.to_string(),
                writer.clone(),
                bell.clone(),
                metrics.clone(),
            )
            .map_err(store_err)?;
            runners.push(runner);
        }
        let mut sources = Vec::new();
        for src in &config.sources {
            let lib = plugin::load(
                &config.gateway.plugin_dir,
                &src.plugin,
                src.sha256.as_deref(),
                Kind::Source,
            )
            .map_err(|e| {
                let at = plugin::error_location(&e, &src.declared_at, src.sha256_at.as_ref());
                StartError::Config(ConfigError::at(at, e.to_string()))
            })?;
            let services = HostServices::new(
                src.name.clone(),
                Kind::Source,
                writer.clone(),
                db_path.clone(),
                hub.clone(),
                config.ledger.tariff.clone(),
            );
            sources.push(SourceSupervisor::spawn(
                lib,
                src.config.clone(),
                services,
                metrics.clone(),
            ));
        }

        let bind = |what, addr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|error| StartError::Listen { what, addr, error })
        };
        // The certificate is checked before anything listens, so a bad file stops the start.
        let tls = match config.broker.tls_listen {
            Some(_) => {
                let b = &config.broker;
                let (cert, server) = crate::tls::server_config(&b.tls_cert_file, &b.tls_key_file)?;
                if cert.expired(crate::tls::now_unix()) {
                    // Served anyway: meters without a clock do not check it, and the ledger
                    // must not stop for it; clients that check refuse it.
                    warn!(cert = %b.tls_cert_file.display(), not_after = %cert.not_after_text, "the meter port's TLS certificate has expired: renew it with `umeme-gateway tls init --force`");
                }
                info!(cert = %b.tls_cert_file.display(), names = ?cert.names, not_after = %cert.not_after_text, "TLS on the meter port");
                Some(tokio_rustls::TlsAcceptor::from(server))
            }
            None => None,
        };
        let broker_listener = match config.broker.listen {
            Some(addr) => Some(bind("broker.listen", addr).await?),
            None => None,
        };
        let tls_listener = match config.broker.tls_listen {
            Some(addr) => Some(bind("broker.tls_listen", addr).await?),
            None => None,
        };
        let api_listener = bind("api.listen", config.api.listen).await?;
        let legacy_listener = match config.api.legacy_listen {
            Some(addr) => Some(bind("api.legacy_listen", addr).await?),
            None => None,
        };
        let broker_addr = broker_listener
            .as_ref()
            .map(|l| l.local_addr().expect("bound socket"));
        let tls_addr = tls_listener
            .as_ref()
            .map(|l| l.local_addr().expect("bound socket"));
        let api_addr = api_listener.local_addr().expect("bound socket");
        let legacy_addr = legacy_listener
            .as_ref()
            .map(|l| l.local_addr().expect("bound socket"));

        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = move || {
            let mut rx = stop_rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        };
        let broker_ready = Arc::new(AtomicBool::new(false));
        // Said at every start: these meters trust the LAN (README, "Original firmware").
        for (id, source) in reader
            .run(store::legacy_anonymous_meters)
            .await
            .unwrap_or_default()
        {
            warn!(meter = %id, source = source.as_deref().unwrap_or("any"), "meter accepts the original firmware's anonymous CONNECT: anyone on the LAN can report as it");
        }
        let ota_server = Arc::new(OtaServer::new(config.ota.clone(), &config.gateway.data_dir));
        let broker = Arc::new(Broker {
            admission: broker::Admission::new(
                config.broker.max_unauthenticated_per_ip,
                Duration::from_millis(config.broker.auth_backoff_max_ms),
            )
            .with_tls_handshakes_per_ip(config.broker.max_tls_handshakes_per_ip),
            slots: Arc::new(tokio::sync::Semaphore::new(config.broker.max_connections)),
            config: config.broker.clone(),
            hub: hub.clone(),
            writer: writer.clone(),
            verifier: Arc::new(Verifier::new(reader.clone())),
            reader: reader.clone(),
            metrics: metrics.clone(),
            guards: Default::default(),
            ledger: settings.clone(),
            ota: ota_server.clone(),
        });
        let mut tasks = Vec::new();
        if let Some(listener) = broker_listener {
            let door = broker::Door::Plain;
            tasks.push(tokio::spawn(broker::serve(
                listener,
                door,
                broker.clone(),
                stopped(),
            )));
        }
        if let (Some(listener), Some(acceptor)) = (tls_listener, tls) {
            let door = broker::Door::Tls(acceptor);
            tasks.push(tokio::spawn(broker::serve(
                listener,
                door,
                broker.clone(),
                stopped(),
            )));
        }
        broker_ready.store(true, Ordering::Release);
        tasks.push(tokio::spawn(announce_rollouts(
            ota_server.clone(),
            reader.clone(),
            hub.clone(),
            writer.clone(),
            stopped(),
        )));

        let api_state = Arc::new(ApiState {
            config: config.api.clone(),
            sinks: config
                .sinks
                .iter()
                .map(|s| (s.name.clone(), s.events.clone()))
                .collect(),
            max_bytes: config.outbox.max_bytes,
            gateway_id: config.gateway.id.to_string(),
            token,
            writer: writer.clone(),
            reader,
            hub,
            metrics: metrics.clone(),
            broker_ready,
            zone: config.alerts.zone,
            ota: ota_server,
            ota_config: config.ota.clone(),
            data_dir: config.gateway.data_dir.clone(),
            dashboard: crate::dashboard::Dashboard::new(
                crate::dashboard::DashboardSettings {
                    secure_cookies: config.api.dashboard_secure_cookies,
                    low_balance_wh: config.ledger.low_balance_wh,
                    data_dir: config.gateway.data_dir.clone(),
                    zone: config.ledger.tariff.zone,
                    export_reader: Reader::open(&db_path).map_err(store_err)?,
                },
                bell.clone(),
            ),
            pricing: Arc::new(config.ledger.tariff.clone()),
        });
        let dashboard = api_state.dashboard.clone();
        let done = stopped();
        tasks.push(tokio::spawn(async move {
            done.await;
            dashboard.shutdown();
        }));
        tasks.push(tokio::spawn(umeme_http_guard::serve(
            api_listener,
            api::router(api_state.clone()),
            config.api.limits,
            api::HttpEvents::new("admin", metrics.clone()),
            stopped(),
        )));
        if let Some(listener) = legacy_listener {
            tasks.push(tokio::spawn(umeme_http_guard::serve(
                listener,
                api::legacy_router(api_state),
                config.api.legacy_limits,
                api::HttpEvents::new("legacy", metrics.clone()),
                stopped(),
            )));
        }
        // Standing charges fall due at local midnights whether or not a meter reports: the
        // ledger charges them at start and then every STANDING_EVERY.
        let charger = writer.clone();
        let done = stopped();
        tasks.push(tokio::spawn(async move {
            let mut every = tokio::time::interval(STANDING_EVERY);
            tokio::pin!(done);
            loop {
                tokio::select! {
                    _ = every.tick() => {
                        let op = crate::writer::Op::AccrueStanding { at: ledger_clock_ms() };
                        if let Err(e) = charger.submit(op).await {
                            warn!(error = %e, "standing charges could not be applied; retried at the next run");
                        }
                    }
                    _ = &mut done => return,
                }
            }
        }));
        // Friendly hours and holidays begin and end at local hour edges (and standing charges
        // fall due at local midnight): at each edge of the ledger clock, connected meters whose
        // `mayCut` changed, or that were charged, get a fresh balance. Checked every second, so
        // a jump of the debug clock counts as an edge too.
        let edges = writer.clone();
        let zone_ms = i64::from(config.ledger.tariff.zone.offset_minutes()) * 60_000;
        let done = stopped();
        tasks.push(tokio::spawn(async move {
            let hour = |t: i64| (t + zone_ms).div_euclid(3_600_000);
            let mut last = ledger_clock_ms();
            let mut every = tokio::time::interval(Duration::from_secs(1));
            tokio::pin!(done);
            loop {
                tokio::select! {
                    _ = every.tick() => {
                        let now = ledger_clock_ms();
                        if hour(now) == hour(last) {
                            continue;
                        }
                        let from = std::mem::replace(&mut last, now);
                        let ops = [
                            crate::writer::Op::FriendlyEdge { from, at: now },
                            crate::writer::Op::AccrueStanding { at: now },
                        ];
                        for op in ops {
                            if let Err(e) = edges.submit(op).await {
                                warn!(error = %e, "an hour edge's balances could not be sent; meters get them with their next balance change");
                            }
                        }
                    }
                    _ = &mut done => return,
                }
            }
        }));
        let ticker = writer.clone();
        let done = stopped();
        tasks.push(tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            tokio::pin!(done);
            loop {
                tokio::select! {
                    _ = every.tick() => ticker.tick(),
                    _ = &mut done => return,
                }
            }
        }));
        info!(broker = ?broker_addr, tls = ?tls_addr, api = %api_addr, legacy = ?legacy_addr, gateway = %config.gateway.id, "umeme-gateway ready");
        Ok(Gateway {
            broker_addr,
            tls_addr,
            api_addr,
            legacy_addr,
            metrics,
            stop,
            tasks,
            runners,
            sources,
            writer,
        })
    }

    /// Stops accepting connections and waits for the listeners to close.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        for r in self.runners {
            let _ = tokio::task::spawn_blocking(move || r.stop()).await;
        }
        for s in self.sources {
            let _ = tokio::task::spawn_blocking(move || s.stop()).await;
        }
        // Leave the meters' rows up to date (a restart would fold anyway; this keeps the file
        // complete for anyone reading it while the daemon is down).
        let fold = tokio::time::timeout(std::time::Duration::from_secs(10), self.writer.fold());
        if !matches!(fold.await, Ok(Ok(()))) {
            tracing::warn!(
                "the final fold of recent reports did not finish; the next start does it"
            );
        }
    }
}

/// Runs until SIGTERM or Ctrl-C.
pub async fn run(config: Config) -> Result<(), StartError> {
    let gateway = Gateway::start(config).await?;
    systemd_notify("READY=1");
    let watchdog = tokio::spawn(systemd_watchdog());
    shutdown_signal().await;
    info!("shutting down");
    systemd_notify("STOPPING=1");
    watchdog.abort();
    gateway.stop().await;
    Ok(())
}

/// Sends `state` to systemd's notify socket (`Type=notify`, sd_notify(3)); does nothing when
/// not started by systemd.
fn systemd_notify(state: &str) {
    use std::os::unix::net::UnixDatagram;
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = UnixDatagram::unbound().and_then(|socket| {
        match path.as_encoded_bytes().strip_prefix(b"@") {
            #[cfg(target_os = "linux")]
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                socket.send_to_addr(state.as_bytes(), &addr)
            }
            _ => socket.send_to(state.as_bytes(), &path),
        }
    });
    if let Err(e) = sent {
        warn!(error = %e, state, "cannot notify systemd");
    }
}

/// How often the daemon charges standing charges that have fallen due (they are also charged
/// with every report and payment of a meter).
const STANDING_EVERY: Duration = Duration::from_secs(600);

/// The time standing charges are charged at: now, shifted in debug builds by
/// `UMEME_TEST_CLOCK_OFFSET_MS` so a test can let days pass (release builds never read it).
fn ledger_clock_ms() -> i64 {
    let offset = if cfg!(debug_assertions) {
        std::env::var("UMEME_TEST_CLOCK_OFFSET_MS")
            .ok()
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(0)
    } else {
        0
    };
    crate::store::now_ms().saturating_add(offset)
}

/// Pings systemd's watchdog (`WatchdogSec=`) at half its interval while the runtime runs.
/// Follows the database's rollouts (once a second, or at once when the API started one) and
/// sends a new rollout's offer to each of its connected meters; meters that connect later get
/// it when they subscribe (`broker.rs`).
async fn announce_rollouts(
    ota: Arc<OtaServer>,
    reader: Reader,
    hub: Arc<Hub>,
    writer: Writer,
    done: impl std::future::Future<Output = ()>,
) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    tokio::pin!(done);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = ota.wake.notified() => {}
            _ = &mut done => return,
        }
        let server = ota.clone();
        let announce = match reader.run(move |c| server.refresh(c)).await {
            Ok(a) => a,
            Err(e) => {
                warn!(error = %e, "could not read the firmware rollout");
                continue;
            }
        };
        if !announce.is_empty() {
            info!(
                meters = announce.len(),
                "firmware rollout: announcing to connected meters"
            );
        }
        for (meter, payload, rollout) in announce {
            let sent = hub.send(
                &meter,
                Outgoing::Command {
                    leaf: "ota",
                    payload,
                },
            );
            if sent {
                let op = crate::writer::Op::Ota(OtaOp::Offered {
                    meter,
                    rollout,
                    at: store::now_ms(),
                });
                let _ = writer.enqueue(op).await;
            }
        }
    }
}

async fn systemd_watchdog() {
    let Some(usec) = std::env::var("WATCHDOG_USEC")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|usec| *usec >= 2)
    else {
        return;
    };
    let mut every = tokio::time::interval(Duration::from_micros(usec / 2));
    loop {
        every.tick().await;
        systemd_notify("WATCHDOG=1");
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
