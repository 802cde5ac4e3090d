//! A meter's identity as provisioned on flash (the `identity` partition, written once over USB):
//! so one firmware image can serve every meter of a site and go to all of them over the air,
//! each keeping its own number, secret and WiFi.
//!
//! The record is text: a first line `umeme-identity 1`, then `key=value` lines, ended by the
//! end of the record, a NUL or an erased byte (0xFF). Keys: `meter_id`, `meter_secret`,
//! `wifi_ssid`, `wifi_password`, `gateway_host`; each optional (the board falls back to its
//! built-in value), none twice. Values are printable ASCII; their ranges are checked here, so
//! a bad record is refused as a whole, never half used.

/// The first line of a record.
pub const MAGIC: &str = "umeme-identity 1";
/// Largest record: what a board reads.
pub const MAX_LEN: usize = 512;
/// Longest meter number (it is part of every topic and of OTA versions).
pub const MAX_METER_ID: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("no identity record (blank or not one)")]
    Missing,
    #[error("line {0}: not key=value")]
    Malformed(usize),
    #[error("line {0}: unknown key")]
    UnknownKey(usize),
    #[error("line {0}: key given twice")]
    Duplicate(usize),
    #[error("line {0}: value out of range")]
    BadValue(usize),
}

/// The fields a record sets, borrowed from it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Identity<'a> {
    pub meter_id: Option<&'a str>,
    pub meter_secret: Option<&'a str>,
    pub wifi_ssid: Option<&'a str>,
    pub wifi_password: Option<&'a str>,
    pub gateway_host: Option<&'a str>,
}

/// A meter number: 1 to 32 of `[0-9A-Za-z_-]` (a topic level and an OTA version suffix).
pub fn valid_meter_id(s: &str) -> bool {
    (1..=MAX_METER_ID).contains(&s.len())
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
}

fn valid_ipv4(s: &str) -> bool {
    let mut n = 0;
    for part in s.split('.') {
        n += 1;
        if part.is_empty() || part.len() > 3 || !part.bytes().all(|c| c.is_ascii_digit()) {
            return false;
        }
        if part.parse::<u16>().map_or(true, |v| v > 255) {
            return false;
        }
    }
    n == 4
}

/// Parses a record as read from flash (`bytes` may run past its end into erased flash).
pub fn parse(bytes: &[u8]) -> Result<Identity<'_>, IdentityError> {
    let end = bytes
        .iter()
        .position(|&b| b == 0xFF || b == 0)
        .unwrap_or(bytes.len());
    let text = core::str::from_utf8(&bytes[..end]).map_err(|_| IdentityError::Missing)?;
    let mut lines = text.split('\n');
    if lines.next() != Some(MAGIC) {
        return Err(IdentityError::Missing);
    }
    let mut id = Identity::default();
    for (i, line) in lines.enumerate() {
        let n = i + 2;
        if line.is_empty() {
            continue;
        }
        let (key, value) = line.split_once('=').ok_or(IdentityError::Malformed(n))?;
        if !value.bytes().all(|c| (0x20..0x7f).contains(&c)) {
            return Err(IdentityError::BadValue(n));
        }
        let (slot, ok) = match key {
            "meter_id" => (&mut id.meter_id, valid_meter_id(value)),
            "meter_secret" => (&mut id.meter_secret, (1..=64).contains(&value.len())),
            "wifi_ssid" => (&mut id.wifi_ssid, (1..=32).contains(&value.len())),
            "wifi_password" => (&mut id.wifi_password, (8..=64).contains(&value.len())),
            "gateway_host" => (&mut id.gateway_host, valid_ipv4(value)),
            _ => return Err(IdentityError::UnknownKey(n)),
        };
        if slot.is_some() {
            return Err(IdentityError::Duplicate(n));
        }
        if !ok {
            return Err(IdentityError::BadValue(n));
        }
        *slot = Some(value);
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_record_in_erased_flash_gives_every_field() {
        let mut flash = [0xFFu8; MAX_LEN];
        let rec = b"umeme-identity 1\nmeter_id=METER042\nmeter_secret=s3cret with spaces\nwifi_ssid=site-ap\nwifi_password=pass-phrase\ngateway_host=192.168.4.1\n";
        flash[..rec.len()].copy_from_slice(rec);
        assert_eq!(
            parse(&flash),
            Ok(Identity {
                meter_id: Some("METER042"),
                meter_secret: Some("s3cret with spaces"),
                wifi_ssid: Some("site-ap"),
                wifi_password: Some("pass-phrase"),
                gateway_host: Some("192.168.4.1"),
            })
        );
    }

    #[test]
    fn some_fields_only_leave_the_others_to_the_build() {
        let id = parse(b"umeme-identity 1\nmeter_id=M7\nmeter_secret=x\0junk").unwrap();
        assert_eq!(id.meter_id, Some("M7"));
        assert_eq!(id.meter_secret, Some("x"));
        assert_eq!(id.wifi_ssid, None);
        assert_eq!(id.gateway_host, None);
    }

    #[test]
    fn blank_flash_or_another_format_is_no_record() {
        assert_eq!(parse(&[0xFF; 64]), Err(IdentityError::Missing));
        assert_eq!(parse(b"nvs junk"), Err(IdentityError::Missing));
        assert_eq!(parse(&[0xC3, 0x28, 0xFF]), Err(IdentityError::Missing));
    }

    #[test]
    fn a_bad_line_refuses_the_whole_record() {
        let bad: [(&[u8], IdentityError); 8] = [
            (b"umeme-identity 1\nmeter_id", IdentityError::Malformed(2)),
            (
                b"umeme-identity 1\ncolour=red",
                IdentityError::UnknownKey(2),
            ),
            (
                b"umeme-identity 1\nmeter_id=A\nmeter_id=B",
                IdentityError::Duplicate(3),
            ),
            (
                b"umeme-identity 1\nmeter_id=a/b",
                IdentityError::BadValue(2),
            ),
            (b"umeme-identity 1\nmeter_id=", IdentityError::BadValue(2)),
            (
                b"umeme-identity 1\nwifi_password=short",
                IdentityError::BadValue(2),
            ),
            (
                b"umeme-identity 1\ngateway_host=192.168.4.256",
                IdentityError::BadValue(2),
            ),
            (
                b"umeme-identity 1\nmeter_secret=tab\there",
                IdentityError::BadValue(2),
            ),
        ];
        for (rec, want) in bad {
            assert_eq!(parse(rec), Err(want), "{:?}", core::str::from_utf8(rec));
        }
    }

    #[test]
    fn meter_numbers_are_topic_safe() {
        assert!(valid_meter_id("METER_001-a"));
        assert!(!valid_meter_id("METER/001"));
        assert!(!valid_meter_id("METER+1"));
        assert!(!valid_meter_id("MMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMM"));
    }
}
