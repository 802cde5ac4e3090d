//! `umeme-source-daraja`: M-Pesa payments (Safaricom Daraja) become meter credits.
//!
//! - [`config`]: the `[source.config]` table, secrets read from files, callback URLs checked.
//! - [`wire`]: Daraja's formats as values (amounts, phones, timestamps, callback bodies).
//! - [`client`]: the Daraja API (OAuth token, C2B URL registration, STK push and query).
//! - [`listener`]: the plugin's own HTTP listener: C2B validation and confirmation, the STK
//!   callback, and `/stkpush` for the site.
//! - [`unapplied`]: payments that credit no meter, handed to the gateway for the operator.
//! - [`stk`]: pushes kept in the durable key-value store, and the poller that settles those
//!   whose callback never came.
//!
//! Architecture invariants: nothing contacts Safaricom during `create`/`start` (the token is
//! fetched when first needed, URL registration runs on the poller thread); the listener runs
//! on the plugin's own tokio runtime and calls the host only from blocking threads; a payment
//! is acknowledged to Daraja only after `submit_payment` returned (committed). The gateway
//! stays the only writer of the ledger, which credits a (source, reference) once.

pub mod client;
pub mod config;
pub mod listener;
pub mod stk;
pub mod unapplied;
pub mod wire;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use umeme_plugin_sdk::{export_source, Health, Host, PaymentSource};

use crate::client::Daraja;
use crate::config::{Config, Settings};

/// Counters shown by `health`.
#[derive(Default)]
pub struct Stats {
    pub credited: AtomicU64,
    pub duplicates: AtomicU64,
    pub unapplied: AtomicU64,
    /// Unapplied payments the gateway could not keep (its store full or busy).
    pub not_kept: AtomicU64,
    pub rejected_requests: AtomicU64,
    /// Connections closed at once by a connection cap of the listener.
    pub refused_connections: AtomicU64,
    /// Connections closed, or requests answered 408, by a listener timeout.
    pub http_timeouts: AtomicU64,
    pub stk_started: AtomicU64,
    pub stk_failed: AtomicU64,
    pub registered: AtomicBool,
}

/// What the listener's handlers and the poller share.
pub struct Shared {
    pub settings: Settings,
    pub host: Host,
    pub daraja: Daraja,
    pub stats: Stats,
    /// Serialises changes to stored pushes (callbacks and the poller).
    pub settle: Mutex<()>,
}

struct Running {
    runtime: tokio::runtime::Runtime,
    shutdown: tokio::sync::oneshot::Sender<()>,
    stop_poller: mpsc::Sender<()>,
    poller: JoinHandle<()>,
    local: std::net::SocketAddr,
}

pub struct DarajaSource {
    shared: Arc<Shared>,
    running: Option<Running>,
}

impl PaymentSource for DarajaSource {
    const NAME: &'static std::ffi::CStr = c"daraja";
    type Config = Config;

    fn create(config: Config, host: Host) -> Result<Self, String> {
        let settings = Settings::from_config(config)?;
        let daraja = Daraja::new(&settings);
        Ok(DarajaSource {
            shared: Arc::new(Shared {
                settings,
                host,
                daraja,
                stats: Stats::default(),
                settle: Mutex::new(()),
            }),
            running: None,
        })
    }

    fn start(&mut self) -> Result<(), String> {
        if self.running.is_some() {
            return Err("already started".into());
        }
        let listen = self.shared.settings.listen;
        // Bind here so a busy port fails `start` with a clear error.
        let std_listener =
            std::net::TcpListener::bind(listen).map_err(|e| format!("listen {listen}: {e}"))?;
        std_listener
            .set_nonblocking(true)
            .map_err(|e| format!("listen {listen}: {e}"))?;
        let local = std_listener.local_addr().map_err(|e| e.to_string())?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(32)
            .thread_name("daraja-http")
            .enable_all()
            .build()
            .map_err(|e| format!("plugin runtime: {e}"))?;
        let listener = {
            let _enter = runtime.enter();
            tokio::net::TcpListener::from_std(std_listener).map_err(|e| e.to_string())?
        };
        let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
        runtime.spawn(umeme_http_guard::serve(
            listener,
            listener::router(self.shared.clone()),
            self.shared.settings.limits,
            Arc::new(listener::GuardEvents::new(self.shared.clone())),
            async {
                let _ = stopped.await;
            },
        ));
        let (stop_poller, stop_rx) = mpsc::channel();
        let shared = self.shared.clone();
        let poller = std::thread::Builder::new()
            .name("daraja-poller".into())
            .spawn(move || stk::run_poller(&shared, stop_rx))
            .map_err(|e| format!("poller thread: {e}"))?;
        log::info!(
            "Daraja source listening on {local} (shortcode {})",
            self.shared.settings.shortcode
        );
        self.running = Some(Running {
            runtime,
            shutdown,
            stop_poller,
            poller,
            local,
        });
        Ok(())
    }

    fn health(&mut self) -> Health {
        let s = &self.shared.stats;
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Health {
            ok: self.running.is_some(),
            detail: serde_json::json!({
                "credited": n(&s.credited),
                "duplicates": n(&s.duplicates),
                "unapplied": n(&s.unapplied),
                "unapplied_not_kept": n(&s.not_kept),
                "rejected_requests": n(&s.rejected_requests),
                "refused_connections": n(&s.refused_connections),
                "http_timeouts": n(&s.http_timeouts),
                "stk_started": n(&s.stk_started),
                "stk_failed": n(&s.stk_failed),
                "urls_registered": s.registered.load(Ordering::Relaxed),
                "listen": self.running.as_ref().map(|r| r.local.to_string()),
            }),
        }
    }

    fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            let _ = r.shutdown.send(());
            let _ = r.stop_poller.send(());
            let _ = r.poller.join();
            // In-flight requests get a moment to finish their credit and answer.
            r.runtime.shutdown_timeout(Duration::from_secs(5));
            log::info!("Daraja source stopped");
        }
    }
}

impl Drop for DarajaSource {
    fn drop(&mut self) {
        self.stop();
    }
}

export_source!(DarajaSource);
