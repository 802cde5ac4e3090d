//! Drives meter-core's OTA state machine from the MQTT session (firmware/README.md,
//! "Over-the-air updates"): `command/ota` and `command/ota/chunk` in, the machine's actions
//! out, in order, as `ota/request` and `ota/status` publishes; a chunk that does not come
//! within `CHUNK_TIMEOUT` is asked for again; a busy gateway is asked again after
//! `BUSY_BACKOFF`. Actions wait in a queue while the meter is offline (a boot that resumes a
//! download asks for its chunk in the first session). A meter without an identity record
//! refuses offers of another meter's image (a version not ending in `+<METER_ID>`) with
//! `other_meter`.

use core::sync::atomic::{AtomicBool, Ordering};

use embassy_time::{Duration, Instant, Timer};
use esp_println::println;
use meter_core::ota::{version_is_for_meter, Action, Offer, Ota, OtaError, Phase, Status};

use crate::config;
use crate::ota_slots::Board;

/// No chunk this long after a request: ask again (the gateway keeps no state per chunk and
/// sends chunks at QoS 0).
const CHUNK_TIMEOUT: Duration = Duration::from_secs(5);
/// The gateway serves its maximum of meters: ask again after this.
const BUSY_BACKOFF: Duration = Duration::from_secs(30);
/// An image on trial that has not confirmed (reconnected and had a report acknowledged) this
/// long after it booted switches back to the image it replaced.
pub const TRIAL_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// Set once the image on trial has confirmed.
static CONFIRMED: AtomicBool = AtomicBool::new(false);

pub struct Updates {
    ota: Ota<Board>,
    queue: heapless::Deque<Action, 8>,
    /// A request is out since then; a chunk is due.
    asked: Option<Instant>,
    /// Busy: ask again at this time.
    retry_at: Option<Instant>,
    /// The machine said reset (the boot slot is switched): a session that ends before it
    /// could wait for the last status's PUBACK resets anyway.
    reset_pending: bool,
}

impl Updates {
    /// At boot: continues what the saved state says (resume a download, report a rollback, or
    /// wait on trial for the first acknowledged report).
    pub fn boot(max_chunk: u16) -> Updates {
        let board = Board::new(config::OTA_STATE_OFFSET, config::OTA_STATE_SECTORS);
        // Without a release key nothing verifies: offers are refused in `on_offer`.
        let key = config::RELEASE_PUBLIC_KEY.unwrap_or([0; 32]);
        let (mut ota, acts) = Ota::boot(board, config::FW_VERSION, key);
        ota.set_max_chunk(max_chunk);
        let s = ota.state();
        println!(
            "ota: running {}{}, state {}",
            config::FW_VERSION,
            if ota.on_trial() { " on trial" } else { "" },
            s.phase.name()
        );
        let mut u = Updates {
            ota,
            queue: heapless::Deque::new(),
            asked: None,
            retry_at: None,
            reset_pending: false,
        };
        // A resumed download's request was sized before the chunk limit was set: ask again
        // within it.
        for a in acts {
            let a = match a {
                Action::Request { .. } => match u.ota.next_request() {
                    Some(r) => r,
                    None => continue,
                },
                other => other,
            };
            u.extend([a]);
        }
        u
    }

    fn extend(&mut self, acts: impl IntoIterator<Item = Action>) {
        for a in acts {
            if self.queue.push_back(a).is_err() {
                // Bounded: only a storm of offers could fill it; a request is asked again by
                // the timer and a status is sent again with the next offer.
                println!("ota: action queue full, one dropped");
            }
        }
    }

    pub fn on_offer(&mut self, payload: &[u8]) {
        // A meter provisioned with an identity record runs any image as itself. One that is
        // not runs as whatever meter the image was built for, so it takes only its own
        // build's versions (`…+<meter number>`): another meter's image would make it report as
        // that meter.
        if let Ok(o) = Offer::parse(payload) {
            let id = crate::identity::get();
            let ours = id.provisioned
                || o.version.as_str() == config::FW_VERSION
                || version_is_for_meter(&o.version, id.meter_id);
            if !ours {
                println!(
                    "ota: offer of {} refused: not built for this meter",
                    o.version
                );
                self.extend([Action::Report(Status {
                    phase: Phase::Failed,
                    version: o.version,
                    offset: 0,
                    error: Some(OtaError::OtherMeter),
                })]);
                return;
            }
        }
        if config::RELEASE_PUBLIC_KEY.is_none() {
            // Built without a release key: no image can verify, so download nothing.
            if let Ok(o) = Offer::parse(payload) {
                if o.version.as_str() != config::FW_VERSION {
                    self.extend([Action::Report(Status {
                        phase: Phase::Failed,
                        version: o.version,
                        offset: 0,
                        error: Some(OtaError::BadSignature),
                    })]);
                }
            }
            return;
        }
        let acts = self.ota.on_offer(payload);
        self.extend(acts);
    }

    pub fn on_chunk(&mut self, payload: &[u8]) {
        // The request timer keeps running: a chunk that was not the one asked for (repeated,
        // out of order, corrupt) changes nothing, and the request goes again at the timeout.
        let acts = self.ota.on_chunk(payload);
        self.extend(acts);
    }

    /// A report was acknowledged: an image on trial has booted, connected and reported.
    pub fn on_report_acked(&mut self) {
        if self.ota.on_trial() {
            let acts = self.ota.on_reported();
            if !self.ota.on_trial() {
                CONFIRMED.store(true, Ordering::Relaxed);
                println!("ota: {} confirmed", config::FW_VERSION);
            }
            self.extend(acts);
        }
    }

    /// Whether this image runs on trial (not yet confirmed).
    pub fn on_trial(&self) -> bool {
        self.ota.on_trial()
    }

    /// The next action to carry out now, if any (timeouts included).
    pub fn next(&mut self, now: Instant) -> Option<Action> {
        let timed_out = self.asked.is_some_and(|t| now - t >= CHUNK_TIMEOUT);
        let retry = self.retry_at.is_some_and(|t| now >= t);
        if self.queue.is_empty() && (timed_out || retry) {
            self.asked = None;
            self.retry_at = None;
            if let Some(a) = self.ota.next_request() {
                return Some(a);
            }
        }
        self.queue.pop_front()
    }

    /// The machine said reset; the session waits a little for the last status's PUBACK.
    pub fn set_reset_pending(&mut self) {
        self.reset_pending = true;
    }

    pub fn reset_pending(&self) -> bool {
        self.reset_pending
    }

    /// The session ended: an action it popped may not have gone out. A download asks again
    /// for its chunk in the next session at once (the gateway may not offer again).
    pub fn session_ended(&mut self, now: Instant) {
        if self.retry_at.is_none() {
            self.asked = Some(
                now.checked_sub(CHUNK_TIMEOUT)
                    .unwrap_or(Instant::from_ticks(0)),
            );
        }
    }

    /// The request went out at `now`.
    pub fn asked(&mut self, now: Instant) {
        self.asked = Some(now);
        self.retry_at = None;
    }

    /// The gateway is busy: ask again later.
    pub fn busy(&mut self, now: Instant) {
        self.asked = None;
        self.retry_at = Some(now + BUSY_BACKOFF);
    }

    pub fn request_json(&self, offset: u32, len: u16, buf: &mut [u8]) -> Option<usize> {
        self.ota.request_json(offset, len, buf)
    }
}

/// The board's own rollback, for a bootloader without app rollback (espflash's, see
/// firmware/README.md): an image on trial that has not confirmed within `TRIAL_TIMEOUT` of its
/// boot (it cannot reach the gateway, its WiFi or TLS settings are wrong, its session is broken)
/// selects the previous slot again and resets; the previous image then reports `rolled_back`.
/// It does not help an image that crashes before the timeout (each crash restarts the clock).
#[embassy_executor::task]
pub async fn trial_watch() {
    Timer::after(TRIAL_TIMEOUT).await;
    if CONFIRMED.load(Ordering::Relaxed) {
        return;
    }
    println!(
        "ota: {} did not confirm; back to the previous image",
        config::FW_VERSION
    );
    if crate::ota_slots::boot_previous().is_ok() {
        crate::change_and_save(|_| ((), true)).await;
        esp_hal::system::software_reset();
    }
}
