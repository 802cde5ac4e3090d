//! ACS712 hall-effect current sensor: ADC millivolts → RMS milliamps.
//!
//! The sensor outputs VCC/2 at zero current and moves by its sensitivity per ampere. The C3's
//! ADC reads about 0–2.5 V, so the 5 V sensor output goes through a divider (2:1 by default).

/// The three ACS712 variants by full-scale current.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acs712 {
    A5,
    A20,
    A30,
}

impl Acs712 {
    /// Sensitivity in millivolts per ampere (datasheet).
    pub const fn mv_per_a(self) -> u32 {
        match self {
            Acs712::A5 => 185,
            Acs712::A20 => 100,
            Acs712::A30 => 66,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Calibration {
    pub variant: Acs712,
    /// Divider between sensor output and ADC pin: sensor mV = ADC mV × num / den.
    pub divider_num: u32,
    pub divider_den: u32,
    /// Sensor output at zero current in sensor millivolts; nominally 2500, measured at start.
    pub zero_mv: i32,
    /// RMS currents below this are reported as 0 (sensor and ADC noise).
    pub noise_floor_ma: u32,
}

impl Calibration {
    pub const fn new(variant: Acs712) -> Self {
        Calibration {
            variant,
            divider_num: 2,
            divider_den: 1,
            zero_mv: 2500,
            noise_floor_ma: 80,
        }
    }

    pub fn sensor_mv(&self, adc_mv: u16) -> i32 {
        (adc_mv as i64 * self.divider_num as i64 / self.divider_den.max(1) as i64) as i32
    }

    /// Takes the mean of a window sampled with no load (relay open) as the zero offset.
    /// Returns the new offset; an empty window changes nothing.
    pub fn calibrate_zero(&mut self, adc_mv: &[u16]) -> i32 {
        if !adc_mv.is_empty() {
            let sum: i64 = adc_mv.iter().map(|&s| self.sensor_mv(s) as i64).sum();
            self.zero_mv = (sum / adc_mv.len() as i64) as i32;
        }
        self.zero_mv
    }

    /// RMS current over a window of samples. The window should span whole mains cycles
    /// (e.g. 200 samples over 100 ms = 5 cycles at 50 Hz), or the RMS of a sine is biased.
    /// Error: ±1 mA from integer rounding plus the ADC's own error.
    pub fn rms_milliamps(&self, adc_mv: &[u16]) -> u32 {
        if adc_mv.is_empty() {
            return 0;
        }
        let sum_sq: u64 = adc_mv
            .iter()
            .map(|&s| {
                let d = (self.sensor_mv(s) - self.zero_mv) as i64;
                (d * d) as u64
            })
            .sum();
        // Mean square in µV² so the square root keeps three more digits.
        let mean_sq_uv2 = (sum_sq as u128 * 1_000_000) / adc_mv.len() as u128;
        let rms_uv = mean_sq_uv2.isqrt();
        // µV / (mV/A) = mA
        let ma = (rms_uv / self.variant.mv_per_a() as u128).min(u32::MAX as u128) as u32;
        if ma < self.noise_floor_ma {
            0
        } else {
            ma
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn square_wave_of_one_amp_reads_one_amp() {
        let mut cal = Calibration::new(Acs712::A5);
        cal.divider_num = 1;
        cal.calibrate_zero(&[2500; 16]);
        assert_eq!(cal.rms_milliamps(&[2685, 2315, 2685, 2315]), 1000);
    }

    #[test]
    fn readings_below_the_noise_floor_are_zero() {
        let mut cal = Calibration::new(Acs712::A20);
        cal.calibrate_zero(&[1250; 8]);
        assert_eq!(cal.rms_milliamps(&[1252, 1248, 1251, 1249]), 0);
    }

    #[test]
    fn zero_calibration_removes_an_offset_sensor() {
        // A sensor that idles at 2440 mV instead of 2500 (through the 2:1 divider: 1220 mV).
        let mut cal = Calibration::new(Acs712::A20);
        assert_eq!(cal.calibrate_zero(&[1220; 32]), 2440);
        assert_eq!(cal.rms_milliamps(&[1220; 32]), 0);
        // ±50 mV at the pin = ±100 mV at the sensor = 1 A square wave.
        assert_eq!(cal.rms_milliamps(&[1270, 1170, 1270, 1170]), 1000);
    }

    #[test]
    fn sine_rms_is_peak_over_root_two() {
        let mut cal = Calibration::new(Acs712::A20);
        cal.divider_num = 1;
        cal.zero_mv = 2500;
        // 10 A peak sine (1000 mV), 200 samples over 5 cycles.
        let mut w = [0u16; 200];
        for (i, s) in w.iter_mut().enumerate() {
            let phase = i as f64 * 5.0 * 2.0 * core::f64::consts::PI / 200.0;
            *s = (2500.0 + 1000.0 * phase.sin()).round() as u16;
        }
        let ma = cal.rms_milliamps(&w) as i64;
        assert!((ma - 7071).abs() <= 10, "{ma}");
    }
}
