//! An OTA app slot on NOR flash as the OTA state machine writes it: in order from 0, in chunks
//! of any length at any offset (the board's half of [`crate::ota::OtaFlash`]'s
//! `erase_inactive`/`write_inactive`/`read_inactive`).
//!
//! **Lazy erase**: nothing is erased when an update starts; each write first erases the sectors
//! whose first byte it writes. The machine writes only the chunk at its offset, so every sector
//! of the image is erased exactly once before its first byte, and a board erases a sector at a
//! time during the download instead of the whole slot (seconds) when the offer arrives.
//!
//! **Any alignment**: writes go out in `WRITE_SIZE` words; the bytes of a first or last word
//! outside the chunk are written as 0xFF, which programs nothing on NOR flash (hence
//! `MultiwriteNorFlash`). For the same reason a chunk written again after a power cut tore it
//! ends as the chunk (the bits it had cleared are cleared again).
//!
//! Nothing outside `offset..offset + len` is ever erased or written: the running image is in
//! the other slot.

use embedded_storage::nor_flash::{MultiwriteNorFlash, ReadNorFlash};

/// Largest write unit supported (the ESP32-C3's is 4).
const MAX_WRITE: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SlotError<E: core::fmt::Debug> {
    #[error("flash: {0:?}")]
    Flash(E),
    #[error("outside the slot")]
    OutOfBounds,
}

/// The slot: `len` bytes of flash from `offset` (sector-aligned).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NorSlot {
    pub offset: u32,
    pub len: u32,
}

impl NorSlot {
    /// Whether an image of `size` bytes fits.
    pub fn fits(&self, size: u32) -> bool {
        size <= self.len
    }

    fn at<E: core::fmt::Debug>(&self, offset: u32, len: usize) -> Result<u32, SlotError<E>> {
        let end = u32::try_from(len)
            .ok()
            .and_then(|l| offset.checked_add(l))
            .ok_or(SlotError::OutOfBounds)?;
        if end > self.len {
            return Err(SlotError::OutOfBounds);
        }
        Ok(self.offset + offset)
    }

    /// Writes `data` at `offset` of the slot, erasing first the sectors that start inside it.
    pub fn write<F: MultiwriteNorFlash>(
        &self,
        flash: &mut F,
        offset: u32,
        data: &[u8],
    ) -> Result<(), SlotError<F::Error>>
    where
        F::Error: core::fmt::Debug,
    {
        let sector = F::ERASE_SIZE as u32;
        let word = F::WRITE_SIZE as u32;
        assert!(F::WRITE_SIZE <= MAX_WRITE && 256usize.is_multiple_of(F::WRITE_SIZE));
        let start = self.at(offset, data.len())?;
        let end = start + data.len() as u32;
        let mut s = start.div_ceil(sector) * sector;
        while s < end {
            flash.erase(s, s + sector).map_err(SlotError::Flash)?;
            s += sector;
        }
        let mut buf = [0xFFu8; 256];
        let mut at = start - start % word;
        let mut src = 0usize;
        while at < end {
            let lead = (start.max(at) - at) as usize;
            let take = (buf.len() - lead).min(data.len() - src);
            buf.fill(0xFF);
            buf[lead..lead + take].copy_from_slice(&data[src..src + take]);
            let n = (lead + take).div_ceil(word as usize) * word as usize;
            flash.write(at, &buf[..n]).map_err(SlotError::Flash)?;
            src += take;
            at += n as u32;
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset` of the slot.
    pub fn read<F: ReadNorFlash>(
        &self,
        flash: &mut F,
        offset: u32,
        buf: &mut [u8],
    ) -> Result<(), SlotError<F::Error>>
    where
        F::Error: core::fmt::Debug,
    {
        let at = self.at(offset, buf.len())?;
        flash.read(at, buf).map_err(SlotError::Flash)
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use embedded_storage::nor_flash::{
        ErrorType, MultiwriteNorFlash, NorFlash, NorFlashError, NorFlashErrorKind, ReadNorFlash,
    };
    use proptest::prelude::*;

    use super::*;

    const SECTOR: usize = 256;
    /// Three "slots" of 8 sectors: the running one, the one updated, and one after it.
    const SLOT: NorSlot = NorSlot {
        offset: 8 * SECTOR as u32,
        len: 8 * SECTOR as u32,
    };

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum NorError {
        Unaligned,
        OutOfBounds,
        PowerCut,
    }

    impl NorFlashError for NorError {
        fn kind(&self) -> NorFlashErrorKind {
            match self {
                NorError::Unaligned => NorFlashErrorKind::NotAligned,
                NorError::OutOfBounds => NorFlashErrorKind::OutOfBounds,
                NorError::PowerCut => NorFlashErrorKind::Other,
            }
        }
    }

    /// NOR flash as it behaves: a write clears bits (new = old AND written), an erase sets a
    /// sector to 0xFF, writes are word-aligned. The power can fail after `budget` bytes.
    struct Nor {
        data: Vec<u8>,
        erases: Vec<u32>,
        budget: Option<usize>,
    }

    impl Nor {
        /// Old content everywhere (nothing erased): a previous image's bytes.
        fn new() -> Nor {
            Nor {
                data: (0..24 * SECTOR).map(|i| (i * 7 + 3) as u8).collect(),
                erases: std::vec![0; 24],
                budget: None,
            }
        }
    }

    impl ErrorType for Nor {
        type Error = NorError;
    }

    impl ReadNorFlash for Nor {
        const READ_SIZE: usize = 1;
        fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), NorError> {
            let o = offset as usize;
            let src = self
                .data
                .get(o..o + bytes.len())
                .ok_or(NorError::OutOfBounds)?;
            bytes.copy_from_slice(src);
            Ok(())
        }
        fn capacity(&self) -> usize {
            self.data.len()
        }
    }

    impl NorFlash for Nor {
        const WRITE_SIZE: usize = 4;
        const ERASE_SIZE: usize = SECTOR;
        fn erase(&mut self, from: u32, to: u32) -> Result<(), NorError> {
            let (f, t) = (from as usize, to as usize);
            if !f.is_multiple_of(SECTOR) || !t.is_multiple_of(SECTOR) {
                return Err(NorError::Unaligned);
            }
            if t > self.data.len() {
                return Err(NorError::OutOfBounds);
            }
            if self.budget == Some(0) {
                return Err(NorError::PowerCut);
            }
            self.data[f..t].fill(0xFF);
            for s in f / SECTOR..t / SECTOR {
                self.erases[s] += 1;
            }
            Ok(())
        }
        fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), NorError> {
            let o = offset as usize;
            if !o.is_multiple_of(4) || !bytes.len().is_multiple_of(4) {
                return Err(NorError::Unaligned);
            }
            if o + bytes.len() > self.data.len() {
                return Err(NorError::OutOfBounds);
            }
            for (i, &b) in bytes.iter().enumerate() {
                if let Some(left) = self.budget.as_mut() {
                    if *left == 0 {
                        return Err(NorError::PowerCut);
                    }
                    *left -= 1;
                }
                self.data[o + i] &= b;
            }
            Ok(())
        }
    }

    impl MultiwriteNorFlash for Nor {}

    fn image(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i * 31 + 11) as u8 ^ (i >> 8) as u8)
            .collect()
    }

    /// Writes `img` in chunks of `chunk` bytes, in order.
    fn download(nor: &mut Nor, img: &[u8], chunk: usize) -> Result<(), SlotError<NorError>> {
        for (i, c) in img.chunks(chunk).enumerate() {
            SLOT.write(nor, (i * chunk) as u32, c)?;
        }
        Ok(())
    }

    fn read_back(nor: &mut Nor, len: usize) -> Vec<u8> {
        let mut out = std::vec![0u8; len];
        SLOT.read(nor, 0, &mut out).unwrap();
        out
    }

    #[test]
    fn chunks_of_any_length_over_an_old_image_read_back_as_the_new_image() {
        for chunk in [1, 3, 4, 37, 100, 256, 257, 1000, 2048] {
            let img = image(5 * SECTOR + 123);
            let mut nor = Nor::new();
            download(&mut nor, &img, chunk).unwrap();
            assert_eq!(read_back(&mut nor, img.len()), img, "chunks of {chunk}");
        }
    }

    #[test]
    fn each_sector_of_the_image_is_erased_once_and_nothing_outside_the_slot_changes() {
        let img = image(5 * SECTOR + 123);
        let mut nor = Nor::new();
        let before = nor.data.clone();
        download(&mut nor, &img, 100).unwrap();
        assert_eq!(
            &nor.erases[8..14],
            &[1; 6],
            "the image's six sectors, once each"
        );
        assert!(nor.erases[..8]
            .iter()
            .chain(&nor.erases[14..])
            .all(|&e| e == 0));
        assert_eq!(
            nor.data[..8 * SECTOR],
            before[..8 * SECTOR],
            "the running slot"
        );
        assert_eq!(
            nor.data[16 * SECTOR..],
            before[16 * SECTOR..],
            "after the slot"
        );
    }

    #[test]
    fn writes_and_reads_past_the_slot_are_refused_before_touching_flash() {
        let mut nor = Nor::new();
        let before = nor.data.clone();
        let len = SLOT.len;
        assert_eq!(
            SLOT.write(&mut nor, len - 2, &[0; 4]),
            Err(SlotError::OutOfBounds)
        );
        assert_eq!(
            SLOT.write(&mut nor, u32::MAX - 1, &[0; 4]),
            Err(SlotError::OutOfBounds)
        );
        assert_eq!(
            SLOT.read(&mut nor, len, &mut [0; 1]),
            Err(SlotError::OutOfBounds)
        );
        assert_eq!(nor.data, before);
        assert!(SLOT.fits(len) && !SLOT.fits(len + 1));
    }

    proptest! {
        /// A power cut during any chunk's write, then that chunk written again (the machine's
        /// resume: its offset moves only after the write), leaves the image intact.
        #[test]
        fn a_chunk_torn_by_a_power_cut_and_written_again_leaves_the_image_intact(
            len in 1usize..(8 * SECTOR),
            chunk in 1usize..600,
            cut_chunk in 0usize..64,
            cut_after in 0usize..700,
        ) {
            let img = image(len);
            let mut nor = Nor::new();
            let chunks: Vec<&[u8]> = img.chunks(chunk).collect();
            let cut_chunk = cut_chunk % chunks.len();
            for (i, c) in chunks.iter().enumerate() {
                let at = (i * chunk) as u32;
                if i == cut_chunk {
                    nor.budget = Some(cut_after);
                    let torn = SLOT.write(&mut nor, at, c);
                    nor.budget = None;
                    if torn.is_err() {
                        prop_assert_eq!(torn, Err(SlotError::Flash(NorError::PowerCut)));
                    }
                }
                SLOT.write(&mut nor, at, c).unwrap();
            }
            prop_assert_eq!(read_back(&mut nor, img.len()), img);
        }
    }
}
