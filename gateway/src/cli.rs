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
    /// The site as a whole: the main supply read by hand, and the loss per day.
    #[command(subcommand)]
    Site(SiteCommand),
    /// Meter firmware: release keys, signed images, rollouts over the air.
    #[command(subcommand)]
    Firmware(FirmwareCommand),
    /// TLS on the meter port: the site CA and the gateway's server certificate.
    #[command(subcommand)]
    Tls(TlsCommand),
    /// The web dashboard's operator sign-in.
    #[command(subcommand)]
    Operator(OperatorCommand),
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
pub enum SiteCommand {
    /// Record the site's bulk supply of a local day, read by hand from the main meter
    /// (replaces an earlier reading of that day; it wins over a meter marked --main).
    Reading {
        #[arg(long, value_name = "YYYY-MM-DD")]
        day: String,
        #[arg(long)]
        kwh: f64,
    },
    /// Per local day: the main supply, the other meters' sum and the loss (default: the last
    /// 14 days).
    Loss {
        #[arg(long, value_name = "YYYY-MM-DD")]
        from: Option<String>,
        #[arg(long, value_name = "YYYY-MM-DD")]
        to: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum TlsCommand {
    /// Make a site CA (key and certificate) and a server certificate signed by it under the
    /// data directory's `tls/` (keys mode 0600). Meters trust `tls/ca.crt`.
    Init {
        /// A DNS name meters connect to (repeatable); default: this host's name and
        /// umeme-gateway.local.
        #[arg(long = "name", value_name = "NAME")]
        names: Vec<String>,
        /// An IP address meters connect to (repeatable).
        #[arg(long = "ip", value_name = "IP")]
        ips: Vec<std::net::IpAddr>,
        /// Replace an existing site CA: meters that trust the old one refuse the new one.
        #[arg(long)]
        force: bool,
    },
    /// Print the site CA's SHA-256 fingerprint and the server certificate's names and expiry.
    Show,
}

#[derive(Subcommand, Debug)]
pub enum OperatorCommand {
    /// Set the dashboard's operator password (10 to 128 characters), read from standard input
    /// (not echoed on a terminal); stored argon2id-hashed in the database. Signed-in sessions
    /// end at the daemon's next restart or their expiry.
    Password,
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
pub enum FirmwareCommand {
    /// Make the site's Ed25519 release key pair. The private key (mode 0600) belongs on the
    /// release machine, not on the gateway; the public key goes into `[ota]
    /// release_public_key` and into the meter firmware (`METER_RELEASE_PUBLIC_KEY`).
    Keygen {
        /// Where to write the private key (`PATH.pub` gets the public key). Refuses to
        /// overwrite.
        #[arg(long, value_name = "PATH", default_value = "umeme-release.key")]
        out: PathBuf,
    },
    /// Sign an image for a version; prints the signature for `firmware add`.
    Sign {
        file: PathBuf,
        /// The private key file `firmware keygen` wrote.
        #[arg(long, value_name = "PATH")]
        key: PathBuf,
        /// The version the image carries (it is part of what is signed).
        #[arg(long)]
        version: String,
    },
    /// Store a signed image under the data dir (the signature is checked against
    /// `[ota] release_public_key`).
    Add {
        file: PathBuf,
        #[arg(long)]
        version: String,
        /// The signature `firmware sign` printed (128 hex digits).
        #[arg(long)]
        signature: String,
    },
    /// Stored images.
    List,
    /// Offer a stored version to meters; replaces a rollout that is still active or paused.
    Rollout {
        #[arg(long)]
        version: String,
        /// Meter numbers, comma-separated.
        #[arg(
            long,
            value_delimiter = ',',
            conflicts_with = "all",
            required_unless_present = "all"
        )]
        meters: Vec<String>,
        /// Every meter provisioned now.
        #[arg(long)]
        all: bool,
        /// Pause the rollout when more than this share of its meters failed or rolled back.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u8).range(0..=100))]
        max_failure_percent: u8,
    },
    /// The current rollout and every meter's state in it.
    Status,
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
        /// Mark this meter as the site's main (bulk) meter, whose consumption is the site's
        /// supply for site loss (`--main false` unmarks it; one meter is main at a time).
        #[arg(long, value_name = "true|false", num_args = 0..=1, default_missing_value = "true",
              action = clap::ArgAction::Set)]
        main: Option<bool>,
    },
    /// Consumption per hour of a local day, or per day of a month.
    Usage {
        id: String,
        #[arg(
            long,
            value_name = "YYYY-MM-DD",
            conflicts_with = "month",
            required_unless_present = "month"
        )]
        day: Option<String>,
        #[arg(long, value_name = "YYYY-MM")]
        month: Option<String>,
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
    let uses_data = !matches!(
        cli.command,
        Command::CheckConfig
            | Command::Plugin(_)
            | Command::Firmware(FirmwareCommand::Keygen { .. } | FirmwareCommand::Sign { .. })
    );
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
            check_tls(&config)?;
            print_http_limits(&config);
            print_ota(&config);
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
            match &config.limits {
                Some(l) => println!("limits the v2 meters enforce (command/config): {l}"),
                None if config
                    .ledger
                    .tariff
                    .versions()
                    .iter()
                    .any(|t| t.limits.is_some()) =>
                {
                    println!("limits the v2 meters enforce: none on tariffs without their own (no [limits] section)")
                }
                None => println!("limits the v2 meters enforce: none sent (no [limits] section)"),
            }
            // A tariff's own limits replace the site's for its meters.
            for t in config.ledger.tariff.versions() {
                if let Some(l) = &t.limits {
                    let from = t
                        .effective_from
                        .map_or(String::new(), |d| format!(" from {d}"));
                    println!("  on tariff {}{from}: {l}", t.name);
                }
            }
            Ok(())
        }
        Command::Meter(m) => meter(&config, m),
        Command::Tls(t) => tls(&config, t),
        Command::Outbox(OutboxCommand::Status) => outbox_status(&config),
        Command::Payment(p) => payment(&config, p),
        Command::Site(s) => site(&config, s),
        Command::Firmware(f) => firmware(&config, f),
        Command::Operator(OperatorCommand::Password) => operator_password(&config),
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
    let ports = match (b.listen, b.tls_listen) {
        (Some(p), Some(t)) => format!("{p} and TLS on {t}"),
        (Some(p), None) => p.to_string(),
        (None, Some(t)) => format!("TLS on {t} (plain listener off)"),
        (None, None) => "nothing".into(),
    };
    println!(
        "ok: meter port on {ports}: at most {} connections, {} per address before CONNACK, CONNECT within {} ms, packets up to {} bytes, password backoff up to {} ms",
        b.max_connections,
        b.max_unauthenticated_per_ip,
        b.connect_timeout_ms,
        b.max_packet_bytes,
        b.auth_backoff_max_ms
    );
    if b.tls_listen.is_some() {
        println!(
            "ok: meter port TLS: handshake within {} ms, {} handshakes in flight per address",
            b.tls_handshake_timeout_ms, b.max_tls_handshakes_per_ip
        );
    }
}

/// With `[broker] tls_listen` set: the certificate and key the daemon would serve, readable,
/// matching, not expired.
fn check_tls(config: &Config) -> Result<(), Failure> {
    let b = &config.broker;
    if b.tls_listen.is_none() {
        return Ok(());
    }
    let cert = crate::tls::check_server_files(&b.tls_cert_file, &b.tls_key_file).map_err(|e| {
        usage(format!(
            "[broker] tls_listen: {e}; `umeme-gateway tls init` makes the site CA and the server certificate"
        ))
    })?;
    if cert.expired(crate::tls::now_unix()) {
        return Err(usage(format!(
            "[broker] tls_cert_file {} expired on {}: renew it with `umeme-gateway tls init --force` (or your CA)",
            b.tls_cert_file.display(),
            cert.not_after_text
        )));
    }
    println!(
        "ok: TLS certificate {} for {} (key {} matches), expires {}",
        b.tls_cert_file.display(),
        cert.names.join(", "),
        b.tls_key_file.display(),
        cert.not_after_text
    );
    Ok(())
}

fn tls(config: &Config, command: TlsCommand) -> Result<(), Failure> {
    use crate::tls::{self, Paths};
    let paths = Paths::under(&config.gateway.data_dir);
    match command {
        TlsCommand::Init { names, ips, force } => {
            let names = if names.is_empty() && ips.is_empty() {
                tls::default_names()
            } else {
                names
            };
            let (ca, server) = tls::init(&paths, &names, &ips, force).map_err(|e| match e {
                tls::TlsError::Exists { .. } | tls::TlsError::BadName(_) => usage(e.to_string()),
                other => Failure::from(anyhow::Error::new(other)),
            })?;
            println!(
                "site CA: {} (key {})",
                paths.ca_cert().display(),
                paths.ca_key().display()
            );
            println!("  SHA-256 fingerprint: {}", ca.sha256);
            println!(
                "server certificate: {} (key {}) for {}, expires {}",
                paths.server_cert().display(),
                paths.server_key().display(),
                server.names.join(", "),
                server.not_after_text
            );
            println!(
                "Meters trust {}; set [broker] tls_listen to serve TLS.",
                paths.ca_cert().display()
            );
            Ok(())
        }
        TlsCommand::Show => {
            let show = |path: &std::path::Path| -> Result<tls::CertSummary, Failure> {
                let certs = tls::read_certs(path).map_err(anyhow::Error::new)?;
                Ok(tls::summary(path, &certs[0]).map_err(anyhow::Error::new)?)
            };
            let ca = show(&paths.ca_cert())?;
            println!("site CA: {}", paths.ca_cert().display());
            println!("  subject: {}", ca.subject);
            println!("  SHA-256 fingerprint: {}", ca.sha256);
            println!("  expires: {}", ca.not_after_text);
            let cert_file = &config.broker.tls_cert_file;
            let server = show(cert_file)?;
            println!("server certificate: {}", cert_file.display());
            println!("  names (SANs): {}", server.names.join(", "));
            println!("  SHA-256 fingerprint: {}", server.sha256);
            println!("  expires: {}", server.not_after_text);
            Ok(())
        }
    }
}

/// Whether firmware can be added, and the serving limits.
fn print_ota(config: &Config) {
    let o = &config.ota;
    match o.release_public_key {
        Some(k) => println!(
            "ok: firmware updates: release key {}…, chunks of {} bytes, {} downloads at once, images up to {} bytes",
            &crate::ota::hex(&k)[..16],
            o.chunk_size,
            o.max_downloads,
            o.max_image_bytes
        ),
        None => println!(
            "note: firmware updates: no [ota] release_public_key, so `firmware add` refuses every image"
        ),
    }
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

fn firmware(config: &Config, cmd: FirmwareCommand) -> Result<(), Failure> {
    use crate::ota::{self, OtaOp, Targets};
    let fail = |e: ota::OtaError| Failure {
        code: 1,
        error: e.into(),
    };
    match cmd {
        FirmwareCommand::Keygen { out } => {
            let abs =
                |p: &std::path::Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
            if abs(&out).starts_with(abs(&config.gateway.data_dir)) {
                return Err(usage(
                    "the release key must not live in the data dir: the gateway never needs it",
                ));
            }
            let (pkcs8, public) = ota::generate_key().map_err(fail)?;
            let pub_path = ota::write_key_files(&out, &pkcs8, &public).map_err(fail)?;
            println!(
                "private key: {} (mode 0600; keep it off the gateway)",
                out.display()
            );
            println!(
                "public key:  {} ({})",
                ota::hex(&public),
                pub_path.display()
            );
            println!(
                "put it in the gateway's configuration:\n[ota]\nrelease_public_key = \"{}\"",
                ota::hex(&public)
            );
            Ok(())
        }
        FirmwareCommand::Sign { file, key, version } => {
            let pair = ota::read_key_file(&key).map_err(fail)?;
            println!("{}", ota::sign_file(&file, &version, &pair).map_err(fail)?);
            Ok(())
        }
        FirmwareCommand::Add {
            file,
            version,
            signature,
        } => {
            if store::firmware(&open(config)?, &version)
                .context("reading firmware")?
                .is_some()
            {
                return Err(anyhow!(
                    "firmware {version} exists already; give the new image another version"
                )
                .into());
            }
            let row = ota::prepare_image(
                &config.ota,
                &config.gateway.data_dir,
                &file,
                &version,
                &signature,
                now_ms(),
            )
            .map_err(fail)?;
            apply(config, Op::Ota(OtaOp::AddFirmware(row.clone())))?;
            println!(
                "added firmware {} ({} bytes, sha256 {})",
                row.version, row.size, row.sha256
            );
            Ok(())
        }
        FirmwareCommand::List => {
            let conn = open(config)?;
            let rows = store::firmware_list(&conn).context("reading firmware")?;
            if rows.is_empty() {
                println!("no firmware stored");
            }
            for f in rows {
                println!(
                    "{:<24} {:>9} bytes  sha256 {}  added {}",
                    f.version,
                    f.size,
                    f.sha256,
                    crate::api::iso8601(f.added_at)
                );
            }
            Ok(())
        }
        FirmwareCommand::Rollout {
            version,
            meters,
            all,
            max_failure_percent,
        } => {
            let targets = if all {
                Targets::All
            } else {
                Targets::Meters(
                    meters
                        .iter()
                        .map(|m| parse_meter(m))
                        .collect::<Result<_, _>>()?,
                )
            };
            let op = Op::Ota(OtaOp::StartRollout {
                version: version.clone(),
                targets,
                max_failure_percent: i64::from(max_failure_percent),
                at: now_ms(),
            });
            match apply(config, op)? {
                Outcome::Rollout { id } => {
                    println!("rollout {id} of firmware {version} started; the daemon offers it to connected meters within a second, to the others when they connect");
                    Ok(())
                }
                _ => Err(anyhow!("unexpected ledger outcome").into()),
            }
        }
        FirmwareCommand::Status => {
            let conn = open(config)?;
            let Some(r) = store::current_rollout(&conn).context("reading rollouts")? else {
                println!("no rollout");
                return Ok(());
            };
            let meters = store::rollout_meters(&conn, r.id).context("reading rollouts")?;
            let mut counts = std::collections::BTreeMap::<&str, usize>::new();
            for m in &meters {
                *counts.entry(m.state.as_str()).or_default() += 1;
            }
            println!(
                "rollout {} of firmware {}: {} (max failures {}%), started {}",
                r.id,
                r.version,
                r.state,
                r.max_failure_percent,
                crate::api::iso8601(r.created_at)
            );
            if let Some(reason) = &r.reason {
                println!("  {reason}");
            }
            let summary: Vec<String> = counts.iter().map(|(s, n)| format!("{s} {n}")).collect();
            println!("meters: {}", summary.join(", "));
            for m in meters {
                println!(
                    "{:<20} {:<12} {:>9} {}",
                    m.meter,
                    m.state,
                    m.offset,
                    m.error.as_deref().unwrap_or("")
                );
            }
            Ok(())
        }
    }
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

fn site(config: &Config, cmd: SiteCommand) -> Result<(), Failure> {
    use crate::tariff::calendar::LocalDate;
    match cmd {
        SiteCommand::Reading { day, kwh } => {
            let (day, wh) = crate::api::site_reading_values(&day, kwh).map_err(usage)?;
            apply(
                config,
                Op::SiteReading {
                    day: day.clone(),
                    wh,
                    at: now_ms(),
                },
            )?;
            println!("site supply on {day}: {:.3} kWh", wh_to_units(wh));
            Ok(())
        }
        SiteCommand::Loss { from, to } => {
            let zone = config.alerts.zone;
            let date = |v: Option<String>, default: i64| -> Result<LocalDate, Failure> {
                match v {
                    None => Ok(LocalDate::from_days(default)),
                    Some(s) => LocalDate::parse(&s)
                        .ok_or_else(|| usage(format!("{s:?}: not a date YYYY-MM-DD"))),
                }
            };
            let today = zone.day(now_ms());
            let (from, to) = (date(from, today - 13)?, date(to, today)?);
            let n = to.days() - from.days() + 1;
            if !(1..=crate::usage::MAX_DAYS).contains(&n) {
                return Err(usage(format!(
                    "--from..--to must be 1 to {} days",
                    crate::usage::MAX_DAYS
                )));
            }
            let conn = open(config)?;
            let days = crate::alerts::site_days(&conn, zone, from, to).context("reading usage")?;
            println!(
                "{:<10} {:>12} {:<7} {:>12} {:>12} {:>7}",
                "DAY", "MAIN kWh", "FROM", "METERS kWh", "LOSS kWh", "LOSS"
            );
            let kwh = |wh: Option<i64>| wh.map_or("-".into(), |w| format!("{:.3}", wh_to_units(w)));
            for d in days {
                println!(
                    "{:<10} {:>12} {:<7} {:>12} {:>12} {:>7}",
                    d.day,
                    kwh(d.main_wh),
                    d.main_source.unwrap_or("-"),
                    kwh(Some(d.sub_wh)),
                    kwh(d.loss_wh),
                    d.loss_share
                        .map_or("-".into(), |s| format!("{:.1}%", s * 100.0))
                );
            }
            Ok(())
        }
    }
}

fn operator_password(config: &Config) -> Result<(), Failure> {
    let stdin = std::io::stdin();
    let tty = stdin.is_terminal();
    if tty {
        eprint!("operator password: ");
    }
    let echo = tty.then(EchoOff::new).flatten();
    let mut line = String::new();
    let read = stdin.read_line(&mut line);
    drop(echo);
    if tty {
        eprintln!();
    }
    read.context("reading the password from standard input")?;
    let password = line.trim_end_matches(['\r', '\n']);
    let len = password.chars().count();
    if !(10..=128).contains(&len) || password.chars().any(char::is_control) {
        return Err(usage(
            "the operator password must be 10 to 128 characters, no control characters",
        ));
    }
    apply(
        config,
        Op::SetOperatorPassword {
            hash: auth::hash_secret(password),
        },
    )?;
    println!("operator password set; sign in at the admin API's /dashboard");
    Ok(())
}

/// Turns terminal echo off until dropped (the password prompt).
struct EchoOff(libc::termios);

impl EchoOff {
    fn new() -> Option<EchoOff> {
        // SAFETY: tcgetattr/tcsetattr on stdin with a termios the call fills in.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return None;
            }
            let saved = t;
            t.c_lflag &= !libc::ECHO;
            (libc::tcsetattr(0, libc::TCSANOW, &t) == 0).then_some(EchoOff(saved))
        }
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        // SAFETY: restores the attributes read in `new`.
        unsafe {
            libc::tcsetattr(0, libc::TCSANOW, &self.0);
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
            | LedgerError::Ota(_)
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
            main,
        } => {
            let meter = parse_meter(&id)?;
            let did_something = tariff.is_some() || main.is_some();
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
            }
            if let Some(main) = main {
                apply(
                    config,
                    Op::SetMain {
                        meter: meter.clone(),
                        main,
                        at: now_ms(),
                    },
                )?;
                println!(
                    "{meter}: {}",
                    if main {
                        "the site's main meter (site loss compares the others with it)"
                    } else {
                        "not the main meter"
                    }
                );
            }
            if did_something && legacy_anonymous.is_none() && legacy_source.is_none() {
                return Ok(());
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
                    "nothing to set: give --tariff, --main, --legacy-anonymous or --legacy-source",
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
            if m.main {
                println!("main meter:     yes (the site's supply for site loss)");
            }
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
        MeterCommand::Usage { id, day, month } => {
            let meter = parse_meter(&id)?;
            let zone = config.alerts.zone;
            let (from, to, step) = match (day.as_deref(), month.as_deref()) {
                (Some(d), _) => {
                    let d = crate::tariff::calendar::LocalDate::parse(d)
                        .ok_or_else(|| usage(format!("--day {d:?}: not a date YYYY-MM-DD")))?;
                    let (f, t) = crate::usage::day_span(zone, d);
                    (f, t, crate::usage::Step::Hour)
                }
                (None, Some(m)) => {
                    let (f, t) = crate::usage::month_span(zone, m)
                        .ok_or_else(|| usage(format!("--month {m:?}: not a month YYYY-MM")))?;
                    (f, t, crate::usage::Step::Day)
                }
                (None, None) => return Err(usage("give --day or --month")),
            };
            let conn = open(config)?;
            meter_row(&conn, &meter)?;
            let points = crate::usage::points(&conn, zone, meter.as_str(), from, to, step)
                .context("reading usage")?
                .map_err(|e| usage(e.to_string()))?;
            let offset = i64::from(zone.offset_minutes()) * 60_000;
            println!("{:<17} {:>12}", "LOCAL TIME", "kWh");
            for p in &points {
                // Local wall time: the ISO form of the shifted instant, without its `Z`.
                let local = crate::api::iso8601(p.at + offset);
                let label = match step {
                    crate::usage::Step::Hour => local[..16].replace('T', " "),
                    crate::usage::Step::Day => local[..10].to_string(),
                };
                println!("{label:<17} {:>12.3}", wh_to_units(p.wh));
            }
            let total: i64 = points.iter().map(|p| p.wh).sum();
            println!("{:<17} {:>12.3}", "total", wh_to_units(total));
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
