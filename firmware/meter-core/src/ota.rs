//! Over-the-air updates: the meter's side of the OTA protocol (firmware/README.md, "Over-the-air
//! updates") as a state machine without I/O.
//!
//! The board implements [`OtaFlash`] (the inactive slot, the boot selection, a place for the
//! [`OtaState`] record); this module decides what to write, when the image is good (SHA-256 of
//! what is on flash, Ed25519 by the site's release key over version, size and hash), when to
//! switch slots and when to confirm. Every transition is saved before the meter acts on it, so
//! a power cut at any step leaves a state [`Ota::boot`] continues from.
//!
//! Architecture invariant: the running slot is never written, and the boot slot is switched
//! only to an image whose hash and signature were checked on the bytes read back from flash.

use ed25519_dalek::{Signature, VerifyingKey};
use heapless::Vec as HVec;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Longest version string (bytes of `[0-9A-Za-z.+_-]`).
pub const MAX_VERSION: usize = 24;
/// Largest chunk a meter asks for (it must also fit the meter's MQTT receive buffer).
pub const MAX_CHUNK: u16 = 4096;
/// The chunk header: offset u32 BE, length u16 BE, code u8, reserved u8.
pub const CHUNK_HEADER: usize = 8;
/// The first bytes of the signed message; the last byte is the format's version.
pub const SIGNED_PREFIX: &[u8; 9] = b"umeme-fw\x01";
/// Length of the signed message for a version of `n` bytes.
pub const fn signed_len(n: usize) -> usize {
    SIGNED_PREFIX.len() + 1 + n + 4 + 32
}
/// Downloads started again from 0 after a hash mismatch (a corrupted chunk) before giving up.
pub const MAX_ATTEMPTS: u8 = 3;
/// Bytes of a saved [`OtaState`].
pub const STATE_LEN: usize = 140;
const STATE_MAGIC: u8 = 0xA7;

pub type Version = heapless::String<MAX_VERSION>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OtaError {
    #[error("offer is not valid JSON or a field is out of range")]
    MalformedOffer,
    #[error("chunk shorter than its header or its declared length")]
    MalformedChunk,
    #[error("image does not fit the inactive slot")]
    TooLarge,
    #[error("image sha256 differs from the offer")]
    BadHash,
    #[error("release signature does not verify")]
    BadSignature,
    #[error("flash operation failed")]
    Flash,
    #[error("saved OTA state is unreadable")]
    BadState,
    /// The board refused the offer: its version names another meter (a board whose identity
    /// is built into the image takes only versions ending in `+<its meter number>`).
    #[error("image built for another meter")]
    OtherMeter,
}

impl OtaError {
    /// The `error` of an `ota/status`.
    pub fn code(self) -> &'static str {
        match self {
            OtaError::MalformedOffer => "malformed_offer",
            OtaError::MalformedChunk => "malformed_chunk",
            OtaError::TooLarge => "too_large",
            OtaError::BadHash => "bad_hash",
            OtaError::BadSignature => "bad_signature",
            OtaError::Flash => "flash",
            OtaError::BadState => "bad_state",
            OtaError::OtherMeter => "other_meter",
        }
    }

    fn to_u8(self) -> u8 {
        self as u8 + 1
    }

    fn from_u8(b: u8) -> Option<Option<OtaError>> {
        use OtaError::*;
        Some(match b {
            0 => None,
            1 => Some(MalformedOffer),
            2 => Some(MalformedChunk),
            3 => Some(TooLarge),
            4 => Some(BadHash),
            5 => Some(BadSignature),
            6 => Some(Flash),
            7 => Some(BadState),
            8 => Some(OtherMeter),
            _ => return None,
        })
    }
}

/// What the board does for the state machine. Errors are the board's; the machine turns any of
/// them into [`OtaError::Flash`].
pub trait OtaFlash {
    type Error;
    /// Erases the inactive slot for an image of `size` bytes; `Ok(false)` when it does not fit.
    fn erase_inactive(&mut self, size: u32) -> Result<bool, Self::Error>;
    /// Writes `data` into the inactive slot at `offset` (never the running slot).
    fn write_inactive(&mut self, offset: u32, data: &[u8]) -> Result<(), Self::Error>;
    /// Reads the inactive slot at `offset` into `buf`.
    fn read_inactive(&mut self, offset: u32, buf: &mut [u8]) -> Result<(), Self::Error>;
    /// Makes the inactive slot boot at the next reset, on trial: the bootloader goes back to
    /// the current slot if the new image resets before [`OtaFlash::confirm_running`].
    fn set_boot_slot_trial(&mut self) -> Result<(), Self::Error>;
    /// Marks the running image good (ends the trial).
    fn confirm_running(&mut self) -> Result<(), Self::Error>;
    /// Keeps the state record on flash (power-cut safe: the old record or the new one).
    fn save_state(&mut self, state: &[u8; STATE_LEN]) -> Result<(), Self::Error>;
    /// The last saved state record, if any.
    fn load_state(&mut self) -> Result<Option<[u8; STATE_LEN]>, Self::Error>;
}

/// An update as offered on `command/ota`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Offer {
    pub version: Version,
    pub size: u32,
    pub sha256: [u8; 32],
    pub signature: [u8; 64],
    pub chunk_size: u16,
    pub rollout: u32,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct OfferWire<'a> {
    version: &'a str,
    size: u32,
    sha256: &'a str,
    signature: &'a str,
    chunk_size: u16,
    #[serde(default)]
    rollout: u32,
}

fn hex_into(s: &str, out: &mut [u8]) -> Option<()> {
    let b = s.as_bytes();
    if b.len() != out.len() * 2 {
        return None;
    }
    fn nib(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = nib(b[2 * i])? << 4 | nib(b[2 * i + 1])?;
    }
    Some(())
}

/// Whether `v` is a version string the protocol carries.
pub fn valid_version(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= MAX_VERSION
        && v.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'+' | b'_' | b'-'))
}

impl Offer {
    /// Parses a `command/ota` payload.
    pub fn parse(payload: &[u8]) -> Result<Offer, OtaError> {
        let (w, _) = serde_json_core::from_slice::<OfferWire<'_>>(payload)
            .map_err(|_| OtaError::MalformedOffer)?;
        if !valid_version(w.version) || w.size == 0 || w.chunk_size == 0 {
            return Err(OtaError::MalformedOffer);
        }
        let mut sha256 = [0; 32];
        let mut signature = [0; 64];
        hex_into(w.sha256, &mut sha256).ok_or(OtaError::MalformedOffer)?;
        hex_into(w.signature, &mut signature).ok_or(OtaError::MalformedOffer)?;
        Ok(Offer {
            version: Version::try_from(w.version).map_err(|_| OtaError::MalformedOffer)?,
            size: w.size,
            sha256,
            signature,
            chunk_size: w.chunk_size.min(MAX_CHUNK),
            rollout: w.rollout,
        })
    }

    fn same_image(&self, other: &Offer) -> bool {
        self.version == other.version && self.size == other.size && self.sha256 == other.sha256
    }
}

/// The message the release key signs: prefix, version (length-prefixed), size, sha256.
pub fn signed_message(version: &str, size: u32, sha256: &[u8; 32], out: &mut [u8]) -> usize {
    let n = version.len().min(MAX_VERSION);
    let mut i = 0;
    let mut put = |b: &[u8]| {
        out[i..i + b.len()].copy_from_slice(b);
        i += b.len();
    };
    put(SIGNED_PREFIX);
    put(&[n as u8]);
    put(&version.as_bytes()[..n]);
    put(&size.to_be_bytes());
    put(sha256);
    i
}

/// Whether `version` names the meter `meter_no` as its build metadata (`1.4.0+METER001`):
/// the convention for images that carry one meter's identity (see [`OtaError::OtherMeter`]).
pub fn version_is_for_meter(version: &str, meter_no: &str) -> bool {
    version
        .split_once('+')
        .is_some_and(|(release, meter)| !release.is_empty() && meter == meter_no)
}

/// Checks `signature` over the signed message by the release key `public_key`.
pub fn verify_signature(
    public_key: &[u8; 32],
    version: &str,
    size: u32,
    sha256: &[u8; 32],
    signature: &[u8; 64],
) -> bool {
    let Ok(key) = VerifyingKey::from_bytes(public_key) else {
        return false;
    };
    let mut msg = [0u8; signed_len(MAX_VERSION)];
    let n = signed_message(version, size, sha256, &mut msg);
    key.verify_strict(&msg[..n], &Signature::from_bytes(signature))
        .is_ok()
}

/// A `command/ota/chunk` payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chunk<'a> {
    Data {
        offset: u32,
        bytes: &'a [u8],
    },
    /// The gateway serves its maximum of meters: ask again later.
    Busy,
    /// The gateway has no offer for this meter any more: stop.
    NoOffer,
}

impl<'a> Chunk<'a> {
    pub fn parse(payload: &'a [u8]) -> Result<Chunk<'a>, OtaError> {
        if payload.len() < CHUNK_HEADER {
            return Err(OtaError::MalformedChunk);
        }
        let offset = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
        let len = usize::from(u16::from_be_bytes([payload[4], payload[5]]));
        match payload[6] {
            0 if payload.len() == CHUNK_HEADER + len => Ok(Chunk::Data {
                offset,
                bytes: &payload[CHUNK_HEADER..],
            }),
            1 => Ok(Chunk::Busy),
            2 => Ok(Chunk::NoOffer),
            _ => Err(OtaError::MalformedChunk),
        }
    }
}

/// Writes a chunk header (the gateway's side; here so both ends share one definition).
pub fn chunk_header(offset: u32, len: u16, code: u8) -> [u8; CHUNK_HEADER] {
    let o = offset.to_be_bytes();
    let l = len.to_be_bytes();
    [o[0], o[1], o[2], o[3], l[0], l[1], code, 0]
}

/// Where an update stands; the names are the `state` of `ota/status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    Idle = 0,
    Downloading = 1,
    Verified = 2,
    /// The boot slot is switched on trial (persisted before the reset, kept during the trial).
    Rebooting = 3,
    Confirmed = 4,
    RolledBack = 5,
    Failed = 6,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Downloading => "downloading",
            Phase::Verified => "verified",
            Phase::Rebooting => "rebooting",
            Phase::Confirmed => "confirmed",
            Phase::RolledBack => "rolled_back",
            Phase::Failed => "failed",
        }
    }

    fn from_u8(b: u8) -> Option<Phase> {
        use Phase::*;
        [
            Idle,
            Downloading,
            Verified,
            Rebooting,
            Confirmed,
            RolledBack,
            Failed,
        ]
        .into_iter()
        .find(|p| *p as u8 == b)
    }
}

/// The persisted state: the phase, the offer it is about, and how far the download is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OtaState {
    pub phase: Phase,
    pub offer: Option<Offer>,
    /// Bytes of the image written to the inactive slot (each one before this moved past it).
    pub offset: u32,
    pub error: Option<OtaError>,
    /// Downloads started for this offer (a hash mismatch starts one again).
    pub attempts: u8,
}

impl OtaState {
    const IDLE: OtaState = OtaState {
        phase: Phase::Idle,
        offer: None,
        offset: 0,
        error: None,
        attempts: 0,
    };

    pub fn to_bytes(&self) -> [u8; STATE_LEN] {
        let mut b = [0u8; STATE_LEN];
        b[0] = STATE_MAGIC;
        b[1] = self.phase as u8;
        b[2] = self.error.map_or(0, OtaError::to_u8);
        b[3] = self.attempts;
        b[4..8].copy_from_slice(&self.offset.to_be_bytes());
        if let Some(o) = &self.offer {
            b[8..12].copy_from_slice(&o.size.to_be_bytes());
            b[12..16].copy_from_slice(&o.rollout.to_be_bytes());
            b[16..18].copy_from_slice(&o.chunk_size.to_be_bytes());
            b[18] = o.version.len() as u8;
            b[20..52].copy_from_slice(&o.sha256);
            b[52..116].copy_from_slice(&o.signature);
            b[116..116 + o.version.len()].copy_from_slice(o.version.as_bytes());
        }
        b
    }

    pub fn from_bytes(b: &[u8; STATE_LEN]) -> Result<OtaState, OtaError> {
        let phase = Phase::from_u8(b[1]).ok_or(OtaError::BadState)?;
        let error = OtaError::from_u8(b[2]).ok_or(OtaError::BadState)?;
        if b[0] != STATE_MAGIC {
            return Err(OtaError::BadState);
        }
        let u32_at = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let vlen = usize::from(b[18]);
        let offer = if vlen == 0 {
            None
        } else {
            let v = core::str::from_utf8(b.get(116..116 + vlen).ok_or(OtaError::BadState)?)
                .map_err(|_| OtaError::BadState)?;
            let mut sha256 = [0; 32];
            sha256.copy_from_slice(&b[20..52]);
            let mut signature = [0; 64];
            signature.copy_from_slice(&b[52..116]);
            Some(Offer {
                version: Version::try_from(v).map_err(|_| OtaError::BadState)?,
                size: u32_at(8),
                rollout: u32_at(12),
                chunk_size: u16::from_be_bytes([b[16], b[17]]),
                sha256,
                signature,
            })
        };
        Ok(OtaState {
            phase,
            offer,
            offset: u32_at(4),
            error,
            attempts: b[3],
        })
    }
}

/// An `ota/status` report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    pub phase: Phase,
    pub version: Version,
    pub offset: u32,
    pub error: Option<OtaError>,
}

#[derive(Serialize)]
struct StatusWire<'a> {
    state: &'a str,
    version: &'a str,
    offset: u32,
    error: Option<&'a str>,
}

impl Status {
    /// The `ota/status` JSON into `buf`; its length.
    pub fn to_json(&self, buf: &mut [u8]) -> Option<usize> {
        serde_json_core::to_slice(
            &StatusWire {
                state: self.phase.name(),
                version: &self.version,
                offset: self.offset,
                error: self.error.map(OtaError::code),
            },
            buf,
        )
        .ok()
    }
}

#[derive(Serialize)]
struct RequestWire<'a> {
    version: &'a str,
    offset: u32,
    len: u16,
}

/// What the board does next, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Publish `ota/request` for these bytes (and ask again after a timeout without them).
    Request { offset: u32, len: u16 },
    /// Publish `ota/status`.
    Report(Status),
    /// Ask again later: the gateway is busy.
    Backoff,
    /// Reset the board now (the boot slot is switched).
    Reset,
}

pub type Actions = HVec<Action, 4>;

/// The OTA state machine of one meter.
pub struct Ota<F: OtaFlash> {
    flash: F,
    public_key: [u8; 32],
    running: Version,
    state: OtaState,
    /// The new image runs on trial: it confirms once the meter has reconnected and reported.
    trial: bool,
    /// The largest chunk this meter asks for (its MQTT receive buffer), whatever the offer's
    /// `chunkSize` allows.
    max_chunk: u16,
}

impl<F: OtaFlash> Ota<F> {
    /// Starts at boot from the saved state. `running` is the version of the image that booted;
    /// `public_key` the release key built into it.
    pub fn boot(mut flash: F, running: &str, public_key: [u8; 32]) -> (Ota<F>, Actions) {
        let state = match flash.load_state() {
            Ok(Some(b)) => OtaState::from_bytes(&b).unwrap_or(OtaState::IDLE),
            _ => OtaState::IDLE,
        };
        let mut ota = Ota {
            flash,
            public_key,
            running: Version::try_from(running).unwrap_or_default(),
            state,
            trial: false,
            max_chunk: MAX_CHUNK,
        };
        let mut out = Actions::new();
        let new_runs = ota
            .state
            .offer
            .as_ref()
            .is_some_and(|o| o.version == ota.running);
        match ota.state.phase {
            // The switch happened (perhaps the power went before `Rebooting` was saved): this
            // is the trial boot, or a trial boot again after a confirm whose record was lost.
            Phase::Verified | Phase::Rebooting if new_runs => ota.trial = true,
            // Back on the old image: the trial image reset before it confirmed.
            Phase::Rebooting => {
                let _ = ota.set(Phase::RolledBack, None);
                ota.report(&mut out);
            }
            // Verified but not switched yet: check the bytes again, then switch.
            Phase::Verified => ota.finish_download(&mut out),
            // Nothing written yet, or the erase may not have happened: erase again.
            Phase::Downloading if ota.state.offset == 0 => ota.start_download(&mut out),
            Phase::Downloading => match ota.next_request() {
                Some(a) => {
                    let _ = out.push(a);
                }
                None => ota.finish_download(&mut out),
            },
            _ => {}
        }
        (ota, out)
    }

    pub fn state(&self) -> &OtaState {
        &self.state
    }

    pub fn flash(&self) -> &F {
        &self.flash
    }

    pub fn flash_mut(&mut self) -> &mut F {
        &mut self.flash
    }

    /// Gives the board back (the simulator resets it and boots a new machine from it).
    pub fn into_flash(self) -> F {
        self.flash
    }

    /// Asks for chunks of at most `max` bytes (at least 1), for a board whose MQTT receive buffer
    /// holds less than the largest `chunkSize` an offer may carry. Requests stay within the
    /// protocol: `len` at most `chunkSize`.
    pub fn set_max_chunk(&mut self, max: u16) {
        self.max_chunk = max.max(1);
    }

    /// Whether the running image is on trial (not yet confirmed).
    pub fn on_trial(&self) -> bool {
        self.trial
    }

    /// The request to repeat after a timeout, while downloading.
    pub fn next_request(&self) -> Option<Action> {
        let o = self.state.offer.as_ref()?;
        if self.state.phase != Phase::Downloading || self.state.offset >= o.size {
            return None;
        }
        let chunk = o.chunk_size.min(self.max_chunk);
        let len = (o.size - self.state.offset).min(u32::from(chunk)) as u16;
        Some(Action::Request {
            offset: self.state.offset,
            len,
        })
    }

    /// The `ota/request` JSON for a request into `buf`; its length.
    pub fn request_json(&self, offset: u32, len: u16, buf: &mut [u8]) -> Option<usize> {
        let o = self.state.offer.as_ref()?;
        serde_json_core::to_slice(
            &RequestWire {
                version: &o.version,
                offset,
                len,
            },
            buf,
        )
        .ok()
    }

    /// A `command/ota` payload arrived.
    pub fn on_offer(&mut self, payload: &[u8]) -> Actions {
        let mut out = Actions::new();
        let Ok(offer) = Offer::parse(payload) else {
            return out;
        };
        if offer.version == self.running {
            // Already there (an offer repeated after the confirm, or a meter built with it).
            if !self.trial {
                let _ = out.push(Action::Report(Status {
                    phase: Phase::Confirmed,
                    version: offer.version,
                    offset: offer.size,
                    error: None,
                }));
            }
            return out;
        }
        let same = self
            .state
            .offer
            .as_ref()
            .is_some_and(|o| o.same_image(&offer));
        match self.state.phase {
            Phase::Downloading if same => {
                // Resume from what flash holds.
                self.report(&mut out);
                if let Some(a) = self.next_request() {
                    let _ = out.push(a);
                }
                return out;
            }
            // Waiting for its reset or its trial: nothing to download.
            Phase::Verified | Phase::Rebooting if same => return out,
            _ => {}
        }
        if self.trial {
            // Never replace the image on trial before it confirmed.
            return out;
        }
        self.state = OtaState {
            phase: Phase::Downloading,
            offer: Some(offer),
            offset: 0,
            error: None,
            attempts: 1,
        };
        self.start_download(&mut out);
        out
    }

    fn start_download(&mut self, out: &mut Actions) {
        let size = self.state.offer.as_ref().map_or(0, |o| o.size);
        match self.flash.erase_inactive(size) {
            Ok(true) => {}
            Ok(false) => return self.fail(OtaError::TooLarge, out),
            Err(_) => return self.fail(OtaError::Flash, out),
        }
        self.state.offset = 0;
        if self.save().is_err() {
            return self.fail(OtaError::Flash, out);
        }
        self.report(out);
        if let Some(a) = self.next_request() {
            let _ = out.push(a);
        }
    }

    /// A `command/ota/chunk` payload arrived.
    pub fn on_chunk(&mut self, payload: &[u8]) -> Actions {
        let mut out = Actions::new();
        if self.state.phase != Phase::Downloading {
            return out;
        }
        let (offset, bytes) = match Chunk::parse(payload) {
            Ok(Chunk::Data { offset, bytes }) => (offset, bytes),
            Ok(Chunk::Busy) => {
                let _ = out.push(Action::Backoff);
                return out;
            }
            Ok(Chunk::NoOffer) => {
                let _ = self.set(Phase::Idle, None);
                return out;
            }
            Err(_) => return out,
        };
        let Some(Action::Request { offset: want, len }) = self.next_request() else {
            return out;
        };
        // Out of order, repeated or of another length: not the bytes asked for next.
        if offset != want || bytes.len() != usize::from(len) {
            return out;
        }
        if self.flash.write_inactive(offset, bytes).is_err() {
            self.fail(OtaError::Flash, &mut out);
            return out;
        }
        // Written first, then the offset: a power cut in between writes this chunk again.
        self.state.offset += u32::from(len);
        if self.save().is_err() {
            self.fail(OtaError::Flash, &mut out);
            return out;
        }
        match self.next_request() {
            Some(a) => {
                let _ = out.push(a);
            }
            None => self.finish_download(&mut out),
        }
        out
    }

    /// Hash the image as flash holds it, check the release signature, switch on trial.
    fn finish_download(&mut self, out: &mut Actions) {
        let Some(o) = self.state.offer.clone() else {
            return;
        };
        let mut h = Sha256::new();
        let mut buf = [0u8; 256];
        let mut at = 0;
        while at < o.size {
            let n = (o.size - at).min(buf.len() as u32) as usize;
            if self.flash.read_inactive(at, &mut buf[..n]).is_err() {
                return self.fail(OtaError::Flash, out);
            }
            h.update(&buf[..n]);
            at += n as u32;
        }
        let digest: [u8; 32] = h.finalize().into();
        if digest != o.sha256 {
            if self.state.attempts < MAX_ATTEMPTS {
                // A chunk was corrupted on the way: fetch the whole image again.
                self.state.attempts += 1;
                self.state.phase = Phase::Downloading;
                return self.start_download(out);
            }
            return self.fail(OtaError::BadHash, out);
        }
        if !verify_signature(
            &self.public_key,
            &o.version,
            o.size,
            &o.sha256,
            &o.signature,
        ) {
            return self.fail(OtaError::BadSignature, out);
        }
        if self.set(Phase::Verified, None).is_err() {
            return self.fail(OtaError::Flash, out);
        }
        self.report(out);
        if self.flash.set_boot_slot_trial().is_err() {
            return self.fail(OtaError::Flash, out);
        }
        if self.set(Phase::Rebooting, None).is_err() {
            return self.fail(OtaError::Flash, out);
        }
        self.report(out);
        let _ = out.push(Action::Reset);
    }

    /// The meter reconnected and its first report was acknowledged: a trial image is good.
    pub fn on_reported(&mut self) -> Actions {
        let mut out = Actions::new();
        if !self.trial {
            return out;
        }
        if self.flash.confirm_running().is_err() {
            return out;
        }
        self.trial = false;
        let _ = self.set(Phase::Confirmed, None);
        self.report(&mut out);
        out
    }

    /// The current status, to publish after a reconnect.
    pub fn status(&self) -> Option<Status> {
        let o = self.state.offer.as_ref()?;
        Some(Status {
            phase: self.state.phase,
            version: o.version.clone(),
            offset: self.state.offset,
            error: self.state.error,
        })
    }

    fn report(&self, out: &mut Actions) {
        if let Some(s) = self.status() {
            let _ = out.push(Action::Report(s));
        }
    }

    fn fail(&mut self, e: OtaError, out: &mut Actions) {
        let _ = self.set(Phase::Failed, Some(e));
        self.report(out);
    }

    fn set(&mut self, phase: Phase, error: Option<OtaError>) -> Result<(), ()> {
        self.state.phase = phase;
        self.state.error = error;
        self.save()
    }

    fn save(&mut self) -> Result<(), ()> {
        self.flash
            .save_state(&self.state.to_bytes())
            .map_err(|_| ())
    }
}

#[cfg(test)]
#[path = "ota_tests.rs"]
mod tests;

/// A simulated board for host tests and the simulator: two RAM slots, a bootloader with the
/// ESP-IDF rollback rule, a state record, and power cuts on demand.
#[cfg(any(test, feature = "sim"))]
pub mod sim {
    extern crate std;
    use std::string::String;
    use std::vec::Vec;

    use sha2::{Digest, Sha256};

    use super::{OtaFlash, STATE_LEN};

    const MAGIC: &[u8; 6] = b"UMEFW1";

    /// A bootable simulated image: a header with the version, filler, and the SHA-256 of the
    /// rest appended (as an ESP-IDF app image carries one), which the bootloader checks.
    pub fn make_image(version: &str, len: usize, seed: u8) -> Vec<u8> {
        let mut v = Vec::with_capacity(len.max(64));
        v.extend_from_slice(MAGIC);
        v.push(version.len() as u8);
        v.extend_from_slice(version.as_bytes());
        let mut x = u32::from(seed).wrapping_mul(2_654_435_761).wrapping_add(1);
        while v.len() + 32 < len {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            v.push(x as u8);
        }
        let h: [u8; 32] = Sha256::digest(&v).into();
        v.extend_from_slice(&h);
        v
    }

    /// The version of a bootable image, `None` when the bootloader would refuse it.
    pub fn image_version(bytes: &[u8]) -> Option<String> {
        let body = bytes.get(..bytes.len().checked_sub(32)?)?;
        let h: [u8; 32] = Sha256::digest(body).into();
        if h[..] != bytes[body.len()..] || !body.starts_with(MAGIC) {
            return None;
        }
        let n = usize::from(*body.get(MAGIC.len())?);
        let v = body.get(MAGIC.len() + 1..MAGIC.len() + 1 + n)?;
        String::from_utf8(v.to_vec()).ok()
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Trial {
        None,
        /// Switched: the next reset boots the other slot on trial.
        Pending,
        /// Running on trial: a reset before the confirm goes back.
        Running,
    }

    #[derive(Debug, PartialEq, Eq)]
    pub struct PowerCut;

    /// The board cannot boot: the selected slot holds no valid image.
    #[derive(Debug, PartialEq, Eq)]
    pub struct Bricked;

    #[derive(Clone, Debug)]
    pub struct RamBoard {
        pub slots: [Vec<u8>; 2],
        /// Image bytes as written, per slot (a slot is `slot_size` long).
        pub lens: [usize; 2],
        pub running: usize,
        pub trial: Trial,
        pub state: Option<[u8; STATE_LEN]>,
        pub slot_size: usize,
        /// Mutating flash operations until the power goes (`None`: never). The operation that
        /// meets 0 fails (a write is torn: half of it lands) and so does every one after it.
        pub power_left: Option<u32>,
        /// Mutating operations done so far (to find every step of a run).
        pub ops: u32,
    }

    impl RamBoard {
        /// A board fresh from the factory: `factory` in slot 0, slot 1 empty.
        pub fn new(factory: &[u8], slot_size: usize) -> RamBoard {
            let mut s0 = std::vec![0xFF; slot_size];
            s0[..factory.len()].copy_from_slice(factory);
            RamBoard {
                slots: [s0, std::vec![0xFF; slot_size]],
                lens: [factory.len(), 0],
                running: 0,
                trial: Trial::None,
                state: None,
                slot_size,
                power_left: None,
                ops: 0,
            }
        }

        fn step(&mut self) -> Result<(), PowerCut> {
            self.ops += 1;
            match &mut self.power_left {
                Some(0) => Err(PowerCut),
                Some(n) => {
                    *n -= 1;
                    if *n == 0 {
                        Err(PowerCut)
                    } else {
                        Ok(())
                    }
                }
                None => Ok(()),
            }
        }

        /// Power on (after a cut or a reset): the bootloader picks the slot, as ESP-IDF's does
        /// with rollback enabled, and the running image's version is returned.
        pub fn reset(&mut self) -> Result<String, Bricked> {
            if self.power_left == Some(0) {
                // Power is back after the cut; a cut still to come stays armed.
                self.power_left = None;
            }
            match self.trial {
                Trial::Pending => {
                    self.running = 1 - self.running;
                    self.trial = Trial::Running;
                }
                Trial::Running => {
                    // Reset before the confirm: the trial image is abandoned.
                    self.running = 1 - self.running;
                    self.trial = Trial::None;
                }
                Trial::None => {}
            }
            let r = self.running;
            match image_version(&self.slots[r][..self.lens[r]]) {
                Some(v) => Ok(v),
                // A trial image that does not even start (a wrong build, say): the
                // bootloader (or the watchdog's reset) goes back to the other slot.
                None if self.trial == Trial::Running => {
                    self.running = 1 - r;
                    self.trial = Trial::None;
                    let r = self.running;
                    image_version(&self.slots[r][..self.lens[r]]).ok_or(Bricked)
                }
                None => Err(Bricked),
            }
        }

        pub fn inactive(&self) -> usize {
            1 - self.running
        }
    }

    impl OtaFlash for RamBoard {
        type Error = PowerCut;

        fn erase_inactive(&mut self, size: u32) -> Result<bool, PowerCut> {
            if size as usize > self.slot_size {
                return Ok(false);
            }
            self.step()?;
            let i = self.inactive();
            self.slots[i].fill(0xFF);
            self.lens[i] = size as usize;
            Ok(true)
        }

        fn write_inactive(&mut self, offset: u32, data: &[u8]) -> Result<(), PowerCut> {
            let i = self.inactive();
            let at = offset as usize;
            let r = self.step();
            let n = if r.is_ok() {
                data.len()
            } else {
                data.len() / 2
            };
            if at + data.len() > self.slot_size {
                return Err(PowerCut);
            }
            // NOR flash only clears bits: writing the same bytes again leaves them as they are.
            for (d, s) in self.slots[i][at..at + n].iter_mut().zip(data) {
                *d &= *s;
            }
            r
        }

        fn read_inactive(&mut self, offset: u32, buf: &mut [u8]) -> Result<(), PowerCut> {
            if matches!(self.power_left, Some(0)) {
                return Err(PowerCut);
            }
            let at = offset as usize;
            buf.copy_from_slice(&self.slots[self.inactive()][at..at + buf.len()]);
            Ok(())
        }

        fn set_boot_slot_trial(&mut self) -> Result<(), PowerCut> {
            self.step()?;
            self.trial = Trial::Pending;
            Ok(())
        }

        fn confirm_running(&mut self) -> Result<(), PowerCut> {
            self.step()?;
            if self.trial == Trial::Running {
                self.trial = Trial::None;
            }
            Ok(())
        }

        fn save_state(&mut self, state: &[u8; STATE_LEN]) -> Result<(), PowerCut> {
            // The flash log keeps the old record or the new one, never half of one.
            self.step()?;
            self.state = Some(*state);
            Ok(())
        }

        fn load_state(&mut self) -> Result<Option<[u8; STATE_LEN]>, PowerCut> {
            Ok(self.state)
        }
    }
}
