//! A wear-levelled, power-cut-safe log of state records on NOR flash.
//!
//! The region is `sectors` erase sectors. Records are appended one after another; when a
//! sector is full the next one is erased and used, round-robin, so every sector is erased once
//! per `sectors` fills instead of once per write. Each record carries a generation number and a
//! CRC-32; at boot the valid record with the highest generation wins. A write torn by a power
//! cut fails its CRC and is skipped, so the previous record stays the state. Nothing is ever
//! written over a torn record: after one, appends continue in a fresh sector.

use embedded_storage::nor_flash::NorFlash;

const MAGIC: u32 = 0x314D_4555; // "UEM1" little-endian
const HEADER: usize = 16;
const ERASED: u32 = 0xFFFF_FFFF;
/// Largest flash write granularity supported (the C3's is 4).
const MAX_WRITE: usize = 16;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FlashLogError<E: core::fmt::Debug> {
    #[error("flash: {0:?}")]
    Flash(E),
    #[error("record of {0} bytes does not fit a sector")]
    TooLarge(usize),
    #[error("buffer too small for the stored record")]
    BufferTooSmall,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cursor {
    sector: u32,
    offset: u32,
    /// A torn record follows: do not write here.
    dirty: bool,
}

pub struct FlashLog<F> {
    flash: F,
    base: u32,
    sectors: u32,
    gen: u32,
    cursor: Option<Cursor>,
}

pub fn crc32(seed: u32, data: &[u8]) -> u32 {
    let mut crc = !seed;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

const fn align_up(n: usize, a: usize) -> usize {
    n.div_ceil(a) * a
}

impl<F: NorFlash> FlashLog<F>
where
    F::Error: core::fmt::Debug,
{
    /// A log over `sectors` erase sectors from `base` (sector-aligned), at least two.
    pub fn new(flash: F, base: u32, sectors: u32) -> Self {
        assert!(sectors >= 2, "the log needs two sectors to rotate");
        assert!(F::WRITE_SIZE <= MAX_WRITE && HEADER.is_multiple_of(F::WRITE_SIZE));
        assert!(
            (base as usize).is_multiple_of(F::ERASE_SIZE),
            "base must be sector-aligned"
        );
        FlashLog {
            flash,
            base,
            sectors,
            gen: 0,
            cursor: None,
        }
    }

    pub fn into_inner(self) -> F {
        self.flash
    }

    /// Largest record payload.
    pub const fn max_record() -> usize {
        F::ERASE_SIZE - HEADER
    }

    fn addr(&self, sector: u32, offset: u32) -> u32 {
        self.base + sector * F::ERASE_SIZE as u32 + offset
    }

    fn read_u32s(&mut self, at: u32) -> Result<[u32; 4], FlashLogError<F::Error>> {
        let mut h = [0u8; HEADER];
        self.flash.read(at, &mut h).map_err(FlashLogError::Flash)?;
        let w = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        Ok([w(0), w(4), w(8), w(12)])
    }

    /// CRC of gen, len and the payload at `at`, reading in small chunks.
    fn crc_of(&mut self, gen: u32, len: u32, at: u32) -> Result<u32, FlashLogError<F::Error>> {
        let mut crc = crc32(0, &gen.to_le_bytes());
        crc = crc32(crc, &len.to_le_bytes());
        let mut chunk = [0u8; 64];
        let mut done = 0u32;
        while done < len {
            let n = (len - done).min(chunk.len() as u32) as usize;
            self.flash
                .read(at + done, &mut chunk[..n])
                .map_err(FlashLogError::Flash)?;
            crc = crc32(crc, &chunk[..n]);
            done += n as u32;
        }
        Ok(crc)
    }

    fn is_erased(&mut self, at: u32, len: u32) -> Result<bool, FlashLogError<F::Error>> {
        let mut chunk = [0u8; 64];
        let mut done = 0u32;
        while done < len {
            let n = (len - done).min(chunk.len() as u32) as usize;
            self.flash
                .read(at + done, &mut chunk[..n])
                .map_err(FlashLogError::Flash)?;
            if chunk[..n].iter().any(|&b| b != 0xFF) {
                return Ok(false);
            }
            done += n as u32;
        }
        Ok(true)
    }

    /// Scans the region and copies the newest valid record into `buf`; `None` on a blank region.
    pub fn load(&mut self, buf: &mut [u8]) -> Result<Option<usize>, FlashLogError<F::Error>> {
        let sector_size = F::ERASE_SIZE as u32;
        let mut best: Option<(u32, u32, u32, Cursor)> = None; // gen, addr, len, end of its sector
        for s in 0..self.sectors {
            let mut off = 0u32;
            let mut dirty = false;
            let mut found: Option<(u32, u32, u32)> = None;
            // Bounded: each step advances by at least one header.
            while off + HEADER as u32 <= sector_size {
                let [magic, gen, len, crc] = self.read_u32s(self.addr(s, off))?;
                if magic == ERASED && gen == ERASED && len == ERASED && crc == ERASED {
                    // A payload may have been written before a power cut took its header.
                    dirty = !self.is_erased(self.addr(s, off), sector_size - off)?;
                    break;
                }
                let fits = len as usize <= Self::max_record()
                    && off + align_up(HEADER + len as usize, F::WRITE_SIZE) as u32 <= sector_size;
                let at = self.addr(s, off) + HEADER as u32;
                if magic != MAGIC || !fits || self.crc_of(gen, len, at)? != crc {
                    dirty = true;
                    break;
                }
                if found.is_none_or(|(g, _, _)| gen > g) {
                    found = Some((gen, at, len));
                }
                off += align_up(HEADER + len as usize, F::WRITE_SIZE) as u32;
            }
            if let Some((gen, at, len)) = found {
                if best.is_none_or(|(g, ..)| gen > g) {
                    let end = Cursor {
                        sector: s,
                        offset: off,
                        dirty,
                    };
                    best = Some((gen, at, len, end));
                }
            }
        }
        let Some((gen, at, len, end)) = best else {
            self.gen = 0;
            self.cursor = None;
            return Ok(None);
        };
        self.gen = gen;
        self.cursor = Some(end);
        let out = buf
            .get_mut(..len as usize)
            .ok_or(FlashLogError::BufferTooSmall)?;
        self.flash.read(at, out).map_err(FlashLogError::Flash)?;
        Ok(Some(len as usize))
    }

    /// Appends a record; it is the state from now on. Call [`FlashLog::load`] once first.
    pub fn append(&mut self, data: &[u8]) -> Result<(), FlashLogError<F::Error>> {
        if data.len() > Self::max_record() {
            return Err(FlashLogError::TooLarge(data.len()));
        }
        let need = align_up(HEADER + data.len(), F::WRITE_SIZE) as u32;
        let sector_size = F::ERASE_SIZE as u32;
        let cursor = match self.cursor {
            Some(c) if !c.dirty && c.offset + need <= sector_size => c,
            other => {
                let sector = other.map_or(0, |c| (c.sector + 1) % self.sectors);
                let from = self.addr(sector, 0);
                self.flash
                    .erase(from, from + sector_size)
                    .map_err(FlashLogError::Flash)?;
                Cursor {
                    sector,
                    offset: 0,
                    dirty: false,
                }
            }
        };
        let gen = self.gen.wrapping_add(1);
        let len = data.len() as u32;
        let mut crc = crc32(0, &gen.to_le_bytes());
        crc = crc32(crc, &len.to_le_bytes());
        crc = crc32(crc, data);
        let at = self.addr(cursor.sector, cursor.offset);
        let body = data.len() / F::WRITE_SIZE * F::WRITE_SIZE;
        let write = |f: &mut F, addr: u32, b: &[u8]| f.write(addr, b).map_err(FlashLogError::Flash);
        // Payload first, header last: a record is only found once it is complete (the CRC
        // still guards against a header torn by itself).
        if body > 0 {
            write(&mut self.flash, at + HEADER as u32, &data[..body])?;
        }
        if body < data.len() {
            let mut tail = [0xFFu8; MAX_WRITE];
            let rest = &data[body..];
            tail[..rest.len()].copy_from_slice(rest);
            write(
                &mut self.flash,
                at + (HEADER + body) as u32,
                &tail[..F::WRITE_SIZE],
            )?;
        }
        let mut h = [0u8; HEADER];
        for (i, w) in [MAGIC, gen, len, crc].iter().enumerate() {
            h[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
        }
        write(&mut self.flash, at, &h)?;
        self.gen = gen;
        self.cursor = Some(Cursor {
            sector: cursor.sector,
            offset: cursor.offset + need,
            dirty: false,
        });
        Ok(())
    }
}

/// A RAM NOR flash for host tests and the simulator: enforces erase-before-write, counts
/// erases per sector, and can cut the power after a number of written bytes.
pub mod ram {
    use embedded_storage::nor_flash::{
        ErrorType, NorFlash, NorFlashError, NorFlashErrorKind, ReadNorFlash,
    };

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum RamFlashError {
        OutOfBounds,
        NotErased,
        PowerCut,
    }

    impl NorFlashError for RamFlashError {
        fn kind(&self) -> NorFlashErrorKind {
            match self {
                RamFlashError::OutOfBounds => NorFlashErrorKind::OutOfBounds,
                _ => NorFlashErrorKind::Other,
            }
        }
    }

    pub struct RamFlash<const SIZE: usize, const SECTOR: usize> {
        pub data: [u8; SIZE],
        pub erases: [u32; 64],
        /// Bytes that may still be written before the "power" fails; `None` = unlimited.
        pub budget: Option<usize>,
    }

    impl<const SIZE: usize, const SECTOR: usize> Default for RamFlash<SIZE, SECTOR> {
        fn default() -> Self {
            RamFlash {
                data: [0xFF; SIZE],
                erases: [0; 64],
                budget: None,
            }
        }
    }

    impl<const SIZE: usize, const SECTOR: usize> ErrorType for RamFlash<SIZE, SECTOR> {
        type Error = RamFlashError;
    }

    impl<const SIZE: usize, const SECTOR: usize> ReadNorFlash for RamFlash<SIZE, SECTOR> {
        const READ_SIZE: usize = 1;
        fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), Self::Error> {
            let o = offset as usize;
            let src = self
                .data
                .get(o..o + bytes.len())
                .ok_or(RamFlashError::OutOfBounds)?;
            bytes.copy_from_slice(src);
            Ok(())
        }
        fn capacity(&self) -> usize {
            SIZE
        }
    }

    impl<const SIZE: usize, const SECTOR: usize> NorFlash for RamFlash<SIZE, SECTOR> {
        const WRITE_SIZE: usize = 4;
        const ERASE_SIZE: usize = SECTOR;
        fn erase(&mut self, from: u32, to: u32) -> Result<(), Self::Error> {
            let (f, t) = (from as usize, to as usize);
            if !f.is_multiple_of(SECTOR) || !t.is_multiple_of(SECTOR) || t > SIZE {
                return Err(RamFlashError::OutOfBounds);
            }
            self.data[f..t].fill(0xFF);
            for s in f / SECTOR..t / SECTOR {
                if let Some(e) = self.erases.get_mut(s) {
                    *e += 1;
                }
            }
            Ok(())
        }
        fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), Self::Error> {
            let o = offset as usize;
            if !o.is_multiple_of(4) || !bytes.len().is_multiple_of(4) || o + bytes.len() > SIZE {
                return Err(RamFlashError::OutOfBounds);
            }
            for (i, &b) in bytes.iter().enumerate() {
                if let Some(left) = self.budget.as_mut() {
                    if *left == 0 {
                        return Err(RamFlashError::PowerCut);
                    }
                    *left -= 1;
                }
                if self.data[o + i] != 0xFF {
                    return Err(RamFlashError::NotErased);
                }
                self.data[o + i] = b;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ram::RamFlash;
    use super::*;

    type Flash = RamFlash<{ 4 * 256 }, 256>;

    #[test]
    fn blank_flash_has_no_state() {
        let mut log = FlashLog::new(Flash::default(), 0, 4);
        assert_eq!(log.load(&mut [0u8; 64]), Ok(None));
    }

    #[test]
    fn newest_record_wins_across_sector_rotation() {
        let mut log = FlashLog::new(Flash::default(), 0, 4);
        log.load(&mut [0u8; 64]).unwrap();
        for i in 0u32..200 {
            let rec = [i as u8; 37];
            log.append(&rec).unwrap();
        }
        let flash = log.into_inner();
        let erases = flash.erases;
        let mut log = FlashLog::new(flash, 0, 4);
        let mut buf = [0u8; 64];
        let n = log.load(&mut buf).unwrap().unwrap();
        assert_eq!(&buf[..n], &[199u8; 37][..]);
        // 200 records of 56 bytes, 4 per sector: 50 sector fills spread over 4 sectors.
        let (lo, hi) = (erases[..4].iter().min(), erases[..4].iter().max());
        assert!(hi.unwrap() - lo.unwrap() <= 1, "{erases:?}");
    }

    #[test]
    fn a_write_torn_by_power_loss_leaves_the_previous_record() {
        for cut in 0..60 {
            let mut log = FlashLog::new(Flash::default(), 0, 2);
            log.load(&mut [0u8; 64]).unwrap();
            log.append(&[1u8; 40]).unwrap();
            let mut flash = log.into_inner();
            flash.budget = Some(cut);
            let mut log = FlashLog::new(flash, 0, 2);
            log.load(&mut [0u8; 64]).unwrap();
            let torn = log.append(&[2u8; 40]).is_err();
            let mut flash = log.into_inner();
            flash.budget = None;
            let mut log = FlashLog::new(flash, 0, 2);
            let mut buf = [0u8; 64];
            let n = log.load(&mut buf).unwrap().unwrap();
            let want = if torn { 1u8 } else { 2u8 };
            assert_eq!(&buf[..n], &[want; 40][..], "cut after {cut} bytes");
            // And the log keeps working after the cut.
            log.append(&[3u8; 40]).unwrap();
            let n = log.load(&mut buf).unwrap().unwrap();
            assert_eq!(&buf[..n], &[3u8; 40][..], "cut after {cut} bytes");
        }
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(0, b"123456789"), 0xCBF4_3926);
    }
}
