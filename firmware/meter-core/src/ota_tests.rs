//! Host tests of the OTA state machine on the simulated two-slot board.

extern crate std;
use std::format;
use std::string::String;
use std::vec::Vec;

use ed25519_dalek::{Signer, SigningKey};
use sha2::{Digest, Sha256};

use super::sim::{image_version, make_image, RamBoard, Trial};
use super::*;

const OLD: &str = "1.0.0";
const NEW: &str = "1.1.0";
const SLOT: usize = 8192;
const CHUNK: u16 = 256;

fn key() -> SigningKey {
    SigningKey::from_bytes(&[7u8; 32])
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn offer_json(version: &str, image: &[u8], signer: &SigningKey, signed_version: &str) -> Vec<u8> {
    let sha: [u8; 32] = Sha256::digest(image).into();
    let mut msg = [0u8; signed_len(MAX_VERSION)];
    let n = signed_message(signed_version, image.len() as u32, &sha, &mut msg);
    let sig = signer.sign(&msg[..n]).to_bytes();
    format!(
        r#"{{"version":"{version}","size":{},"sha256":"{}","signature":"{}","chunkSize":{CHUNK},"rollout":1}}"#,
        image.len(),
        hex(&sha),
        hex(&sig)
    )
    .into_bytes()
}

fn chunk(image: &[u8], offset: u32, len: u16) -> Vec<u8> {
    let mut v = chunk_header(offset, len, 0).to_vec();
    v.extend_from_slice(&image[offset as usize..offset as usize + usize::from(len)]);
    v
}

fn boot(board: RamBoard) -> (Ota<RamBoard>, Actions, String) {
    let mut board = board;
    let v = board.reset().expect("the board boots");
    let (ota, acts) = Ota::boot(board, &v, key().verifying_key().to_bytes());
    (ota, acts, v)
}

/// Faults the "gateway" of these tests injects.
#[derive(Default)]
struct Faults {
    /// Request numbers left unanswered (a drop: the meter asks again after its timeout).
    drop: Vec<usize>,
    /// Request numbers answered twice.
    duplicate: Vec<usize>,
    /// Request numbers answered first with the chunk after it (out of order).
    ahead: Vec<usize>,
    /// Request numbers whose chunk has a byte flipped.
    corrupt: Vec<usize>,
}

#[derive(Debug, PartialEq, Eq)]
enum Stop {
    Reset,
    Quiet,
    PowerCut,
}

/// Plays the gateway: answers requests from `image` until the meter resets, goes quiet or
/// loses power. Statuses go to `seen`.
fn drive(
    ota: &mut Ota<RamBoard>,
    image: &[u8],
    first: Actions,
    faults: &mut Faults,
    requests: &mut usize,
    seen: &mut Vec<(Phase, Option<OtaError>)>,
) -> Stop {
    let mut queue: Vec<Action> = first.into_iter().collect();
    for _ in 0..100_000 {
        if ota.flash().power_left == Some(0) {
            return Stop::PowerCut;
        }
        let Some(a) = (if queue.is_empty() {
            None
        } else {
            Some(queue.remove(0))
        }) else {
            // Timeout: the meter asks again for what it still needs.
            match ota.next_request() {
                Some(a) => {
                    queue.push(a);
                    continue;
                }
                None => return Stop::Quiet,
            }
        };
        match a {
            Action::Report(s) => seen.push((s.phase, s.error)),
            Action::Reset => return Stop::Reset,
            Action::Backoff => {}
            Action::Request { offset, len } => {
                let n = *requests;
                *requests += 1;
                if faults.drop.contains(&n) {
                    continue;
                }
                if faults.ahead.contains(&n) {
                    let next = offset + u32::from(len);
                    if (next as usize) < image.len() {
                        let l = (image.len() - next as usize).min(usize::from(len)) as u16;
                        queue.extend(ota.on_chunk(&chunk(image, next, l)));
                    }
                }
                let mut c = chunk(image, offset, len);
                if faults.corrupt.contains(&n) {
                    c[CHUNK_HEADER] ^= 0x55;
                }
                queue.extend(ota.on_chunk(&c));
                if faults.duplicate.contains(&n) {
                    queue.extend(ota.on_chunk(&c));
                }
            }
        }
    }
    panic!("the update did not settle");
}

fn new_image() -> Vec<u8> {
    make_image(NEW, 3000, 9)
}

fn factory() -> RamBoard {
    RamBoard::new(&make_image(OLD, 2500, 1), SLOT)
}

/// Runs a whole update to its end: offer, download, reset, trial boot, report, confirm.
/// Returns the version the meter runs and every status it sent.
fn update(
    board: RamBoard,
    offer: &[u8],
    image: &[u8],
    faults: &mut Faults,
) -> (RamBoard, String, Vec<(Phase, Option<OtaError>)>) {
    let mut seen = Vec::new();
    let mut requests = 0;
    let (mut ota, _, _) = boot(board);
    let acts = ota.on_offer(offer);
    match drive(&mut ota, image, acts, faults, &mut requests, &mut seen) {
        Stop::Reset => {}
        Stop::Quiet => {
            let b = ota.flash();
            let v = image_version(&b.slots[b.running][..b.lens[b.running]]).unwrap_or_default();
            return (ota.into_flash(), v, seen);
        }
        Stop::PowerCut => unreachable!(),
    }
    let (mut ota, acts, v) = boot(ota.into_flash());
    assert!(
        acts.is_empty(),
        "a trial boot only waits for its report: {acts:?}"
    );
    assert!(ota.on_trial());
    for a in ota.on_reported() {
        if let Action::Report(s) = a {
            seen.push((s.phase, s.error));
        }
    }
    (ota.into_flash(), v, seen)
}

fn phases(seen: &[(Phase, Option<OtaError>)]) -> Vec<Phase> {
    let mut v: Vec<Phase> = seen.iter().map(|s| s.0).collect();
    v.dedup();
    v
}

#[test]
fn an_update_downloads_verifies_switches_on_trial_and_confirms_after_the_report() {
    let image = new_image();
    let offer = offer_json(NEW, &image, &key(), NEW);
    let (board, v, seen) = update(factory(), &offer, &image, &mut Faults::default());
    assert_eq!(v, NEW);
    assert_eq!(
        phases(&seen),
        [
            Phase::Downloading,
            Phase::Verified,
            Phase::Rebooting,
            Phase::Confirmed
        ]
    );
    assert_eq!(
        board.trial,
        Trial::None,
        "confirmed: no rollback at the next reset"
    );
    let mut board = board;
    assert_eq!(
        board.reset().unwrap(),
        NEW,
        "the new image stays after a reset"
    );
}

#[test]
fn chunks_out_of_order_or_repeated_are_ignored_and_the_image_arrives_intact() {
    let image = new_image();
    let offer = offer_json(NEW, &image, &key(), NEW);
    let mut faults = Faults {
        duplicate: std::vec![0, 3, 5],
        ahead: std::vec![1, 2, 6],
        ..Faults::default()
    };
    let (_, v, seen) = update(factory(), &offer, &image, &mut faults);
    assert_eq!(v, NEW);
    assert!(seen.iter().all(|s| s.1.is_none()), "{seen:?}");
}

#[test]
fn a_download_resumes_from_the_offset_on_flash_after_a_drop_and_a_reboot() {
    let image = new_image();
    let offer = offer_json(NEW, &image, &key(), NEW);
    let (mut ota, _, _) = boot(factory());
    let mut acts = ota.on_offer(&offer);
    // Five chunks arrive, then the connection drops and the meter reboots.
    for _ in 0..5 {
        let Some(Action::Request { offset, len }) = acts
            .iter()
            .find(|a| matches!(a, Action::Request { .. }))
            .cloned()
        else {
            panic!("no request in {acts:?}");
        };
        acts = ota.on_chunk(&chunk(&image, offset, len));
    }
    assert_eq!(ota.state().offset, 5 * u32::from(CHUNK));
    let board = ota.into_flash();
    let (mut ota, acts, _) = boot(board);
    assert_eq!(
        acts.as_slice(),
        [Action::Request {
            offset: 5 * u32::from(CHUNK),
            len: CHUNK
        }],
        "the meter asks from where its flash says it is"
    );
    // The gateway announces again when the meter reconnects: still a resume, not a restart.
    let again = ota.on_offer(&offer);
    assert!(again.contains(&Action::Request {
        offset: 5 * u32::from(CHUNK),
        len: CHUNK
    }));
    let mut buf = [0u8; 96];
    let n = ota.request_json(1280, CHUNK, &mut buf).unwrap();
    assert_eq!(
        core::str::from_utf8(&buf[..n]).unwrap(),
        r#"{"version":"1.1.0","offset":1280,"len":256}"#
    );
    let mut seen = Vec::new();
    let stop = drive(
        &mut ota,
        &image,
        again,
        &mut Faults::default(),
        &mut 0,
        &mut seen,
    );
    assert_eq!(stop, Stop::Reset);
    let (_, _, v) = boot(ota.into_flash());
    assert_eq!(v, NEW);
}

#[test]
fn dropped_requests_are_asked_again_until_the_chunk_arrives() {
    let image = new_image();
    let offer = offer_json(NEW, &image, &key(), NEW);
    let mut faults = Faults {
        drop: std::vec![0, 1, 4, 9],
        ..Faults::default()
    };
    let (_, v, _) = update(factory(), &offer, &image, &mut faults);
    assert_eq!(v, NEW);
}

#[test]
fn a_corrupted_chunk_is_caught_by_the_hash_and_the_image_is_fetched_again() {
    let image = new_image();
    let offer = offer_json(NEW, &image, &key(), NEW);
    let mut faults = Faults {
        corrupt: std::vec![3],
        ..Faults::default()
    };
    let (_, v, seen) = update(factory(), &offer, &image, &mut faults);
    assert_eq!(v, NEW);
    assert!(!seen.iter().any(|s| s.0 == Phase::Failed));
}

#[test]
fn an_image_that_never_matches_its_hash_fails_with_bad_hash_and_the_old_image_keeps_running() {
    let image = new_image();
    let offer = offer_json(NEW, &image, &key(), NEW);
    // Every download gets a corrupted chunk.
    let per_download = image.len().div_ceil(usize::from(CHUNK));
    let mut faults = Faults {
        corrupt: (0..MAX_ATTEMPTS as usize)
            .map(|i| i * per_download + 2)
            .collect(),
        ..Faults::default()
    };
    let (mut board, v, seen) = update(factory(), &offer, &image, &mut faults);
    assert_eq!(v, OLD);
    assert_eq!(seen.last(), Some(&(Phase::Failed, Some(OtaError::BadHash))));
    assert!(!seen.iter().any(|s| s.0 == Phase::Verified));
    assert_eq!(board.trial, Trial::None, "the boot slot never moved");
    assert_eq!(board.reset().unwrap(), OLD);
}

#[test]
fn an_image_signed_by_another_key_fails_with_bad_signature_and_is_never_booted() {
    let image = new_image();
    let offer = offer_json(NEW, &image, &SigningKey::from_bytes(&[8u8; 32]), NEW);
    let (mut board, v, seen) = update(factory(), &offer, &image, &mut Faults::default());
    assert_eq!(v, OLD);
    assert_eq!(
        seen.last(),
        Some(&(Phase::Failed, Some(OtaError::BadSignature)))
    );
    assert_eq!(board.reset().unwrap(), OLD);
}

#[test]
fn a_signed_image_relabelled_with_another_version_fails_the_signature() {
    let image = new_image();
    // Signed as 1.1.0, offered as 9.9.9: the version is inside the signed message.
    let offer = offer_json("9.9.9", &image, &key(), NEW);
    let (_, v, seen) = update(factory(), &offer, &image, &mut Faults::default());
    assert_eq!(v, OLD);
    assert_eq!(
        seen.last(),
        Some(&(Phase::Failed, Some(OtaError::BadSignature)))
    );
}

#[test]
fn an_image_that_resets_before_it_confirms_rolls_back_at_the_next_reset() {
    let image = new_image();
    let offer = offer_json(NEW, &image, &key(), NEW);
    let (mut ota, _, _) = boot(factory());
    let acts = ota.on_offer(&offer);
    let mut seen = Vec::new();
    assert_eq!(
        drive(
            &mut ota,
            &image,
            acts,
            &mut Faults::default(),
            &mut 0,
            &mut seen
        ),
        Stop::Reset
    );
    let (ota, _, v) = boot(ota.into_flash());
    assert_eq!(v, NEW);
    assert!(ota.on_trial());
    // It never reconnects and reports (a hang, a crash loop): the watchdog resets it.
    let (ota, acts, v) = boot(ota.into_flash());
    assert_eq!(v, OLD, "the bootloader went back to the old slot");
    assert_eq!(ota.state().phase, Phase::RolledBack);
    assert!(matches!(
        acts.as_slice(),
        [Action::Report(Status {
            phase: Phase::RolledBack,
            ..
        })]
    ));
    assert!(!ota.on_trial());
}

#[test]
fn a_signed_image_that_does_not_start_is_rolled_back_and_the_old_one_runs() {
    // Signed and intact, but not a bootable image for this board.
    let image: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
    let offer = offer_json(NEW, &image, &key(), NEW);
    let (mut ota, _, _) = boot(factory());
    let acts = ota.on_offer(&offer);
    let mut seen = Vec::new();
    assert_eq!(
        drive(
            &mut ota,
            &image,
            acts,
            &mut Faults::default(),
            &mut 0,
            &mut seen
        ),
        Stop::Reset
    );
    let (ota, acts, v) = boot(ota.into_flash());
    assert_eq!(v, OLD);
    assert_eq!(ota.state().phase, Phase::RolledBack);
    assert!(matches!(
        acts.as_slice(),
        [Action::Report(Status {
            phase: Phase::RolledBack,
            ..
        })]
    ));
}

#[test]
fn an_offer_of_the_running_version_is_answered_confirmed_and_downloads_nothing() {
    let (mut ota, _, _) = boot(factory());
    let image = make_image(OLD, 2500, 1);
    let acts = ota.on_offer(&offer_json(OLD, &image, &key(), OLD));
    assert!(matches!(
        acts.as_slice(),
        [Action::Report(Status {
            phase: Phase::Confirmed,
            ..
        })]
    ));
    assert_eq!(ota.state().phase, Phase::Idle);
}

#[test]
fn an_image_larger_than_the_slot_fails_too_large() {
    let image = make_image(NEW, SLOT + 10, 3);
    let (mut ota, _, _) = boot(factory());
    let acts = ota.on_offer(&offer_json(NEW, &image, &key(), NEW));
    assert!(matches!(
        acts.as_slice(),
        [Action::Report(Status {
            phase: Phase::Failed,
            error: Some(OtaError::TooLarge),
            ..
        })]
    ));
}

#[test]
fn malformed_offers_and_chunks_change_nothing() {
    let (mut ota, _, _) = boot(factory());
    for bad in [
        &b"not json"[..],
        br#"{"version":"1.1.0","size":10}"#,
        br#"{"version":"a b","size":10,"sha256":"00","signature":"00","chunkSize":1}"#,
    ] {
        assert!(ota.on_offer(bad).is_empty());
        assert_eq!(ota.state().phase, Phase::Idle);
    }
    let image = new_image();
    ota.on_offer(&offer_json(NEW, &image, &key(), NEW));
    for bad in [&[0u8, 0, 0][..], &[0, 0, 0, 0, 0, 9, 0, 0, 1]] {
        assert!(ota.on_chunk(bad).is_empty());
    }
    assert_eq!(ota.state().offset, 0);
    assert_eq!(
        ota.on_chunk(&chunk_header(0, 0, 1)).as_slice(),
        [Action::Backoff]
    );
}

#[test]
fn the_state_record_reads_back_as_it_was_written() {
    let image = new_image();
    let offer = Offer::parse(&offer_json(NEW, &image, &key(), NEW)).unwrap();
    let s = OtaState {
        phase: Phase::Failed,
        offer: Some(offer),
        offset: 1234,
        error: Some(OtaError::BadHash),
        attempts: 2,
    };
    assert_eq!(OtaState::from_bytes(&s.to_bytes()).unwrap(), s);
    let mut junk = s.to_bytes();
    junk[0] = 0;
    assert_eq!(OtaState::from_bytes(&junk), Err(OtaError::BadState));
}

#[test]
fn a_status_is_the_json_of_the_protocol() {
    let s = Status {
        phase: Phase::Failed,
        version: Version::try_from(NEW).unwrap(),
        offset: 42,
        error: Some(OtaError::BadSignature),
    };
    let mut buf = [0u8; 128];
    let n = s.to_json(&mut buf).unwrap();
    assert_eq!(
        core::str::from_utf8(&buf[..n]).unwrap(),
        r#"{"state":"failed","version":"1.1.0","offset":42,"error":"bad_signature"}"#
    );
}

/// Cuts the power at every mutating flash operation of a whole update, one run per operation:
/// the machine is rebuilt from what flash holds, the gateway offers again at reconnect, and
/// the meter must end on the new version (or, cut during its trial, on the old one having
/// reported the roll-back), never on an image that cannot boot.
#[test]
fn a_power_cut_at_every_step_ends_on_the_new_version_or_rolled_back_never_bricked() {
    let image = new_image();
    let offer = offer_json(NEW, &image, &key(), NEW);
    // How many mutating operations a clean update takes.
    let (clean, _, _) = update(factory(), &offer, &image, &mut Faults::default());
    let total = clean.ops;
    assert!(total > 10);
    let mut rolled_back = 0;
    for cut in 1..=total + 2 {
        let mut seen = Vec::new();
        let mut requests = 0;
        let (mut ota, acts, _) = boot(factory());
        ota.flash_mut().power_left = Some(cut);
        let mut acts = {
            let mut a = acts;
            a.extend(ota.on_offer(&offer));
            a
        };
        let mut done = false;
        for _round in 0..6 {
            match drive(
                &mut ota,
                &image,
                acts,
                &mut Faults::default(),
                &mut requests,
                &mut seen,
            ) {
                Stop::Reset | Stop::PowerCut => {
                    let mut board = ota.into_flash();
                    let v = board
                        .reset()
                        .unwrap_or_else(|_| panic!("bricked after a cut at step {cut}"));
                    let (o, a) = Ota::boot(board, &v, key().verifying_key().to_bytes());
                    ota = o;
                    acts = a;
                    if ota.on_trial() {
                        acts.extend(ota.on_reported());
                    } else if ota.state().phase != Phase::Confirmed {
                        // Reconnected: the gateway announces the rollout again.
                        acts.extend(ota.on_offer(&offer));
                    }
                }
                Stop::Quiet => {
                    done = true;
                    break;
                }
            }
        }
        assert!(done, "cut at step {cut}: the update did not settle");
        let mut board = ota.into_flash();
        let v = board.reset().expect("never bricked");
        if seen.iter().any(|s| s.0 == Phase::RolledBack) {
            rolled_back += 1;
        }
        assert_eq!(v, NEW, "cut at step {cut}: statuses {seen:?}");
        assert!(
            !seen.iter().any(|s| s.0 == Phase::Failed),
            "cut at step {cut}: {seen:?}"
        );
    }
    // Cuts during the trial roll back, and the re-offer then brings the new version.
    assert!(rolled_back >= 1, "no cut fell into the trial");
}

mod arbitrary_input {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Whatever arrives on `command/ota` and `command/ota/chunk` (any bytes, any order,
        /// mixed with a real offer and real chunks), the machine never panics, never writes
        /// past the slot, and never switches the boot slot to anything but the signed image.
        #[test]
        fn arbitrary_offers_and_chunks_never_switch_to_an_unsigned_image(
            inputs in proptest::collection::vec(
                (any::<bool>(), proptest::collection::vec(any::<u8>(), 0..300)),
                0..40,
            ),
            real_at in 0usize..40,
        ) {
            let image = new_image();
            let offer = offer_json(NEW, &image, &key(), NEW);
            let (mut ota, _, _) = boot(factory());
            for (i, (is_offer, bytes)) in inputs.iter().enumerate() {
                if i == real_at {
                    ota.on_offer(&offer);
                }
                let acts = if *is_offer { ota.on_offer(bytes) } else { ota.on_chunk(bytes) };
                for a in acts {
                    if let Action::Request { offset, len } = a {
                        prop_assert!(offset as usize + usize::from(len) <= image.len());
                    }
                }
            }
            let board = ota.into_flash();
            // Switched only after a complete, verified download of the signed image.
            if board.trial != Trial::None {
                let i = 1 - board.running;
                prop_assert_eq!(&board.slots[i][..image.len()], &image[..]);
            }
        }
    }
}

#[test]
fn a_meter_with_a_smaller_receive_buffer_asks_for_chunks_that_fit_it_and_the_update_completes() {
    let image = new_image();
    let offer = offer_json(NEW, &image, &key(), NEW);
    let (mut ota, _, _) = boot(factory());
    ota.set_max_chunk(100);
    let mut queue: Vec<Action> = ota.on_offer(&offer).into_iter().collect();
    let (mut lens, mut reset) = (Vec::new(), false);
    while !queue.is_empty() && !reset {
        match queue.remove(0) {
            Action::Request { offset, len } => {
                lens.push(len);
                queue.extend(ota.on_chunk(&chunk(&image, offset, len)));
            }
            Action::Reset => reset = true,
            Action::Report(_) | Action::Backoff => {}
        }
    }
    assert!(reset, "the image was verified and the slot switched");
    assert!(lens.iter().all(|&l| l <= 100), "{lens:?}");
    assert_eq!(lens.len(), image.len().div_ceil(100));
    let (ota, _, v) = boot(ota.into_flash());
    assert_eq!(v, NEW);
    assert!(ota.on_trial());
}

#[test]
fn a_version_names_a_meter_only_by_its_whole_build_metadata() {
    assert!(version_is_for_meter("1.4.0+METER001", "METER001"));
    assert!(!version_is_for_meter("1.4.0+METER0011", "METER001"));
    assert!(!version_is_for_meter("1.4.0+METER00", "METER001"));
    assert!(!version_is_for_meter("1.4.0", "METER001"));
    assert!(!version_is_for_meter("+METER001", "METER001"));
    assert!(!version_is_for_meter("1.4.0+METER001+x", "METER001"));
}

#[test]
fn an_other_meter_failure_reads_back_from_the_state_record_and_reports_its_code() {
    let s = OtaState {
        phase: Phase::Failed,
        offer: None,
        offset: 0,
        error: Some(OtaError::OtherMeter),
        attempts: 0,
    };
    let back = OtaState::from_bytes(&s.to_bytes()).unwrap();
    assert_eq!(back, s);
    let mut buf = [0u8; 160];
    let st = Status {
        phase: Phase::Failed,
        version: Version::try_from("1.4.0+METER002").unwrap(),
        offset: 0,
        error: Some(OtaError::OtherMeter),
    };
    let n = st.to_json(&mut buf).unwrap();
    assert_eq!(
        core::str::from_utf8(&buf[..n]).unwrap(),
        r#"{"state":"failed","version":"1.4.0+METER002","offset":0,"error":"other_meter"}"#
    );
}
