//! Over-the-air firmware updates, the gateway's side (protocol: firmware/README.md
//! "Over-the-air updates").
//!
//! - Release keys and signatures: Ed25519 with ring. The gateway holds only the public key
//!   (`[ota] release_public_key`); `firmware add` refuses an image it did not sign, and the
//!   meters check the same signature with the key built into their firmware, so a gateway
//!   cannot make a meter run an image the release key did not sign.
//! - [`OtaOp`]: the writer's OTA changes (images, rollouts, per-meter status, the pause rule).
//! - [`OtaServer`]: what the broker asks while meters download: the offer for a meter, chunks
//!   from the image (read once on the blocking pool, then served from memory), and the cap on
//!   meters downloading at once. [`OtaServer::refresh`] follows the database, so a rollout
//!   started from the CLI is announced like one started over the API.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use rusqlite::Connection;
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::config::OtaConfig;
use crate::meter::MeterId;
use crate::store::{self, FirmwareRow, RolloutRow, StoreError};
use crate::writer::LedgerError;

/// Folder of the stored images under the data dir.
pub const FIRMWARE_DIR: &str = "firmware";
/// Longest version string (the meter keeps it in a fixed field).
pub const MAX_VERSION: usize = 24;
/// The first bytes of the signed message (the same as meter-core's `ota::SIGNED_PREFIX`).
const SIGNED_PREFIX: &[u8; 9] = b"umeme-fw\x01";
/// The chunk header's length (offset u32 BE, length u16 BE, code, reserved).
pub const CHUNK_HEADER: usize = 8;
/// A meter that asked for nothing this long no longer holds a download slot.
const DOWNLOAD_IDLE: Duration = Duration::from_secs(60);

/// States of a meter in a rollout. The first two are the gateway's, the rest the meter's.
pub const METER_STATES: [&str; 8] = [
    "pending",
    "offered",
    "downloading",
    "verified",
    "rebooting",
    "confirmed",
    "rolled_back",
    "failed",
];
/// States after which a meter gets no more offers or chunks in its rollout.
pub const FINAL_STATES: [&str; 3] = ["confirmed", "rolled_back", "failed"];

#[derive(Debug, thiserror::Error)]
pub enum OtaError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("version {0:?} must be 1 to 24 characters of A-Z, a-z, 0-9, '.', '+', '_' or '-'")]
    BadVersion(String),
    #[error("the release key file is not an Ed25519 key written by `firmware keygen`")]
    BadKey,
    #[error("signature must be 128 hex digits (64 bytes)")]
    BadSignatureFormat,
    #[error(
        "the signature does not verify with [ota] release_public_key: the image, its version \
         or the key differs from the ones it was signed with"
    )]
    BadSignature,
    #[error("[ota] release_public_key is not set: add it (the public key `firmware keygen` printed) before adding images")]
    NoPublicKey,
    #[error("the image is {size} bytes; [ota] max_image_bytes is {max}")]
    TooLarge { size: u64, max: u64 },
    #[error("the image is empty")]
    Empty,
    #[error("{0}")]
    Other(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> OtaError + '_ {
    move |source| OtaError::Io {
        path: path.display().to_string(),
        source,
    }
}

pub fn valid_version(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= MAX_VERSION
        && v.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'+' | b'_' | b'-'))
}

pub fn check_version(v: &str) -> Result<(), OtaError> {
    if valid_version(v) {
        Ok(())
    } else {
        Err(OtaError::BadVersion(v.to_string()))
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `N` bytes from `2N` hex digits.
pub fn parse_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let b = s.as_bytes();
    if b.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        let pair = std::str::from_utf8(&b[2 * i..2 * i + 2]).ok()?;
        *o = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(out)
}

/// The message the release key signs: prefix, version (length-prefixed), size (u32 BE),
/// sha256. The version is inside, so an old image cannot be offered under a new version.
pub fn signed_message(version: &str, size: u32, sha256: &[u8; 32]) -> Vec<u8> {
    let mut m = Vec::with_capacity(SIGNED_PREFIX.len() + 1 + version.len() + 4 + 32);
    m.extend_from_slice(SIGNED_PREFIX);
    m.push(version.len() as u8);
    m.extend_from_slice(version.as_bytes());
    m.extend_from_slice(&size.to_be_bytes());
    m.extend_from_slice(sha256);
    m
}

/// A chunk header (see the protocol table).
pub fn chunk_header(offset: u32, len: u16, code: u8) -> [u8; CHUNK_HEADER] {
    let o = offset.to_be_bytes();
    let l = len.to_be_bytes();
    [o[0], o[1], o[2], o[3], l[0], l[1], code, 0]
}

/// A new release key pair: (PKCS#8 document, public key).
pub fn generate_key() -> Result<(Vec<u8>, [u8; 32]), OtaError> {
    let rng = ring::rand::SystemRandom::new();
    let doc = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| OtaError::BadKey)?;
    let pair = Ed25519KeyPair::from_pkcs8(doc.as_ref()).map_err(|_| OtaError::BadKey)?;
    let public: [u8; 32] = pair
        .public_key()
        .as_ref()
        .try_into()
        .map_err(|_| OtaError::BadKey)?;
    Ok((doc.as_ref().to_vec(), public))
}

/// Writes the private key (hex of its PKCS#8 document) to a new file of mode 0600, and its
/// public key beside it (`PATH.pub`, hex). Refuses to overwrite either.
pub fn write_key_files(path: &Path, pkcs8: &[u8], public: &[u8; 32]) -> Result<PathBuf, OtaError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut pub_path = path.as_os_str().to_owned();
    pub_path.push(".pub");
    let pub_path = PathBuf::from(pub_path);
    let create = |p: &Path, mode: u32| {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(p)
            .map_err(io(p))
    };
    let mut f = create(path, 0o600)?;
    f.write_all(format!("{}\n", hex(pkcs8)).as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(io(path))?;
    let mut p = create(&pub_path, 0o644)?;
    p.write_all(format!("{}\n", hex(public)).as_bytes())
        .map_err(io(&pub_path))?;
    Ok(pub_path)
}

/// Reads a private key file (`firmware keygen`), with the checks every secret file gets.
pub fn read_key_file(path: &Path) -> Result<Ed25519KeyPair, OtaError> {
    let text =
        umeme_plugin_sdk::read_secret_file(path).map_err(|e| OtaError::Other(e.to_string()))?;
    let t = text.trim();
    let der: Option<Vec<u8>> = (t.len() % 2 == 0)
        .then(|| {
            (0..t.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(t.get(i..i + 2)?, 16).ok())
                .collect()
        })
        .flatten();
    Ed25519KeyPair::from_pkcs8(&der.ok_or(OtaError::BadKey)?).map_err(|_| OtaError::BadKey)
}

/// An image file's size and sha256.
pub fn digest_file(path: &Path) -> Result<(u64, [u8; 32]), OtaError> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        size += n as u64;
        h.update(&buf[..n]);
    }
    Ok((size, h.finalize().into()))
}

/// Signs an image file for `version` (`firmware sign`): the signature as 128 hex digits.
pub fn sign_file(file: &Path, version: &str, key: &Ed25519KeyPair) -> Result<String, OtaError> {
    check_version(version)?;
    let (size, sha) = digest_file(file)?;
    let size = u32::try_from(size).map_err(|_| OtaError::TooLarge {
        size,
        max: u64::from(u32::MAX),
    })?;
    Ok(hex(key.sign(&signed_message(version, size, &sha)).as_ref()))
}

pub fn verify(public: &[u8; 32], version: &str, size: u32, sha256: &[u8; 32], sig: &[u8]) -> bool {
    UnparsedPublicKey::new(&ED25519, public)
        .verify(&signed_message(version, size, sha256), sig)
        .is_ok()
}

/// Checks an image against the release key and copies it under `{data_dir}/firmware/`
/// (written to a temporary name, synced, renamed). Returns the row to store.
pub fn prepare_image(
    config: &OtaConfig,
    data_dir: &Path,
    file: &Path,
    version: &str,
    signature: &str,
    at: i64,
) -> Result<FirmwareRow, OtaError> {
    check_version(version)?;
    // Checked before reading a file that may be large.
    config.release_public_key.ok_or(OtaError::NoPublicKey)?;
    let bytes = std::fs::read(file).map_err(io(file))?;
    prepare_image_bytes(config, data_dir, &bytes, version, signature, at)
}

/// [`prepare_image`] for an image already in memory (the admin API's upload).
pub fn prepare_image_bytes(
    config: &OtaConfig,
    data_dir: &Path,
    bytes: &[u8],
    version: &str,
    signature: &str,
    at: i64,
) -> Result<FirmwareRow, OtaError> {
    use std::io::Write;
    check_version(version)?;
    let public = config.release_public_key.ok_or(OtaError::NoPublicKey)?;
    let sig = parse_hex::<64>(signature.trim()).ok_or(OtaError::BadSignatureFormat)?;
    let size = bytes.len() as u64;
    if size == 0 {
        return Err(OtaError::Empty);
    }
    if size > config.max_image_bytes {
        return Err(OtaError::TooLarge {
            size,
            max: config.max_image_bytes,
        });
    }
    let sha: [u8; 32] = Sha256::digest(bytes).into();
    if !verify(&public, version, size as u32, &sha, &sig) {
        return Err(OtaError::BadSignature);
    }
    let dir = data_dir.join(FIRMWARE_DIR);
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    // The hash in the name: a second image under a version never overwrites the first one's
    // file (its row is refused).
    let name = format!("{version}-{}.bin", &hex(&sha)[..16]);
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(io(&tmp))?;
    std::fs::rename(&tmp, dir.join(&name)).map_err(io(&dir))?;
    Ok(FirmwareRow {
        version: version.to_string(),
        size: size as i64,
        sha256: hex(&sha),
        signature: hex(&sig),
        file: name,
        added_at: at,
    })
}

/// The `command/ota` payload of a rollout.
pub fn offer_payload(f: &FirmwareRow, rollout: i64, chunk_size: u16) -> Bytes {
    Bytes::from(
        json!({
            "version": f.version,
            "size": f.size,
            "sha256": f.sha256,
            "signature": f.signature,
            "chunkSize": chunk_size,
            "rollout": rollout,
        })
        .to_string(),
    )
}

// ---- what meters send ----

/// `…/ota/request`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkRequest {
    pub version: String,
    pub offset: u32,
    pub len: u16,
}

impl ChunkRequest {
    pub fn parse(payload: &[u8]) -> Result<ChunkRequest, String> {
        let r: ChunkRequest =
            serde_json::from_slice(payload).map_err(|e| format!("bad ota/request: {e}"))?;
        check_version(&r.version).map_err(|e| e.to_string())?;
        Ok(r)
    }
}

/// `…/ota/status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusReport {
    pub state: String,
    pub version: String,
    pub offset: i64,
    pub error: Option<String>,
}

impl StatusReport {
    pub fn parse(payload: &[u8]) -> Result<StatusReport, String> {
        #[derive(Deserialize)]
        struct Wire {
            state: String,
            version: String,
            #[serde(default)]
            offset: u32,
            #[serde(default)]
            error: Option<String>,
        }
        let w: Wire =
            serde_json::from_slice(payload).map_err(|e| format!("bad ota/status: {e}"))?;
        if !METER_STATES[2..].contains(&w.state.as_str()) {
            return Err(format!("unknown ota state {:?}", w.state));
        }
        check_version(&w.version).map_err(|e| e.to_string())?;
        if w.error
            .as_ref()
            .is_some_and(|e| e.len() > 64 || !e.bytes().all(|c| c.is_ascii_graphic()))
        {
            return Err("ota error code must be at most 64 printable characters".into());
        }
        Ok(StatusReport {
            state: w.state,
            version: w.version,
            offset: i64::from(w.offset),
            error: w.error,
        })
    }
}

// ---- the writer's OTA ops ----

/// Which meters a rollout covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Targets {
    All,
    Meters(Vec<MeterId>),
}

#[derive(Debug, Clone, PartialEq)]
pub enum OtaOp {
    AddFirmware(FirmwareRow),
    StartRollout {
        version: String,
        targets: Targets,
        max_failure_percent: i64,
        at: i64,
    },
    /// The gateway sent the meter its offer (a `pending` meter becomes `offered`).
    Offered {
        meter: MeterId,
        rollout: i64,
        at: i64,
    },
    Status {
        meter: MeterId,
        report: StatusReport,
        at: i64,
    },
}

fn ota_err(e: OtaError) -> LedgerError {
    LedgerError::Ota(e.to_string())
}

/// Applies one OTA op inside the writer's transaction. Events: `ota`, with the meter for a
/// meter's state change, without one for a rollout's (`started`, `paused`, `done`).
pub fn apply(tx: &Connection, op: &OtaOp) -> Result<Option<i64>, LedgerError> {
    match op {
        OtaOp::AddFirmware(f) => {
            if !store::insert_firmware(tx, f)? {
                return Err(ota_err(OtaError::Other(format!(
                    "firmware {} exists already; give the new image another version",
                    f.version
                ))));
            }
            store::append_event(
                tx,
                "ota",
                None,
                f.added_at,
                &json!({"firmware": f.version, "state": "added", "size": f.size, "sha256": f.sha256}),
            )?;
            Ok(None)
        }
        OtaOp::StartRollout {
            version,
            targets,
            max_failure_percent,
            at,
        } => {
            if store::firmware(tx, version)?.is_none() {
                return Err(ota_err(OtaError::Other(format!(
                    "no firmware {version}: add it first (firmware add)"
                ))));
            }
            let meters: Vec<String> = match targets {
                Targets::All => store::meters(tx)?
                    .into_iter()
                    .map(|m| m.id.as_str().to_string())
                    .collect(),
                Targets::Meters(ms) => {
                    for m in ms {
                        if store::meter(tx, m)?.is_none() {
                            return Err(LedgerError::UnknownMeter(m.clone()));
                        }
                    }
                    ms.iter().map(|m| m.as_str().to_string()).collect()
                }
            };
            if meters.is_empty() {
                return Err(ota_err(OtaError::Other("the rollout has no meters".into())));
            }
            let id = store::insert_rollout(tx, version, &meters, *max_failure_percent, *at)?;
            store::append_event(
                tx,
                "ota",
                None,
                *at,
                &json!({"rollout": id, "version": version, "state": "started", "meters": meters.len(), "maxFailurePercent": max_failure_percent}),
            )?;
            Ok(Some(id))
        }
        OtaOp::Offered { meter, rollout, at } => {
            if store::ota_meter_state(tx, *rollout, meter.as_str())?.as_deref() == Some("pending") {
                store::set_ota_meter(tx, *rollout, meter.as_str(), "offered", 0, None, *at)?;
                let version = store::rollout(tx, *rollout)?.map(|r| r.version);
                store::append_event(
                    tx,
                    "ota",
                    Some(meter),
                    *at,
                    &json!({"rollout": rollout, "version": version, "state": "offered", "offset": 0, "error": null}),
                )?;
            }
            Ok(None)
        }
        OtaOp::Status { meter, report, at } => apply_status(tx, meter, report, *at),
    }
}

fn apply_status(
    tx: &Connection,
    meter: &MeterId,
    r: &StatusReport,
    at: i64,
) -> Result<Option<i64>, LedgerError> {
    let rollout = store::current_rollout(tx)?.filter(|ro| ro.version == r.version);
    let mut data = json!({"rollout": null, "version": r.version, "state": r.state, "offset": r.offset, "error": r.error});
    if let Some(ro) = &rollout {
        let now = store::ota_meter_state(tx, ro.id, meter.as_str())?;
        // A meter's final state stays (a repeated `confirmed` after the trial, say); so does
        // a meter outside the rollout.
        if now.is_some_and(|s| !FINAL_STATES.contains(&s.as_str())) {
            store::set_ota_meter(
                tx,
                ro.id,
                meter.as_str(),
                &r.state,
                r.offset,
                r.error.as_deref(),
                at,
            )?;
            data["rollout"] = json!(ro.id);
            store::append_event(tx, "ota", Some(meter), at, &data)?;
            settle_rollout(tx, ro, at)?;
            return Ok(None);
        }
    }
    // Not part of a live rollout: kept as an event, nothing else changes.
    store::append_event(tx, "ota", Some(meter), at, &data)?;
    Ok(None)
}

/// Pauses a rollout whose failures passed its threshold, or marks it done when every meter
/// finished.
fn settle_rollout(tx: &Connection, ro: &RolloutRow, at: i64) -> Result<(), LedgerError> {
    let counts = store::rollout_counts(tx, ro.id)?;
    let total: i64 = counts.values().sum();
    let failed = counts.get("failed").copied().unwrap_or(0)
        + counts.get("rolled_back").copied().unwrap_or(0);
    let finished: i64 = FINAL_STATES
        .iter()
        .map(|s| counts.get(*s).copied().unwrap_or(0))
        .sum();
    if ro.state == "active" && failed * 100 > ro.max_failure_percent * total {
        let reason = format!(
            "{failed} of {total} meters failed or rolled back (more than {}%)",
            ro.max_failure_percent
        );
        store::set_rollout_state(tx, ro.id, "paused", Some(&reason), at)?;
        store::append_event(
            tx,
            "ota",
            None,
            at,
            &json!({"rollout": ro.id, "version": ro.version, "state": "paused", "reason": reason}),
        )?;
    } else if finished == total && ro.state != "done" {
        store::set_rollout_state(tx, ro.id, "done", ro.reason.as_deref(), at)?;
        store::append_event(
            tx,
            "ota",
            None,
            at,
            &json!({"rollout": ro.id, "version": ro.version, "state": "done", "counts": counts}),
        )?;
    }
    Ok(())
}

// ---- serving ----

/// The rollout being served, as the database had it at the last refresh.
struct Live {
    rollout: RolloutRow,
    firmware: FirmwareRow,
    meters: HashMap<String, String>,
    image: Arc<tokio::sync::OnceCell<Arc<[u8]>>>,
}

/// What a chunk request gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkAnswer {
    Data(Bytes),
    Busy(Bytes),
    NoOffer(Bytes),
}

/// The broker's OTA state: the rollout being served, its image, the download slots.
pub struct OtaServer {
    config: OtaConfig,
    dir: PathBuf,
    live: Mutex<Option<Arc<Live>>>,
    downloads: Mutex<HashMap<MeterId, Instant>>,
    /// Rung by the API after it started a rollout, so it is announced at once.
    pub wake: tokio::sync::Notify,
}

impl OtaServer {
    pub fn new(config: OtaConfig, data_dir: &Path) -> OtaServer {
        OtaServer {
            config,
            dir: data_dir.join(FIRMWARE_DIR),
            live: Mutex::new(None),
            downloads: Mutex::new(HashMap::new()),
            wake: tokio::sync::Notify::new(),
        }
    }

    fn live(&self) -> Option<Arc<Live>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reads the current rollout (on the caller's read connection). Returns the meters to
    /// announce to: every unfinished meter of a rollout that became active since the last
    /// refresh (a new one, or one resumed).
    pub fn refresh(&self, conn: &Connection) -> Result<Vec<(MeterId, Bytes, i64)>, StoreError> {
        let current = store::current_rollout(conn)?;
        let before = self.live();
        let Some(ro) = current.filter(|r| r.state == "active") else {
            *self.live.lock().unwrap_or_else(|e| e.into_inner()) = None;
            return Ok(Vec::new());
        };
        let Some(fw) = store::firmware(conn, &ro.version)? else {
            *self.live.lock().unwrap_or_else(|e| e.into_inner()) = None;
            return Ok(Vec::new());
        };
        let meters: HashMap<String, String> = store::rollout_meters(conn, ro.id)?
            .into_iter()
            .map(|m| (m.meter, m.state))
            .collect();
        let image = match &before {
            Some(b) if b.firmware.version == fw.version => b.image.clone(),
            _ => Arc::new(tokio::sync::OnceCell::new()),
        };
        let is_new = before.as_ref().is_none_or(|b| b.rollout.id != ro.id);
        let payload = offer_payload(&fw, ro.id, self.config.chunk_size);
        let announce = if is_new {
            meters
                .iter()
                .filter(|(_, s)| !FINAL_STATES.contains(&s.as_str()))
                .filter_map(|(m, _)| MeterId::parse(m).ok())
                .map(|m| (m, payload.clone(), ro.id))
                .collect()
        } else {
            Vec::new()
        };
        *self.live.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(Live {
            rollout: ro,
            firmware: fw,
            meters,
            image,
        }));
        Ok(announce)
    }

    /// The offer for `meter` when it subscribes: `(payload, rollout, was pending)`.
    pub fn offer_for(&self, meter: &MeterId) -> Option<(Bytes, i64, bool)> {
        let live = self.live()?;
        let state = live.meters.get(meter.as_str())?;
        if FINAL_STATES.contains(&state.as_str()) {
            return None;
        }
        Some((
            offer_payload(&live.firmware, live.rollout.id, self.config.chunk_size),
            live.rollout.id,
            state == "pending",
        ))
    }

    /// The meter finished (or failed) its download: its slot is free.
    pub fn release(&self, meter: &MeterId) {
        self.downloads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(meter);
    }

    /// Answers a chunk request. The image is read once, on the blocking pool.
    pub async fn chunk(&self, meter: &MeterId, r: &ChunkRequest) -> Result<ChunkAnswer, OtaError> {
        let no_offer =
            || ChunkAnswer::NoOffer(Bytes::copy_from_slice(&chunk_header(r.offset, 0, 2)));
        let Some(live) = self.live() else {
            return Ok(no_offer());
        };
        let in_rollout = live
            .meters
            .get(meter.as_str())
            .is_some_and(|s| !FINAL_STATES.contains(&s.as_str()));
        let size = live.firmware.size as u64;
        let end = u64::from(r.offset) + u64::from(r.len);
        if !in_rollout
            || live.firmware.version != r.version
            || r.len == 0
            || r.len > self.config.chunk_size
            || end > size
        {
            return Ok(no_offer());
        }
        {
            let now = Instant::now();
            let mut d = self.downloads.lock().unwrap_or_else(|e| e.into_inner());
            d.retain(|_, last| now.duration_since(*last) < DOWNLOAD_IDLE);
            if !d.contains_key(meter) && d.len() >= self.config.max_downloads {
                return Ok(ChunkAnswer::Busy(Bytes::copy_from_slice(&chunk_header(
                    r.offset, 0, 1,
                ))));
            }
            d.insert(meter.clone(), now);
        }
        let path = self.dir.join(&live.firmware.file);
        let expected = live.firmware.sha256.clone();
        let image = live
            .image
            .get_or_try_init(|| async move {
                tokio::task::spawn_blocking(move || load_image(&path, &expected))
                    .await
                    .map_err(|e| OtaError::Other(e.to_string()))?
            })
            .await?;
        let mut out = Vec::with_capacity(CHUNK_HEADER + usize::from(r.len));
        out.extend_from_slice(&chunk_header(r.offset, r.len, 0));
        out.extend_from_slice(&image[r.offset as usize..end as usize]);
        Ok(ChunkAnswer::Data(Bytes::from(out)))
    }
}

/// Reads a stored image and checks it is still the one added.
fn load_image(path: &Path, sha256: &str) -> Result<Arc<[u8]>, OtaError> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    if hex(&Sha256::digest(&bytes)) != sha256 {
        return Err(OtaError::Other(format!(
            "{}: the stored image changed since it was added (sha256 differs)",
            path.display()
        )));
    }
    Ok(Arc::from(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signed_message_and_chunk_header_are_the_meters_own() {
        let sha = [3u8; 32];
        let mut buf = [0u8; meter_core::ota::signed_len(MAX_VERSION)];
        let n = meter_core::ota::signed_message("1.2.3-rc1", 4242, &sha, &mut buf);
        assert_eq!(signed_message("1.2.3-rc1", 4242, &sha), buf[..n]);
        assert_eq!(
            chunk_header(70_000, 1024, 1),
            meter_core::ota::chunk_header(70_000, 1024, 1)
        );
    }

    #[test]
    fn a_signature_made_here_verifies_on_the_meter() {
        let (pkcs8, public) = generate_key().unwrap();
        let pair = Ed25519KeyPair::from_pkcs8(&pkcs8).unwrap();
        let sha = [9u8; 32];
        let sig: [u8; 64] = pair
            .sign(&signed_message("2.0.0", 100, &sha))
            .as_ref()
            .try_into()
            .unwrap();
        assert!(verify(&public, "2.0.0", 100, &sha, &sig));
        assert!(meter_core::ota::verify_signature(
            &public, "2.0.0", 100, &sha, &sig
        ));
        assert!(!meter_core::ota::verify_signature(
            &public, "2.0.1", 100, &sha, &sig
        ));
    }

    #[test]
    fn meter_reports_are_parsed_strictly() {
        assert!(ChunkRequest::parse(br#"{"version":"1.0","offset":0,"len":512}"#).is_ok());
        assert!(ChunkRequest::parse(br#"{"version":"1 0","offset":0,"len":512}"#).is_err());
        assert!(ChunkRequest::parse(br#"{"version":"1.0","offset":-1,"len":512}"#).is_err());
        assert!(StatusReport::parse(br#"{"state":"confirmed","version":"1.0"}"#).is_ok());
        assert!(StatusReport::parse(br#"{"state":"pending","version":"1.0"}"#).is_err());
        assert!(
            StatusReport::parse(br#"{"state":"failed","version":"1.0","error":"a\nb"}"#).is_err()
        );
    }
}
