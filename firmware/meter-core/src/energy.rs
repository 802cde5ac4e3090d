//! Power and the cumulative energy register.
//!
//! The register counts whole Wh; what is left below 1 Wh is carried in mW·ms, so after any
//! sequence of samples `wh × 3.6e9 + remainder = Σ power_mW × dt_ms` exactly: the register is
//! never more than 1 Wh below the true integral and never above it.

/// mW·ms in one Wh.
pub const MW_MS_PER_WH: u128 = 3_600_000_000;

/// Real power in mW from RMS current and voltage and an assumed power factor (‰). The meter
/// has no voltage sensor, so `voltage_mv` is the nominal mains voltage.
pub fn power_mw(current_ma: u32, voltage_mv: u32, power_factor_permille: u32) -> u32 {
    let p = current_ma as u128 * voltage_mv as u128 * power_factor_permille.min(1000) as u128
        / 1_000_000;
    p.min(u32::MAX as u128) as u32
}

/// The meter's energy register: whole Wh plus the carried remainder.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Register {
    wh: u64,
    rem_mw_ms: u64,
}

impl Register {
    /// A register restored from flash.
    pub fn restore(wh: u64, rem_mw_ms: u64) -> Register {
        let rem = rem_mw_ms as u128 % MW_MS_PER_WH;
        Register {
            wh: wh.saturating_add((rem_mw_ms as u128 / MW_MS_PER_WH) as u64),
            rem_mw_ms: rem as u64,
        }
    }

    pub fn wh(&self) -> u64 {
        self.wh
    }

    pub fn remainder_mw_ms(&self) -> u64 {
        self.rem_mw_ms
    }

    /// Integrates `power_mw` held for `dt_ms`; returns the whole Wh added.
    pub fn integrate(&mut self, power_mw: u32, dt_ms: u32) -> u64 {
        let total = self.rem_mw_ms as u128 + power_mw as u128 * dt_ms as u128;
        let add = (total / MW_MS_PER_WH) as u64;
        self.rem_mw_ms = (total % MW_MS_PER_WH) as u64;
        self.wh = self.wh.saturating_add(add);
        add
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_hour_at_230_watts_is_230_wh() {
        let mut r = Register::default();
        for _ in 0..3600 {
            r.integrate(230_000, 1000);
        }
        assert_eq!((r.wh(), r.remainder_mw_ms()), (230, 0));
    }

    #[test]
    fn tiny_loads_are_not_lost_to_rounding() {
        // 1 W for one hour in 100 ms steps: each step is far below 1 Wh.
        let mut r = Register::default();
        for _ in 0..36_000 {
            r.integrate(1000, 100);
        }
        assert_eq!(r.wh(), 1);
    }

    #[test]
    fn power_uses_voltage_and_power_factor() {
        assert_eq!(power_mw(1000, 230_000, 1000), 230_000);
        assert_eq!(power_mw(1000, 230_000, 900), 207_000);
    }

    #[test]
    fn restore_normalises_the_remainder() {
        let r = Register::restore(5, MW_MS_PER_WH as u64 + 7);
        assert_eq!((r.wh(), r.remainder_mw_ms()), (6, 7));
    }
}
