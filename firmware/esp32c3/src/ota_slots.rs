//! The two OTA app slots of `partitions.csv`, through esp-bootloader-esp-idf: what meter-core's
//! OTA state machine asks of the board (its `OtaFlash` trait: erase, write and read the
//! inactive slot, boot it on trial, confirm the running image). The state record and the
//! state machine's glue (offers, chunks, reports) come with the OTA state machine; until then
//! nothing calls this module.
//!
//! "Inactive" is the slot after the one otadata selects; the running image is never written.
//! A trial boot is otadata's `New` state: a bootloader with app rollback turns it into
//! `PendingVerify` at the next boot and goes back to the other slot if the image resets before
//! [`Slots::confirm_running`].

#![allow(dead_code)] // wired by the OTA state machine's board glue (meter-core `ota`)

use esp_bootloader_esp_idf::ota::OtaImageState;
use esp_bootloader_esp_idf::ota_updater::OtaUpdater;
use esp_bootloader_esp_idf::partitions::{Error, PARTITION_TABLE_MAX_LEN};
use esp_storage::FlashStorage;

/// Flash erase unit.
const SECTOR: u32 = 4096;

pub struct Slots {
    flash: FlashStorage<'static>,
    table: [u8; PARTITION_TABLE_MAX_LEN],
}

impl Slots {
    pub fn new(flash: FlashStorage<'static>) -> Slots {
        Slots {
            flash,
            table: [0; PARTITION_TABLE_MAX_LEN],
        }
    }

    /// The partition table is read for each operation: a 3 KiB flash read against a chunk's
    /// erase or write, and nothing cached goes stale when otadata changes.
    fn with<R>(
        &mut self,
        f: impl FnOnce(&mut OtaUpdater<'_, 'static>) -> Result<R, Error>,
    ) -> Result<R, Error> {
        let mut updater = OtaUpdater::new(&mut self.flash, &mut self.table)?;
        f(&mut updater)
    }

    /// Erases the inactive slot for an image of `size` bytes; `Ok(false)` when it does not fit.
    pub fn erase_inactive(&mut self, size: u32) -> Result<bool, Error> {
        self.with(|u| {
            let (mut slot, _) = u.next_partition()?;
            if size as usize > slot.capacity() {
                return Ok(false);
            }
            slot.erase(0, size.div_ceil(SECTOR) * SECTOR)?;
            Ok(true)
        })
    }

    /// Writes `data` at `offset` of the inactive slot (erased before by `erase_inactive`).
    pub fn write_inactive(&mut self, offset: u32, data: &[u8]) -> Result<(), Error> {
        self.with(|u| u.next_partition()?.0.write(offset, data))
    }

    pub fn read_inactive(&mut self, offset: u32, buf: &mut [u8]) -> Result<(), Error> {
        self.with(|u| u.next_partition()?.0.read(offset, buf))
    }

    /// Boots the inactive slot at the next reset, on trial.
    pub fn set_boot_slot_trial(&mut self) -> Result<(), Error> {
        self.with(|u| {
            u.activate_next_partition()?;
            u.set_current_ota_state(OtaImageState::New)
        })
    }

    /// Marks the running image good: the bootloader keeps it.
    pub fn confirm_running(&mut self) -> Result<(), Error> {
        self.with(|u| u.set_current_ota_state(OtaImageState::Valid))
    }
}
