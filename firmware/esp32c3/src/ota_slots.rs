//! The board's side of an over-the-air update: meter-core's [`OtaFlash`] on the two app slots
//! of `partitions.csv` (through esp-bootloader-esp-idf's partition table and otadata) and the
//! OTA state record in a log of its own (the `otastate` partition).
//!
//! **The inactive slot is the app slot the board did not boot from** (found from the MMU's
//! mapping of the running image, `booted_partition`), never "the slot after otadata's
//! selection": with otadata blank (a meter fresh from USB flashing, running `ota_0`)
//! esp-bootloader-esp-idf 0.6's `next_partition` computes `Factory.ota_app_number() + 2`,
//! which underflows (`0 - 0x10` in `u8`) and, wrapped, picks `ota_0` again: the running
//! image. Every write is checked against the inactive slot's bounds; the running image is never
//! written.
//!
//! **Erasing is lazy** (meter-core's `NorSlot`, host-tested): `erase_inactive` only checks the
//! size, and each write erases the sectors whose first byte it writes, just before writing
//! them, so the slot is erased a sector (tens of ms) at a time during the download instead of
//! the whole image (seconds, with the executor stopped) when the offer arrives. Chunks of any
//! length and alignment are written in words padded with 0xFF.
//!
//! A trial boot is otadata's `New` state for the new slot: a second-stage bootloader with app
//! rollback (`CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE`) turns it into `PendingVerify` at the next
//! boot and goes back to the other slot if the image resets before [`OtaFlash::confirm_running`]
//! (state `Valid`). The bootloader espflash writes is built with ESP-IDF's defaults, which
//! leave rollback off, so the board also rolls back itself ([`boot_previous`],
//! `updates::trial_watch`): see firmware/README.md, "OTA on the ESP32-C3".

use esp_bootloader_esp_idf::ota::OtaImageState;
use esp_bootloader_esp_idf::ota_updater::OtaUpdater;
use esp_bootloader_esp_idf::partitions::{
    read_partition_table, AppPartitionSubType, Error as TableError, PartitionType,
    PARTITION_TABLE_MAX_LEN,
};
use esp_storage::FlashStorage;
use meter_core::flashlog::{FlashLog, FlashLogError};
use meter_core::nor_slot::{NorSlot, SlotError};
use meter_core::ota::{OtaFlash, STATE_LEN};

use crate::flash::{self, Shared};

#[derive(Debug)]
pub enum Error {
    Flash(flash::Error),
    Table(TableError),
    /// The partition table has no second app slot besides the running one (or the running
    /// one could not be found): updates are off.
    NoInactiveSlot,
    OutOfBounds,
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Error::Flash(e) => write!(f, "flash: {e:?}"),
            Error::Table(e) => write!(f, "partition table or otadata: {e}"),
            Error::NoInactiveSlot => f.write_str("no inactive OTA app slot"),
            Error::OutOfBounds => f.write_str("outside the inactive slot"),
        }
    }
}

/// Logs a failed operation: the state machine turns every board error into `flash`.
fn logged<T>(op: &str, r: Result<T, Error>) -> Result<T, Error> {
    if let Err(e) = &r {
        esp_println::println!("ota: {op} failed: {e}");
    }
    r
}

impl From<flash::Error> for Error {
    fn from(e: flash::Error) -> Self {
        Error::Flash(e)
    }
}

impl From<SlotError<flash::Error>> for Error {
    fn from(e: SlotError<flash::Error>) -> Self {
        match e {
            SlotError::Flash(e) => Error::Flash(e),
            SlotError::OutOfBounds => Error::OutOfBounds,
        }
    }
}

/// The app slot the board does not run from.
#[derive(Clone, Copy, Debug)]
pub struct Inactive {
    pub subtype: AppPartitionSubType,
    pub offset: u32,
    pub len: u32,
}

/// Finds the inactive slot: an OTA app slot other than the one the MMU maps the running image
/// from.
pub fn inactive_slot() -> Result<Inactive, Error> {
    let mut table = [0u8; PARTITION_TABLE_MAX_LEN];
    flash::with(|f| {
        let pt = read_partition_table(f, &mut table).map_err(Error::Table)?;
        let booted = pt
            .booted_partition()
            .map_err(Error::Table)?
            .ok_or(Error::NoInactiveSlot)?;
        let found =
            pt.iter().find_map(|p| match p.partition_type() {
                PartitionType::App(
                    sub @ (AppPartitionSubType::Ota0 | AppPartitionSubType::Ota1),
                ) if p.offset() != booted.offset() => Some(Inactive {
                    subtype: sub,
                    offset: p.offset(),
                    len: p.len(),
                }),
                _ => None,
            });
        found.ok_or(Error::NoInactiveSlot)
    })?
}

/// Runs `f` on otadata (through esp-bootloader-esp-idf, which reads the partition table).
fn with_otadata<R>(
    f: impl FnOnce(&mut OtaUpdater<'_, 'static>) -> Result<R, TableError>,
) -> Result<R, Error> {
    let mut table = [0u8; PARTITION_TABLE_MAX_LEN];
    flash::with(|fl: &mut FlashStorage<'static>| {
        let mut updater = OtaUpdater::new(fl, &mut table).map_err(Error::Table)?;
        f(&mut updater).map_err(Error::Table)
    })?
}

/// Selects the other slot (the image this trial image replaced) for the next reset, as valid:
/// the board's own rollback when a trial image never confirms (`updates::trial_watch`), for a
/// bootloader without app rollback.
pub fn boot_previous() -> Result<(), Error> {
    let slot = inactive_slot()?;
    logged(
        "switching back",
        with_otadata(|u| {
            let mut otadata = u.ota_data()?;
            otadata.set_current_app_partition(slot.subtype)?;
            otadata.set_current_ota_state(OtaImageState::Valid)
        }),
    )
}

/// meter-core's [`OtaFlash`] on this board.
pub struct Board {
    /// `None` when the partition table has no slot to update into (then every offer fails).
    slot: Option<Inactive>,
    state: FlashLog<Shared>,
}

impl Board {
    /// `state_offset`/`state_sectors`: the `otastate` partition (its own wear-levelled log).
    pub fn new(state_offset: u32, state_sectors: u32) -> Board {
        let slot = match inactive_slot() {
            Ok(s) => Some(s),
            Err(e) => {
                esp_println::println!("ota: no slot to update into ({e}); updates are off");
                None
            }
        };
        let mut state = FlashLog::new(Shared, state_offset, state_sectors);
        // Finds the newest record and the append position; `load_state` reads it again.
        let _ = state.load(&mut [0u8; STATE_LEN]);
        Board { slot, state }
    }

    fn nor_slot(&self) -> Result<NorSlot, Error> {
        let slot = self.slot.ok_or(Error::NoInactiveSlot)?;
        Ok(NorSlot {
            offset: slot.offset,
            len: slot.len,
        })
    }
}

impl OtaFlash for Board {
    type Error = Error;

    fn erase_inactive(&mut self, size: u32) -> Result<bool, Error> {
        Ok(self.nor_slot()?.fits(size))
    }

    fn write_inactive(&mut self, offset: u32, data: &[u8]) -> Result<(), Error> {
        let r = self
            .nor_slot()
            .and_then(|s| Ok(s.write(&mut Shared, offset, data)?));
        logged("write", r)
    }

    fn read_inactive(&mut self, offset: u32, buf: &mut [u8]) -> Result<(), Error> {
        let r = self
            .nor_slot()
            .and_then(|s| Ok(s.read(&mut Shared, offset, buf)?));
        logged("read", r)
    }

    fn set_boot_slot_trial(&mut self) -> Result<(), Error> {
        let slot = self.slot.ok_or(Error::NoInactiveSlot)?;
        logged(
            "switching the boot slot",
            with_otadata(|u| {
                let mut otadata = u.ota_data()?;
                otadata.set_current_app_partition(slot.subtype)?;
                otadata.set_current_ota_state(OtaImageState::New)
            }),
        )
    }

    fn confirm_running(&mut self) -> Result<(), Error> {
        let slot = self.slot.ok_or(Error::NoInactiveSlot)?;
        logged(
            "confirming the running image",
            with_otadata(|u| {
                // Only the running image's entry: if otadata selects the other slot (the
                // bootloader fell back from it), there is nothing of ours to confirm.
                if u.selected_partition()? == slot.subtype {
                    return Err(TableError::InvalidState);
                }
                u.set_current_ota_state(OtaImageState::Valid)
            }),
        )
    }

    fn save_state(&mut self, state: &[u8; STATE_LEN]) -> Result<(), Error> {
        let r = self.state.append(state).map_err(|e| match e {
            FlashLogError::Flash(e) => Error::Flash(e),
            _ => Error::OutOfBounds,
        });
        logged("saving the state", r)
    }

    fn load_state(&mut self) -> Result<Option<[u8; STATE_LEN]>, Error> {
        let mut buf = [0u8; STATE_LEN];
        match self.state.load(&mut buf) {
            Ok(Some(STATE_LEN)) => Ok(Some(buf)),
            // Blank, or a record of another length: no update in progress.
            Ok(_) | Err(FlashLogError::BufferTooSmall) | Err(FlashLogError::TooLarge(_)) => {
                Ok(None)
            }
            Err(FlashLogError::Flash(e)) => logged("loading the state", Err(Error::Flash(e))),
        }
    }
}
