//! The built-in `jsonl` sink: events appended to `dir/events.jsonl`, one JSON object a line
//! (the event of contract §6), synced before the batch counts as delivered, and rotated by size
//! to `events-<first seq>-<last seq>.jsonl` for audit and USB export.
//!
//! ```toml
//! [[sink]]
//! name = "audit"
//! builtin = "jsonl"
//! [sink.config]
//! dir = "/var/lib/umeme-gateway/export"
//! max_file_bytes = "64MiB"   # rotate past this size
//! max_files = 0              # rotated files to keep; 0 keeps all
//! ```

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::outbox::{Delivery, Sink};
use crate::store::Event;

const CURRENT: &str = "events.jsonl";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    dir: PathBuf,
    #[serde(default)]
    max_file_bytes: Option<serde_json::Value>,
    #[serde(default)]
    max_files: Option<usize>,
}

#[derive(Debug)]
pub struct JsonlSink {
    dir: PathBuf,
    max_file_bytes: u64,
    max_files: usize,
}

impl JsonlSink {
    /// Parses `[sink.config]`; touches nothing on disk.
    pub fn from_config(config: &serde_json::Value) -> Result<JsonlSink, String> {
        let s: Settings =
            serde_json::from_value(config.clone()).map_err(|e| format!("[sink.config]: {e}"))?;
        if s.dir.as_os_str().is_empty() {
            return Err("[sink.config] dir must not be empty".into());
        }
        let max_file_bytes = match s.max_file_bytes {
            None => 64 << 20,
            Some(serde_json::Value::Number(n)) => n
                .as_u64()
                .filter(|n| *n > 0)
                .ok_or("max_file_bytes must be positive")?,
            Some(serde_json::Value::String(t)) => crate::config::parse_byte_size(&t)?,
            Some(other) => {
                return Err(format!(
                    "max_file_bytes: expected a size such as \"64MiB\", got {other}"
                ))
            }
        };
        Ok(JsonlSink {
            dir: s.dir,
            max_file_bytes,
            max_files: s.max_files.unwrap_or(0),
        })
    }

    fn append(&mut self, batch: &[Event]) -> std::io::Result<()> {
        fs::create_dir_all(&self.dir)?;
        let path = self.dir.join(CURRENT);
        // Opened per batch so that a replaced or recreated file is picked up.
        let mut file = OpenOptions::new().create(true).append(true).open(&path)?;
        let mut buf = Vec::with_capacity(batch.len() * 256 + 1);
        // A write cut short by a crash leaves a torn last line: end it, so the next event
        // starts on a line of its own and only the fragment is unreadable.
        if !ends_with_newline(&path)? {
            buf.push(b'\n');
        }
        for e in batch {
            serde_json::to_writer(&mut buf, e)?;
            buf.push(b'\n');
        }
        file.write_all(&buf)?;
        file.sync_data()?;
        if file.metadata()?.len() >= self.max_file_bytes {
            self.rotate(&path, batch)?;
        }
        Ok(())
    }

    fn rotate(&self, path: &Path, batch: &[Event]) -> std::io::Result<()> {
        let first = first_seq(path).unwrap_or(0);
        let last = batch.last().map_or(0, |e| e.seq);
        let rotated = self
            .dir
            .join(format!("events-{first:012}-{last:012}.jsonl"));
        fs::rename(path, &rotated)?;
        File::open(&self.dir)?.sync_all()?;
        if self.max_files > 0 {
            let mut old: Vec<PathBuf> = fs::read_dir(&self.dir)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("events-") && n.ends_with(".jsonl"))
                })
                .collect();
            old.sort();
            let excess = old.len().saturating_sub(self.max_files);
            for p in &old[..excess] {
                fs::remove_file(p)?;
            }
        }
        Ok(())
    }
}

fn ends_with_newline(path: &Path) -> std::io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = File::open(path)?;
    if f.metadata()?.len() == 0 {
        return Ok(true);
    }
    f.seek(SeekFrom::End(-1))?;
    let mut last = [0u8; 1];
    f.read_exact(&mut last)?;
    Ok(last[0] == b'\n')
}

/// The `seq` of the first line of a JSON Lines file.
fn first_seq(path: &Path) -> Option<i64> {
    use std::io::BufRead;
    let f = File::open(path).ok()?;
    let mut line = String::new();
    std::io::BufReader::new(f).read_line(&mut line).ok()?;
    serde_json::from_str::<serde_json::Value>(&line).ok()?["seq"].as_i64()
}

impl Sink for JsonlSink {
    fn deliver(&mut self, batch: &[Event]) -> Delivery {
        match self.append(batch) {
            Ok(()) => Delivery::Delivered,
            Err(e) => Delivery::Retry {
                after: None,
                error: format!("{}: {e}", self.dir.join(CURRENT).display()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: i64) -> Event {
        Event {
            id: crate::store::event_id("t", seq),
            seq,
            gateway: "t".into(),
            kind: "consumption".into(),
            meter: Some("M1".into()),
            at: 1,
            data: serde_json::json!({"debitWh": seq}),
        }
    }

    #[test]
    fn appends_lines_and_rotates_by_size_keeping_max_files() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = serde_json::json!({"dir": dir.path(), "max_file_bytes": 300, "max_files": 2});
        let mut s = JsonlSink::from_config(&cfg).unwrap();
        for seq in 1..=12 {
            assert_eq!(s.deliver(&[event(seq)]), Delivery::Delivered);
        }
        let mut names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names.iter().filter(|n| n.starts_with("events-")).count(),
            2,
            "{names:?}"
        );
        let all: String = names
            .iter()
            .map(|n| fs::read_to_string(dir.path().join(n)).unwrap())
            .collect();
        let last: Event = serde_json::from_str(all.lines().last().unwrap()).unwrap();
        assert_eq!(last.seq, 12);
    }

    #[test]
    fn config_errors_are_clear() {
        assert!(JsonlSink::from_config(&serde_json::json!({}))
            .unwrap_err()
            .contains("dir"));
        assert!(JsonlSink::from_config(&serde_json::json!({"dir": "/x", "typo": 1})).is_err());
        assert!(JsonlSink::from_config(
            &serde_json::json!({"dir": "/x", "max_file_bytes": "5 parsecs"})
        )
        .is_err());
    }

    #[test]
    fn an_unwritable_directory_is_a_retry() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        fs::write(&blocker, "").unwrap();
        let mut s =
            JsonlSink::from_config(&serde_json::json!({"dir": blocker.join("sub")})).unwrap();
        assert!(matches!(s.deliver(&[event(1)]), Delivery::Retry { .. }));
    }
}
