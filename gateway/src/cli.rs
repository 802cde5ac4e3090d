//! The command line (contract §2). Exit codes: 0 ok, 1 runtime failure, 2 bad usage or config.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, Context};
use clap::{Parser, Subcommand};

use crate::auth;
use crate::config::{Config, ConfigError, ConfigSource};
use crate::ledger::Rules;
use crate::meter::{kes_to_cents, wh_to_units, MeterId};
use crate::store::{self, now_ms};
use crate::writer::{self, Credit, LedgerError, LedgerSettings, Op, Outcome};

#[derive(Parser, Debug)]
#[command(
    name = "umeme-gateway",
    version,
    about = "Site gateway for prepaid electricity meters"
)]
pub struct Cli {
    /// Configuration file (default /etc/umeme-gateway/gateway.toml; built-in development
    /// defaults when it does not exist). conf.d/*.toml beside it is merged in name order.
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Data directory (the ledger database), instead of `[gateway] data_dir`. On development
    /// defaults it is otherwise `umeme-data` at the root of the source checkout.
    #[arg(long, global = true, value_name = "PATH")]
    pub data_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon: meter broker, ledger and admin API.
    Run,
    /// Validate the configuration and the files it names, without touching state.
    CheckConfig,
    /// Provision and inspect meters.
    #[command(subcommand)]
    Meter(MeterCommand),
    /// Store-and-forward state.
    #[command(subcommand)]
    Outbox(OutboxCommand),
    /// Plugin libraries.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Payments, and M-Pesa payments that credited no meter (unapplied).
    #[command(subcommand)]
    Payment(PaymentCommand),
    /// Manual or cash top-up; crediting the same --ref twice credits once.
    Credit {
        /// Meter number.
        id: String,
        /// Amount in KES (up to two decimals).
        #[arg(long)]
        kes: f64,
        /// Receipt or reference; the idempotency key.
        #[arg(long = "ref")]
        reference: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum PaymentCommand {
    /// Payments a source kept because they credited no meter (unknown or missing account, a
    /// removed meter), with where each was applied.
    List {
        /// Only those not applied yet.
        #[arg(long)]
        unapplied: bool,
    },
    /// Credits a kept payment to a meter, once: under the payment's own source and reference,
    /// so a second apply, or the same payment arriving again, credits nothing.
    Apply {
        /// The payment's reference (the M-Pesa TransID or receipt).
        reference: String,
        /// Meter number to credit.
        meter: String,
        /// The source that kept it, when several kept the same reference.
        #[arg(long)]
        source: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum PluginCommand {
    /// Check a plugin file as the loader does (symlink, owner, mode, ELF; not its folder), load
    /// it and show its name, kind, ABI, versions, sha256 and glibc need.
    Inspect { path: PathBuf },
}

#[derive(Subcommand, Debug)]
pub enum OutboxCommand {
    /// Backlog, oldest undelivered age, counters and last error per sink.
    Status,
}

#[derive(Subcommand, Debug)]
pub enum MeterCommand {
    /// Provision a meter; prints the generated secret once when --secret is not given.
    Add {
        id: String,
        #[arg(long)]
        secret: Option<String>,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        phone: Option<String>,
        /// Let the meter CONNECT without credentials, as the original Clean firmware does
        /// (client id `ESP32_<meter>_<hex>`). Anyone on the LAN can then act as this meter:
        /// see the README's "Original firmware" section.
        #[arg(long)]
        legacy_anonymous: bool,
        /// Accept the anonymous CONNECT only from this address.
        #[arg(long, value_name = "IP")]
        legacy_source: Option<std::net::IpAddr>,
        /// Price this meter by the `[[tariffs]]` entry of this name (default: the site's
        /// `[ledger] default_tariff`).
        #[arg(long, value_name = "NAME")]
        tariff: Option<String>,
    },
    /// Change a meter's settings.
    Set {
        id: String,
        /// Allow (true) or stop (false) the original firmware's anonymous CONNECT.
        #[arg(long, value_name = "true|false", action = clap::ArgAction::Set)]
        legacy_anonymous: Option<bool>,
        /// Pin the anonymous CONNECT to this source address; `any` removes the pin.
        #[arg(long, value_name = "IP|any")]
        legacy_source: Option<String>,
        /// Put the meter on this tariff from now on (`default`: the site's default tariff).
        /// Reports already applied keep their price.
        #[arg(long, value_name = "NAME|default")]
        tariff: Option<String>,
    },
    /// List meters with their balances.
    List,
    /// Show one meter.
    Show { id: String },
    /// Remove a meter (its payments and events stay for audit); ends its session.
    Remove { id: String },
    /// Grant the tenant's request for emergency credit (as the meter's `command/emergency`).
    Emergency { id: String },
    /// Print a meter's statement for a month: opening, payments, energy by band and period,
    /// charges, taxes, standing charges, debt, closing.
    Statement {
        id: String,
        /// `YYYY-MM` in the site's time zone (default: this month).
        #[arg(long)]
        month: Option<String>,
    },
    /// Replace a meter's secret; prints the new one when --secret is not given.
    SetSecret {
        id: String,
        #[arg(long)]
        secret: Option<String>,
    },
}

/// Logs to stderr. Under systemd (`JOURNAL_STREAM` set) each line starts with its syslog
/// priority (`<3>` error … `<7>` debug) and carries no timestamp of its own, so
/// `journalctl -p warning` filters and times are not printed twice.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        let plain = tracing_subscriber::fmt::format()
            .without_time()
            .with_ansi(false);
        builder.event_format(JournalPriority(plain)).init();
    } else {
        builder.init();
    }
}

/// Prefixes each event with the sd-daemon priority of its level.
struct JournalPriority<F>(F);

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for JournalPriority<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let priority = match *event.metadata().level() {
            tracing::Level::ERROR => 3,
            tracing::Level::WARN => 4,
            tracing::Level::INFO => 6,
            _ => 7,
        };
        write!(writer, "<{priority}>")?;
        self.0.format_event(ctx, writer, event)
    }
}

/// A failure with its exit code.
struct Failure {
    code: u8,
    error: anyhow::Error,
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Failure { code: 1, error }
    }
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Self {
        Failure {
            code: 2,
            error: anyhow!("invalid configuration: {e}"),
        }
    }
}

fn usage(msg: impl Into<String>) -> Failure {
    Failure {
        code: 2,
        error: anyhow!(msg.into()),
    }
}

pub fn run(cli: Cli) -> ExitCode {
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("umeme-gateway: {:#}", f.error);
            ExitCode::from(f.code)
        }
    }
}

fn dispatch(cli: Cli) -> Result<(), Failure> {
    let mut config = Config::load(cli.config.as_deref())?;
    let uses_data = !matches!(cli.command, Command::CheckConfig | Command::Plugin(_));
    if let Some(dir) = cli.data_dir {
        config.gateway.data_dir = dir;
    } else if uses_data && config.source == ConfigSource::BuiltInDefaults {
        config.gateway.data_dir = development_data_dir()?;
    }
    if uses_data && config.source == ConfigSource::BuiltInDefaults {
        // Said on every command: a second, empty ledger must never go unnoticed.
        let dir = std::path::absolute(&config.gateway.data_dir)
            .unwrap_or_else(|_| config.gateway.data_dir.clone());
        eprintln!(
            "umeme-gateway: using data dir {} (development defaults: no configuration file)",
            dir.display()
        );
        config.gateway.data_dir = dir;
    }
    match cli.command {
        Command::Run => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            rt.block_on(crate::daemon::run(config))
                .map_err(|e| match e {
                    crate::daemon::StartError::Config(c) => Failure::from(c),
                    other => Failure::from(anyhow::Error::new(other)),
                })
        }
        Command::CheckConfig => {
            config.check_files()?;
            config.api_token()?;
            check_plugins(&config)?;
            // This shell's limit; the service runs under systemd's LimitNOFILE.
            let budget = crate::fds::FdBudget::plan(crate::fds::raise_nofile_limit(), &config)?;
            println!("ok: {budget} (under this shell's open-file limit)");
            print_broker_limits(&config);
            print_http_limits(&config);
            warn_legacy_meters(&config);
            check_meter_tariffs(&config)?;
            match &config.source {
                ConfigSource::BuiltInDefaults => {
                    println!("ok: no configuration file; the built-in development defaults apply")
                }
                ConfigSource::Files(files) => {
                    for f in files {
                        println!("ok: {}", f.display());
                    }
                }
            }
            let l = config.broker.session;
            println!(
                "meter limits: reports {}/min (burst {}), status {}/min (burst {}), {} subscriptions of up to {} bytes, {} warnings/min",
                l.reports.per_minute,
                l.reports.burst,
                l.status.per_minute,
                l.status.burst,
                l.max_subscriptions,
                l.max_filter_bytes,
                l.warnings_per_minute
            );
            Ok(())
        }
        Command::Meter(m) => meter(&config, m),
        Command::Outbox(OutboxCommand::Status) => outbox_status(&config),
        Command::Payment(p) => payment(&config, p),
        Command::Plugin(PluginCommand::Inspect { path }) => {
            let lib = crate::plugin::inspect(&path).map_err(|e| Failure {
                code: 1,
                error: e.into(),
            })?;
            println!("name:            {}", lib.name);
            println!("kind:            {}", lib.kind);
            println!("abi:             {}", lib.abi);
            println!("plugin version:  {}", lib.plugin_version);
            println!("sdk version:     {}", lib.sdk_version);
            println!("built with:      {}", lib.rustc_version);
            println!("sha256:          {}", lib.sha256);
            println!(
                "glibc required:  {}",
                lib.glibc_required.as_deref().unwrap_or("none found")
            );
            Ok(())
        }
        Command::Credit { id, kes, reference } => {
            let meter = parse_meter(&id)?;
            let cents = kes_to_cents(kes).ok_or_else(|| {
                usage("--kes must be a positive amount with at most two decimals, at most 1000000")
            })?;
            let credit = Credit {
                meter: meter.clone(),
                source: "manual".into(),
                reference: reference.clone(),
                amount_cents: cents,
                at: now_ms(),
                phone: None,
            };
            match apply(&config, Op::Credit(credit))? {
                Outcome::Credited { payment, duplicate } => {
                    let what = if duplicate {
                        "already credited"
                    } else {
                        "credited"
                    };
                    println!(
                        "{what}: {} KES to {} = {:.3} units (ref {}); balance {:.3} units",
                        format_cents(payment.amount_cents),
                        payment.meter,
                        wh_to_units(payment.credit_wh),
                        payment.reference,
                        wh_to_units(payment.balance_after_wh)
                    );
                    Ok(())
                }
                _ => Err(anyhow!("unexpected ledger outcome").into()),
            }
        }
    }
}

/// `umeme-data` at the root of the source checkout around the working directory, so the CLI
/// run from a sub-folder finds the daemon's ledger instead of creating a second, empty one.
/// Outside a checkout there is no obvious place: refuse rather than guess.
fn development_data_dir() -> Result<PathBuf, Failure> {
    let cwd = std::env::current_dir().context("reading the working directory")?;
    for dir in cwd.ancestors() {
        let is_root = dir.join("gateway/Cargo.toml").is_file()
            && std::fs::read_to_string(dir.join("Cargo.toml"))
                .is_ok_and(|t| t.lines().any(|l| l.trim() == "[workspace]"));
        if is_root {
            return Ok(dir.join("umeme-data"));
        }
    }
    Err(usage(format!(
        "no configuration file ({}) and {} is not inside an umeme-gateway source checkout, \
         so the development defaults have no data directory: pass --config PATH or \
         --data-dir PATH, or run from the checkout",
        crate::config::DEFAULT_CONFIG_PATH,
        cwd.display()
    )))
}

/// The HTTP listeners' limits, so an operator sees what is in force.
/// The meter port's limits up to CONNACK (those after it are the "meter limits" line).
fn print_broker_limits(config: &Config) {
    let b = &config.broker;
    println!(
        "ok: meter port on {}: at most {} connections, {} per address before CONNACK, CONNECT within {} ms, packets up to {} bytes, password backoff up to {} ms",
        b.listen,
        b.max_connections,
        b.max_unauthenticated_per_ip,
        b.connect_timeout_ms,
        b.max_packet_bytes,
        b.auth_backoff_max_ms
    );
}

fn print_http_limits(config: &Config) {
    let api = &config.api;
    let show = |what: &str, addr: std::net::SocketAddr, l: &crate::config::HttpLimits| {
        println!(
            "ok: {what} on {addr}: header/idle timeout {:?}, request timeout {:?}, at most {} connections, {} per address",
            l.header_timeout, l.request_timeout, l.max_connections, l.max_connections_per_ip
        )
    };
    show("admin API", api.listen, &api.limits);
    if let Some(addr) = api.legacy_listen {
        show("legacy listener", addr, &api.legacy_limits);
    }
}

/// Loads every configured plugin with all the checks `run` makes (ABI, kind, sha256, file
/// and folder permissions); creates no instance.
fn check_plugins(config: &Config) -> Result<(), Failure> {
    use crate::config::SinkImplementation;
    use crate::plugin::Kind;
    let sinks = config.sinks.iter().filter_map(|s| match &s.implementation {
        SinkImplementation::Plugin { file, sha256 } => {
            Some((file, sha256, Kind::Sink, &s.declared_at, &s.sha256_at))
        }
        SinkImplementation::Builtin(_) => None,
    });
    let sources = config.sources.iter().map(|s| {
        let at = (&s.declared_at, &s.sha256_at);
        (&s.plugin, &s.sha256, Kind::Source, at.0, at.1)
    });
    for (file, sha256, kind, at, sha256_at) in sinks.chain(sources) {
        let lib = crate::plugin::load(&config.gateway.plugin_dir, file, sha256.as_deref(), kind)
            .map_err(|e| {
                let at = crate::plugin::error_location(&e, at, sha256_at.as_ref());
                Failure::from(ConfigError::at(at, e.to_string()))
            })?;
        println!(
            "ok: plugin {} ({} {}, ABI {}) from {}",
            file,
            lib.kind,
            lib.name,
            lib.abi,
            lib.path.display()
        );
    }
    Ok(())
}

fn outbox_status(config: &Config) -> Result<(), Failure> {
    let conn = open(config)?;
    let sinks: Vec<(String, Vec<String>)> = config
        .sinks
        .iter()
        .map(|s| (s.name.clone(), s.events.clone()))
        .collect();
    let o = store::outbox_status(&conn, &sinks, config.outbox.max_bytes, now_ms())
        .context("reading the outbox")?;
    println!(
        "events stored: {} (last seq {}), disk {:.1} of {:.1} MiB, telemetry dropped: {}",
        o.events_stored,
        o.last_seq,
        o.used_bytes as f64 / 1048576.0,
        o.max_bytes as f64 / 1048576.0,
        o.dropped_total
    );
    if o.sinks.is_empty() {
        println!("no sinks configured");
    }
    for s in &o.sinks {
        let age = s.oldest_undelivered_ms.map_or_else(
            || "-".to_string(),
            |ms| format!("{:.0}s", ms as f64 / 1000.0),
        );
        println!(
            "sink {}: cursor {}, backlog {}, oldest undelivered {}, delivered {}, dead letters {}, failures {}",
            s.name, s.delivered_seq, s.backlog, age, s.delivered_total, s.dead_total, s.failures_total
        );
        if let (Some(e), Some(at)) = (&s.last_error, s.last_error_at) {
            println!("  last error at {}: {e}", crate::api::iso8601(at));
        }
    }
    Ok(())
}

fn payment(config: &Config, cmd: PaymentCommand) -> Result<(), Failure> {
    match cmd {
        PaymentCommand::List { unapplied } => {
            let conn = open(config)?;
            let rows = store::unapplied(&conn, unapplied).context("reading unapplied payments")?;
            if rows.is_empty() {
                println!("no unapplied payments");
                return Ok(());
            }
            println!(
                "{:<24} {:<10} {:<24} {:>12} {:<16} {:<16} REASON",
                "RECEIVED", "SOURCE", "REFERENCE", "KES", "ACCOUNT", "APPLIED TO"
            );
            for u in rows {
                // The account and reason are what a payer typed or a plugin said: escaped.
                println!(
                    "{:<24} {:<10} {:<24} {:>12} {:<16} {:<16} {}",
                    crate::api::iso8601(u.received_at),
                    u.source,
                    crate::untrusted::Untrusted(&u.reference).to_string(),
                    format_cents(u.amount_cents),
                    if u.account.is_empty() {
                        "-".to_string()
                    } else {
                        crate::untrusted::Untrusted(&u.account).to_string()
                    },
                    u.applied_meter.as_deref().unwrap_or("-"),
                    crate::untrusted::Untrusted(&u.reason)
                );
            }
            Ok(())
        }
        PaymentCommand::Apply {
            reference,
            meter,
            source,
        } => {
            let meter = parse_meter(&meter)?;
            let op = Op::ApplyUnapplied {
                reference,
                source,
                meter,
                at: now_ms(),
            };
            match apply(config, op)? {
                Outcome::Credited { payment, .. } => {
                    println!(
                        "applied: {} KES to {} = {:.3} units ({}:{}); balance {:.3} units",
                        format_cents(payment.amount_cents),
                        payment.meter,
                        wh_to_units(payment.credit_wh),
                        payment.source,
                        payment.reference,
                        wh_to_units(payment.balance_after_wh)
                    );
                    Ok(())
                }
                _ => Err(anyhow!("unexpected ledger outcome").into()),
            }
        }
    }
}

/// A usage error naming the configured tariffs when `name` is not one of them.
fn known_tariff(config: &Config, name: &str) -> Result<(), Failure> {
    if config.ledger.tariff.knows(name) {
        Ok(())
    } else {
        Err(usage(format!(
            "unknown tariff {name:?}: the configuration has {}",
            config.ledger.tariff.names().join(", ")
        )))
    }
}

fn parse_meter(id: &str) -> Result<MeterId, Failure> {
    MeterId::parse(id).map_err(|e| usage(e.to_string()))
}

/// A provisioned meter's row, or exit 1 with "unknown meter".
fn meter_row(conn: &rusqlite::Connection, meter: &MeterId) -> Result<store::MeterRow, Failure> {
    store::meter(conn, meter)
        .context("reading meter")?
        .ok_or_else(|| Failure {
            code: 1,
            error: anyhow!("unknown meter {meter}"),
        })
}

fn format_cents(c: i64) -> String {
    format!("{}.{:02}", c / 100, c % 100)
}

fn settings(config: &Config) -> LedgerSettings {
    LedgerSettings {
        rules: Rules {
            low_balance_wh: config.ledger.low_balance_wh,
        },
        tariff: config.ledger.tariff.clone(),
    }
}

fn open(config: &Config) -> Result<rusqlite::Connection, Failure> {
    store::open_without_upgrade(&config.db_path(), config.gateway.id.as_str())
        .with_context(|| format!("opening {}", config.db_path().display()))
        .map_err(Failure::from)
}

fn apply(config: &Config, op: Op) -> Result<Outcome, Failure> {
    let mut conn = open(config)?;
    match writer::apply_now(&mut conn, &op, &settings(config)) {
        Ok(a) => Ok(a.outcome),
        Err(
            e @ (LedgerError::UnknownMeter(_)
            | LedgerError::MeterExists(_)
            | LedgerError::BadReference
            | LedgerError::NotUnapplied(_)
            | LedgerError::AmbiguousReference { .. }
            | LedgerError::AlreadyApplied { .. }
            | LedgerError::UnknownTariff { .. }
            | LedgerError::Emergency(_)),
        ) => Err(Failure {
            code: 1,
            error: e.into(),
        }),
        Err(e) => Err(anyhow::Error::new(e).into()),
    }
}

fn secret_or_generated(secret: Option<String>) -> Result<(String, bool), Failure> {
    match secret {
        Some(s) => {
            auth::check_secret(&s).map_err(|e| usage(e.to_string()))?;
            Ok((s, false))
        }
        None => Ok((auth::generate_secret(), true)),
    }
}

/// check-config names the meters that CONNECT without credentials (the daemon does too, at
/// start). A database that is absent or of an older schema has none.
fn warn_legacy_meters(config: &Config) {
    let path = config.db_path();
    if !path.exists() {
        return;
    }
    // Read-only: check-config changes nothing.
    let Ok(conn) = store::open_read_only(&path) else {
        return;
    };
    for (id, source) in store::legacy_anonymous_meters(&conn).unwrap_or_default() {
        eprintln!(
            "warning: meter {id} accepts the original firmware's anonymous CONNECT{}: anyone \
             on the LAN{} can report as it (umeme-gateway meter set {id} --legacy-anonymous false)",
            source
                .as_deref()
                .map(|s| format!(" from {s}"))
                .unwrap_or_default(),
            if source.is_some() {
                " able to use that address"
            } else {
                ""
            },
        );
    }
}

/// check-config refuses a configuration in which a provisioned meter's tariff is missing
/// (removed or renamed in `[[tariffs]]`): the daemon would price it by the default tariff.
fn check_meter_tariffs(config: &Config) -> Result<(), Failure> {
    let path = config.db_path();
    if !path.exists() {
        return Ok(());
    }
    let Ok(conn) = store::open_read_only(&path) else {
        return Ok(());
    };
    // An older schema has no tariffs on meters yet.
    let missing: Vec<String> = store::meters(&conn)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| {
            let t = m.tariff?;
            (!config.ledger.tariff.knows(&t)).then(|| format!("{} ({t:?})", m.id))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(Failure {
        code: 1,
        error: anyhow::anyhow!(
            "meters on a tariff the configuration does not have: {}; configured: {} \
             (add the tariff back, or `umeme-gateway meter set METER --tariff NAME|default`)",
            missing.join(", "),
            config.ledger.tariff.names().join(", ")
        ),
    })
}

/// The risk of a legacy-anonymous meter, said where it is switched on.
fn warn_legacy(meter: &MeterId, source: Option<&str>) {
    eprintln!(
        "warning: {meter} now CONNECTs without credentials; anyone on the LAN{} can report \
         consumption and status as {meter} and read its balance commands",
        source
            .map(|s| format!(" who can use address {s}"))
            .unwrap_or_default()
    );
}

fn meter(config: &Config, cmd: MeterCommand) -> Result<(), Failure> {
    match cmd {
        MeterCommand::Add {
            id,
            secret,
            name,
            phone,
            legacy_anonymous,
            legacy_source,
            tariff,
        } => {
            let meter = parse_meter(&id)?;
            if legacy_source.is_some() && !legacy_anonymous {
                return Err(usage("--legacy-source needs --legacy-anonymous"));
            }
            if let Some(t) = &tariff {
                known_tariff(config, t)?;
            }
            let (secret, generated) = secret_or_generated(secret)?;
            let op = Op::AddMeter {
                meter: meter.clone(),
                name,
                phone,
                secret_hash: auth::hash_secret(&secret),
                at: now_ms(),
            };
            apply(config, op)?;
            println!("added meter {meter}");
            if let Some(t) = tariff {
                apply(
                    config,
                    Op::SetTariff {
                        meter: meter.clone(),
                        tariff: Some(t.clone()),
                        at: now_ms(),
                    },
                )?;
                println!("tariff: {t}");
            }
            let reference_max = 12;
            if meter.as_str().chars().count() > reference_max {
                // M-Pesa's STK AccountReference limit; the Daraja source refuses such pushes.
                eprintln!(
                    "warning: meter number {meter} is longer than {reference_max} characters: M-Pesa STK push cannot pay it (PayBill payments with the full number still work)"
                );
            }
            if legacy_anonymous {
                apply(
                    config,
                    Op::SetLegacy {
                        meter: meter.clone(),
                        anonymous: Some(true),
                        source: Some(legacy_source.map(|ip| ip.to_string())),
                        at: now_ms(),
                    },
                )?;
                warn_legacy(&meter, legacy_source.map(|ip| ip.to_string()).as_deref());
            }
            if generated {
                println!("secret: {secret}");
                println!("(shown once; configure it in the meter as its MQTT password)");
            }
            Ok(())
        }
        MeterCommand::Set {
            id,
            legacy_anonymous,
            legacy_source,
            tariff,
        } => {
            let meter = parse_meter(&id)?;
            if let Some(t) = tariff {
                let name = (t != "default").then_some(t);
                if let Some(n) = &name {
                    known_tariff(config, n)?;
                }
                apply(
                    config,
                    Op::SetTariff {
                        meter: meter.clone(),
                        tariff: name.clone(),
                        at: now_ms(),
                    },
                )?;
                println!(
                    "{meter}: tariff {}",
                    name.unwrap_or_else(|| format!(
                        "{} (the site's default)",
                        config.ledger.tariff.default_name()
                    ))
                );
                if legacy_anonymous.is_none() && legacy_source.is_none() {
                    return Ok(());
                }
            }
            let source = match legacy_source.as_deref() {
                None => None,
                Some("any") => Some(None),
                Some(ip) => Some(Some(
                    ip.parse::<std::net::IpAddr>()
                        .map_err(|_| {
                            usage(format!(
                                "--legacy-source {ip:?}: not an IP address or `any`"
                            ))
                        })?
                        .to_string(),
                )),
            };
            if legacy_anonymous.is_none() && source.is_none() {
                return Err(usage(
                    "nothing to set: give --tariff, --legacy-anonymous or --legacy-source",
                ));
            }
            apply(
                config,
                Op::SetLegacy {
                    meter: meter.clone(),
                    anonymous: legacy_anonymous,
                    source,
                    at: now_ms(),
                },
            )?;
            let conn = open(config)?;
            let m = meter_row(&conn, &meter)?;
            println!(
                "{meter}: legacy anonymous CONNECT {}{}; its current session is closed",
                if m.legacy_anonymous { "allowed" } else { "off" },
                m.legacy_source
                    .as_deref()
                    .map(|s| format!(" (only from {s})"))
                    .unwrap_or_default()
            );
            if m.legacy_anonymous {
                warn_legacy(&meter, m.legacy_source.as_deref());
            }
            Ok(())
        }
        MeterCommand::List => {
            let conn = open(config)?;
            let rows = store::meters(&conn).context("reading meters")?;
            println!(
                "{:<20} {:>12} {:>5} {:<12} {:<24}",
                "METER", "BALANCE", "RELAY", "STATUS", "LAST SEEN"
            );
            for m in rows {
                println!(
                    "{:<20} {:>12.3} {:>5} {:<12} {:<24}",
                    m.id.as_str(),
                    m.balance_units,
                    if m.balance_wh > 0 { "on" } else { "off" },
                    m.status.as_deref().unwrap_or("-"),
                    m.last_seen
                        .map(crate::api::iso8601)
                        .unwrap_or_else(|| "never".into())
                );
            }
            Ok(())
        }
        MeterCommand::Show { id } => {
            let meter = parse_meter(&id)?;
            let conn = open(config)?;
            let m = meter_row(&conn, &meter)?;
            let payments = store::payments_of(&conn, &meter).context("reading payments")?;
            println!("meter:          {}", m.id);
            println!("name:           {}", m.name.as_deref().unwrap_or("-"));
            println!("phone:          {}", m.phone.as_deref().unwrap_or("-"));
            println!(
                "balance:        {:.3} units ({} Wh)",
                m.balance_units, m.balance_wh
            );
            println!(
                "relay:          {}",
                if m.balance_wh > 0 { "on" } else { "off" }
            );
            println!(
                "consumed:       {:.3} units",
                wh_to_units(m.total_consumed_wh)
            );
            println!("ledger seq:     {}", m.ledger_seq);
            println!(
                "tariff:         {}",
                m.tariff.clone().unwrap_or_else(|| format!(
                    "{} (the site's default)",
                    config.ledger.tariff.default_name()
                ))
            );
            if let Some(money) = &m.money {
                println!("balance KES:    {}", format_cents(money.balance_cents));
                println!(
                    "debt KES:       {} (emergency {}, standing {}, arrears {})",
                    format_cents(money.debt.total()),
                    format_cents(money.debt.emergency),
                    format_cents(money.debt.standing),
                    format_cents(money.debt.arrears)
                );
                println!(
                    "emergency:      {}",
                    if money.emergency_armed {
                        "in use"
                    } else {
                        "not in use"
                    }
                );
            }
            println!("status:         {}", m.status.as_deref().unwrap_or("-"));
            println!(
                "legacy anon:    {}",
                match (m.legacy_anonymous, m.legacy_source.as_deref()) {
                    (false, _) => "off".to_string(),
                    (true, None) => "on (from any address)".to_string(),
                    (true, Some(ip)) => format!("on (only from {ip})"),
                }
            );
            println!(
                "last seen:      {}",
                m.last_seen
                    .map(crate::api::iso8601)
                    .unwrap_or_else(|| "never".into())
            );
            println!("payments:       {}", payments.len());
            for p in payments.iter().rev().take(10) {
                println!(
                    "  {}  {:>10} KES  {:>9.3} units  {}:{}",
                    crate::api::iso8601(p.at),
                    format_cents(p.amount_cents),
                    wh_to_units(p.credit_wh),
                    p.source,
                    p.reference
                );
            }
            Ok(())
        }
        MeterCommand::Emergency { id } => {
            let meter = parse_meter(&id)?;
            apply(
                config,
                Op::Emergency {
                    meter: meter.clone(),
                    at: now_ms(),
                },
            )?;
            let conn = open(config)?;
            let m = meter_row(&conn, &meter)?;
            println!(
                "{meter}: emergency credit granted; the meter may now use {} Wh",
                m.balance_wh
            );
            Ok(())
        }
        MeterCommand::Statement { id, month } => {
            let meter = parse_meter(&id)?;
            let month =
                month.unwrap_or_else(|| crate::api::current_month(config.ledger.tariff.zone));
            let conn = open(config)?;
            let s = crate::statement::build(&conn, &config.ledger.tariff, &meter, &month).map_err(
                |e| match e {
                    crate::statement::StatementError::Store(e) => {
                        Failure::from(anyhow::Error::from(e))
                    }
                    e => Failure {
                        code: 1,
                        error: e.into(),
                    },
                },
            )?;
            print!("{s}");
            if !s.adds_up() {
                eprintln!("warning: this statement does not add up: events are missing or damaged");
            }
            Ok(())
        }
        MeterCommand::Remove { id } => {
            let meter = parse_meter(&id)?;
            apply(
                config,
                Op::RemoveMeter {
                    meter: meter.clone(),
                    at: now_ms(),
                },
            )?;
            println!("removed meter {meter}");
            Ok(())
        }
        MeterCommand::SetSecret { id, secret } => {
            let meter = parse_meter(&id)?;
            let (secret, generated) = secret_or_generated(secret)?;
            let op = Op::SetSecret {
                meter: meter.clone(),
                secret_hash: auth::hash_secret(&secret),
                at: now_ms(),
            };
            apply(config, op)?;
            println!("secret of {meter} replaced; its current session is closed");
            if generated {
                println!("secret: {secret}");
            }
            Ok(())
        }
    }
}
