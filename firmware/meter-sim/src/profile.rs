//! Load profiles: the current a household draws at a simulated time of day.

use rand::Rng;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Profile {
    /// The same current all the time.
    Constant { ma: u32 },
    /// A household day: low at night, a morning bump and an evening peak.
    Daily { base_ma: u32, peak_ma: u32 },
    /// Uniformly random between 0 and `max_ma`, new every step.
    Random { max_ma: u32 },
}

impl Profile {
    /// Parses `constant:MA`, `daily:BASE_MA:PEAK_MA` or `random:MAX_MA`.
    pub fn parse(s: &str) -> Result<Profile, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let num = |i: usize| -> Result<u32, String> {
            parts
                .get(i)
                .ok_or_else(|| format!("profile {s:?} needs more numbers"))?
                .parse()
                .map_err(|e| format!("profile {s:?}: {e}"))
        };
        match parts[0] {
            "constant" => Ok(Profile::Constant { ma: num(1)? }),
            "daily" => Ok(Profile::Daily {
                base_ma: num(1)?,
                peak_ma: num(2)?,
            }),
            "random" => Ok(Profile::Random { max_ma: num(1)? }),
            other => Err(format!(
                "unknown profile {other:?} (constant:MA, daily:BASE:PEAK, random:MAX)"
            )),
        }
    }

    /// The current in mA at `sim_s` seconds after midnight (any day).
    pub fn current_ma(&self, sim_s: u64, rng: &mut impl Rng) -> u32 {
        match *self {
            Profile::Constant { ma } => ma,
            Profile::Random { max_ma } => rng.gen_range(0..=max_ma),
            Profile::Daily { base_ma, peak_ma } => {
                let hour = (sim_s % 86_400) as f64 / 3600.0;
                // Two bumps: 07:00 (half height) and 20:00 (full height).
                let bump = |center: f64, width: f64| (-((hour - center) / width).powi(2)).exp();
                let shape = (0.5 * bump(7.0, 1.5) + bump(20.0, 2.0)).min(1.0);
                base_ma + ((peak_ma.saturating_sub(base_ma)) as f64 * shape) as u32
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_parse_and_shape() {
        let mut rng = rand::thread_rng();
        let d = Profile::parse("daily:200:8000").unwrap();
        assert!(d.current_ma(3 * 3600, &mut rng) < 400, "night is low");
        assert!(d.current_ma(20 * 3600, &mut rng) > 7000, "evening peak");
        assert_eq!(
            Profile::parse("constant:1500")
                .unwrap()
                .current_ma(0, &mut rng),
            1500
        );
        assert!(
            Profile::parse("random:100")
                .unwrap()
                .current_ma(0, &mut rng)
                <= 100
        );
        assert!(Profile::parse("sine:1").is_err());
    }
}
