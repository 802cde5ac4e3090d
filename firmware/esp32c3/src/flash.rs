//! The one SPI flash, shared by the meter's state log, the OTA state log and the OTA slots.
//!
//! esp-storage's `FlashStorage` owns the flash peripheral; there is one. It sits in a static
//! and every operation takes it out for its own duration and puts it back: the critical section
//! covers only the take and the put, never an erase (esp-storage already masks interrupts per
//! ROM call, a sector at a time). Every flash user runs on the one embassy executor and flash
//! operations never await, so two can never overlap; if one ever did, it would get
//! [`Error::Busy`], not a second handle.

use core::cell::RefCell;

use embassy_sync::blocking_mutex::raw::CriticalSectionRawMutex;
use embassy_sync::blocking_mutex::Mutex;
use embedded_storage::nor_flash::{
    ErrorType, MultiwriteNorFlash, NorFlash, NorFlashError, NorFlashErrorKind, ReadNorFlash,
};
use esp_storage::{FlashStorage, FlashStorageError};

static FLASH: Mutex<CriticalSectionRawMutex, RefCell<Option<FlashStorage<'static>>>> =
    Mutex::new(RefCell::new(None));

/// Hands the flash to this module (once, in `main`).
pub fn init(flash: FlashStorage<'static>) {
    FLASH.lock(|f| f.replace(Some(flash)));
}

#[derive(Debug)]
pub enum Error {
    /// The flash is in use by another operation (or not handed over yet).
    Busy,
    Flash(FlashStorageError),
}

/// Runs `f` with the flash to itself.
pub fn with<R>(f: impl FnOnce(&mut FlashStorage<'static>) -> R) -> Result<R, Error> {
    let mut flash = FLASH.lock(|c| c.borrow_mut().take()).ok_or(Error::Busy)?;
    let r = f(&mut flash);
    FLASH.lock(|c| c.replace(Some(flash)));
    Ok(r)
}

/// A `NorFlash` view of the shared flash, for meter-core's `FlashLog`s (absolute addresses, as
/// `FlashStorage` itself).
pub struct Shared;

impl NorFlashError for Error {
    fn kind(&self) -> NorFlashErrorKind {
        match self {
            Error::Flash(e) => e.kind(),
            Error::Busy => NorFlashErrorKind::Other,
        }
    }
}

impl ErrorType for Shared {
    type Error = Error;
}

impl ReadNorFlash for Shared {
    const READ_SIZE: usize = <FlashStorage<'static> as ReadNorFlash>::READ_SIZE;

    fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), Error> {
        with(|f| ReadNorFlash::read(f, offset, bytes))?.map_err(Error::Flash)
    }

    fn capacity(&self) -> usize {
        with(|f| ReadNorFlash::capacity(f)).unwrap_or(0)
    }
}

impl NorFlash for Shared {
    const WRITE_SIZE: usize = <FlashStorage<'static> as NorFlash>::WRITE_SIZE;
    const ERASE_SIZE: usize = <FlashStorage<'static> as NorFlash>::ERASE_SIZE;

    fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), Error> {
        with(|f| NorFlash::write(f, offset, bytes))?.map_err(Error::Flash)
    }

    fn erase(&mut self, from: u32, to: u32) -> Result<(), Error> {
        with(|f| NorFlash::erase(f, from, to))?.map_err(Error::Flash)
    }
}

/// As `FlashStorage` (a write only clears bits), which meter-core's `NorSlot` relies on.
impl MultiwriteNorFlash for Shared {}
