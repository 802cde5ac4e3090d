//! The file-descriptor budget: every listener's connection cap must fit in `RLIMIT_NOFILE`
//! together with what SQLite and the plugins hold, so that an HTTP flood can never take the
//! descriptors the meter port needs (an `accept` failing with EMFILE on the meter port means no
//! meter can connect).
//!
//! At start the soft limit is raised to the hard one; then the HTTP listeners' caps and a
//! reserve are set aside first (they are small and fixed) and the meter port gets the rest, up
//! to `[broker] max_connections`. When the rest is smaller, `max_connections` is lowered and the
//! start says so; when it leaves fewer than [`MIN_METER_CONNECTIONS`], the start is refused.

use std::fmt;

use crate::config::{Config, ConfigError};

/// Descriptors kept for everything but connections: stdio, the journal, epoll and eventfds,
/// SQLite (database, WAL and shared-memory files of the writer and the readers).
pub const RESERVE_BASE: usize = 64;
/// Per plugin (its sockets, TLS connections, files) and per sink runner's SQLite connection.
pub const RESERVE_PER_PLUGIN: usize = 16;
/// Each `[[source]]` may run an HTTP listener of its own (the Daraja plugin does), capped by the
/// shared guard at this many connections.
pub const PER_SOURCE_HTTP: usize = umeme_http_guard::PLUGIN_MAX_CONNECTIONS;
/// Fewer meter connections than this is not a gateway: refuse to start.
pub const MIN_METER_CONNECTIONS: usize = 16;

/// How `RLIMIT_NOFILE` is shared out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FdBudget {
    pub limit: usize,
    pub reserve: usize,
    pub admin: usize,
    pub legacy: usize,
    pub sources: usize,
    /// Meter connections the broker will accept (≤ `[broker] max_connections`).
    pub meters: usize,
    /// `[broker] max_connections` as configured.
    pub meters_configured: usize,
}

impl FdBudget {
    /// Shares `limit` descriptors out for `config`; an error when meters would get too few.
    pub fn plan(limit: u64, config: &Config) -> Result<FdBudget, ConfigError> {
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let plugins = config.sinks.len() + config.sources.len();
        let reserve = RESERVE_BASE + RESERVE_PER_PLUGIN * plugins;
        let admin = config.api.limits.max_connections;
        let legacy = config
            .api
            .legacy_listen
            .map_or(0, |_| config.api.legacy_limits.max_connections);
        let sources = PER_SOURCE_HTTP * config.sources.len();
        let left = limit.saturating_sub(reserve + admin + legacy + sources);
        let budget = FdBudget {
            limit,
            reserve,
            admin,
            legacy,
            sources,
            meters: left.min(config.broker.max_connections),
            meters_configured: config.broker.max_connections,
        };
        if budget.meters < MIN_METER_CONNECTIONS.min(config.broker.max_connections) {
            return Err(ConfigError {
                file: None,
                position: None,
                message: format!(
                    "{budget}: the open-file limit leaves meters fewer than {MIN_METER_CONNECTIONS} connections; raise LimitNOFILE or lower [api] max_connections / legacy_max_connections"
                ),
            });
        }
        Ok(budget)
    }

    /// `[broker] max_connections` did not fit and was lowered.
    pub fn clamped(&self) -> bool {
        self.meters < self.meters_configured
    }
}

impl fmt::Display for FdBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "fd budget: RLIMIT_NOFILE {} = reserve {} + admin API {} + legacy {} + source listeners {} + meters {}",
            self.limit, self.reserve, self.admin, self.legacy, self.sources, self.meters
        )?;
        if self.clamped() {
            write!(
                f,
                " (broker.max_connections {} lowered to fit)",
                self.meters_configured
            )?;
        }
        Ok(())
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns the soft limit now in force.
#[allow(clippy::unnecessary_cast)] // rlim_t is 32 bits on 32-bit ARM
pub fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024; // the usual default; the budget stays conservative
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    lim.rlim_cur as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("g.toml");
        std::fs::write(&p, extra).unwrap();
        Config::load(Some(&p)).unwrap()
    }

    #[test]
    fn meters_get_what_the_http_caps_and_the_reserve_leave() {
        let c = config("[broker]\nmax_connections = 2000\n");
        let b = FdBudget::plan(1024, &c).unwrap();
        assert_eq!(b.meters, 1024 - RESERVE_BASE - 64);
        assert!(b.clamped());
        assert!(b.to_string().contains("lowered to fit"), "{b}");
        let b = FdBudget::plan(8192, &c).unwrap();
        assert_eq!(b.meters, 2000);
        assert!(!b.clamped());
    }

    #[test]
    fn the_legacy_listener_counts_only_when_it_listens() {
        let c = config("[api]\nlegacy_listen = \"127.0.0.1:0\"\nlegacy_max_connections = 100\n");
        let b = FdBudget::plan(100_000, &c).unwrap();
        assert_eq!(b.legacy, 100);
        let c = config("[api]\nlegacy_max_connections = 100\n");
        assert_eq!(FdBudget::plan(100_000, &c).unwrap().legacy, 0);
    }

    #[test]
    fn a_limit_that_leaves_meters_too_few_descriptors_is_refused() {
        let c = config("");
        let e = FdBudget::plan(100, &c).unwrap_err();
        assert!(e.message.contains("raise LimitNOFILE"), "{e}");
    }
}
