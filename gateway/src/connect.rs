//! The meter port's CONNECT, read by hand before anything else sees it.
//!
//! rumqttc's v4 codec turns an MQTT 3.1 or 5 CONNECT into a decode error (so the client got no
//! CONNACK and retried blindly), accepts the reserved flag and trailing bytes, and folds an
//! empty username into "no credentials", which the original firmwares' two CONNECT forms need
//! told apart. This parser follows MQTT 3.1.1 §3.1 and says which of three things to do:
//! go on, answer CONNACK 1 (unsupported protocol level), or close without a CONNACK.

use rumqttc::{LastWill, QoS};

/// A CONNECT as the broker needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct Connect {
    pub client_id: String,
    pub clean_session: bool,
    pub keep_alive: u16,
    pub will: Option<LastWill>,
    /// `None` when the username flag is clear; `Some("")` when an empty one was sent.
    pub username: Option<String>,
    /// Raw bytes: MQTT passwords are binary.
    pub password: Option<Vec<u8>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    /// MQTT 3.1 (`MQIsdp` level 3) or MQTT 5: answered with CONNACK 1, then closed.
    #[error("unsupported protocol level {0}")]
    ProtocolVersion(u8),
    /// Anything else wrong: closed without a CONNACK (MQTT 3.1.1 §3.1.4).
    #[error("malformed CONNECT: {0}")]
    Malformed(&'static str),
}

impl ConnectError {
    /// The metric label and log reason.
    pub fn reason(&self) -> &'static str {
        match self {
            ConnectError::ProtocolVersion(_) => "protocol_version",
            ConnectError::Malformed(r) => r,
        }
    }
}

/// Where the first packet's body starts and how long it is, once its fixed header is buffered:
/// `Ok(None)` while more bytes are needed.
pub fn frame(buf: &[u8]) -> Result<Option<(usize, usize)>, &'static str> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    if first >> 4 != 1 {
        return Err("not_connect");
    }
    let mut len = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        len |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((2 + i, len)));
        }
    }
    Err("malformed_connect")
}

/// Parses a whole CONNECT packet (fixed header included).
pub fn parse(packet: &[u8]) -> Result<Connect, ConnectError> {
    use ConnectError::Malformed;
    let (start, len) = frame(packet)
        .map_err(Malformed)?
        .ok_or(Malformed("malformed_connect"))?;
    if packet[0] & 0x0f != 0 {
        // §2.2.2: CONNECT's fixed-header flags are reserved and 0.
        return Err(Malformed("fixed_header_flags"));
    }
    let body = packet
        .get(start..start + len)
        .ok_or(Malformed("malformed_connect"))?;
    let mut r = Reader(body);
    let name = r.bytes()?;
    let level = r.u8()?;
    match (name, level) {
        (b"MQTT", 4) => {}
        (b"MQTT", l) | (b"MQIsdp", l) => return Err(ConnectError::ProtocolVersion(l)),
        _ => return Err(Malformed("protocol_name")),
    }
    let flags = r.u8()?;
    if flags & 0x01 != 0 {
        return Err(Malformed("reserved_flag"));
    }
    let keep_alive = r.u16()?;
    let client_id = r.string()?;
    let will = if flags & 0x04 != 0 {
        let qos = match (flags >> 3) & 0x03 {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            2 => QoS::ExactlyOnce,
            _ => return Err(Malformed("will_flags")),
        };
        let topic = r.string()?;
        let message = r.bytes()?.to_vec();
        Some(LastWill::new(topic, message, qos, flags & 0x20 != 0))
    } else if flags & 0x38 != 0 {
        return Err(Malformed("will_flags"));
    } else {
        None
    };
    let username = if flags & 0x80 != 0 {
        Some(r.string()?)
    } else {
        None
    };
    let password = match (flags & 0x40 != 0, username.is_some()) {
        (true, false) => return Err(Malformed("password_without_username")),
        (true, true) => Some(r.bytes()?.to_vec()),
        (false, _) => None,
    };
    if !r.0.is_empty() {
        return Err(Malformed("trailing_bytes"));
    }
    Ok(Connect {
        client_id,
        clean_session: flags & 0x02 != 0,
        keep_alive,
        will,
        username,
        password,
    })
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ConnectError> {
        if self.0.len() < n {
            return Err(ConnectError::Malformed("malformed_connect"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, ConnectError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, ConnectError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn bytes(&mut self) -> Result<&'a [u8], ConnectError> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }

    fn string(&mut self) -> Result<String, ConnectError> {
        let b = self.bytes()?;
        // §1.5.3: UTF-8 without U+0000.
        match std::str::from_utf8(b) {
            Ok(s) if !s.contains('\0') => Ok(s.to_string()),
            _ => Err(ConnectError::Malformed("bad_utf8")),
        }
    }
}

/// The original Umeme firmwares' client ids: `ESP32_<meter>_<hex>` (Clean firmware) and
/// `ESP32_METER_<meter>_<hex>` (Modified firmware), `<hex>` being Arduino's
/// `String(random(0xffff), HEX)`: 1 to 4 lowercase hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirmwareForm {
    Clean,
    Modified,
}

impl FirmwareForm {
    fn prefix(self) -> &'static str {
        match self {
            FirmwareForm::Clean => "ESP32_",
            FirmwareForm::Modified => "ESP32_METER_",
        }
    }

    /// The meter number inside `client_id` when it has this form.
    pub fn meter_in(self, client_id: &str) -> Option<&str> {
        let rest = client_id.strip_prefix(self.prefix())?;
        let (meter, hex) = rest.rsplit_once('_')?;
        let hex_ok = (1..=4).contains(&hex.len())
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        (hex_ok && !meter.is_empty()).then_some(meter)
    }
}

/// Whether `client_id` is an acceptable client id for a meter that logged in as `username`:
/// the username itself, or one of the original firmwares' forms around it.
pub fn client_id_fits(client_id: &str, username: &str) -> bool {
    client_id == username
        || [FirmwareForm::Modified, FirmwareForm::Clean]
            .iter()
            .any(|f| f.meter_in(client_id) == Some(username))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PubSubClient 2.8's CONNECT: level 4, clean session, keep-alive 60, user/pass flags only
    /// when given (the Modified firmware passes its empty constants, so both flags are set).
    pub fn pubsubclient(client_id: &str, login: Option<(&str, &str)>) -> Vec<u8> {
        let mut v = vec![0, 4, b'M', b'Q', b'T', b'T', 4];
        let flags = 0x02 | if login.is_some() { 0xc0 } else { 0 };
        v.extend([flags, 0, 60]);
        let mut s = |x: &str| {
            v.extend((x.len() as u16).to_be_bytes());
            v.extend(x.as_bytes());
        };
        s(client_id);
        if let Some((u, p)) = login {
            s(u);
            s(p);
        }
        let mut p = vec![0x10, v.len() as u8];
        p.extend(v);
        p
    }

    #[test]
    fn the_firmwares_connects_parse_with_their_empty_username_kept() {
        let c = parse(&pubsubclient("ESP32_METER_55555_3f2a", Some(("", "")))).unwrap();
        assert_eq!(c.username.as_deref(), Some(""));
        assert_eq!(c.password.as_deref(), Some(&b""[..]));
        assert!(c.clean_session);
        assert_eq!(c.keep_alive, 60);
        let c = parse(&pubsubclient("ESP32_55555_7", None)).unwrap();
        assert_eq!(c.username, None);
        assert_eq!(FirmwareForm::Clean.meter_in(&c.client_id), Some("55555"));
    }

    #[test]
    fn reserved_flag_trailing_bytes_and_header_flags_are_malformed() {
        let good = pubsubclient("m1", Some(("m1", "secret-1")));
        let mut reserved = good.clone();
        reserved[9] |= 0x01;
        assert_eq!(
            parse(&reserved),
            Err(ConnectError::Malformed("reserved_flag"))
        );
        let mut trailing = good.clone();
        trailing.push(0);
        trailing[1] += 1;
        assert_eq!(
            parse(&trailing),
            Err(ConnectError::Malformed("trailing_bytes"))
        );
        let mut header = good.clone();
        header[0] |= 0x02;
        assert_eq!(
            parse(&header),
            Err(ConnectError::Malformed("fixed_header_flags"))
        );
        let mut pass_only = pubsubclient("m1", None);
        pass_only[9] |= 0x40;
        assert_eq!(
            parse(&pass_only),
            Err(ConnectError::Malformed("password_without_username"))
        );
    }

    #[test]
    fn mqtt_3_1_and_5_are_unsupported_versions_not_garbage() {
        let mut v5 = pubsubclient("m1", None);
        v5[8] = 5;
        assert_eq!(parse(&v5), Err(ConnectError::ProtocolVersion(5)));
        let mut v3 = vec![0x10, 0];
        let body = [&[0u8, 6][..], b"MQIsdp", &[3, 0x02, 0, 60, 0, 2], b"m1"].concat();
        v3[1] = body.len() as u8;
        v3.extend(body);
        assert_eq!(parse(&v3), Err(ConnectError::ProtocolVersion(3)));
    }

    #[test]
    fn firmware_client_ids_name_their_meter() {
        assert!(client_id_fits("55555", "55555"));
        assert!(client_id_fits("ESP32_METER_55555_ffff", "55555"));
        assert!(client_id_fits("ESP32_55555_0", "55555"));
        assert!(!client_id_fits("ESP32_METER_55555_fffff", "55555"));
        assert!(!client_id_fits("ESP32_METER_55555_FF", "55555"));
        assert!(!client_id_fits("ESP32_METER_55556_ff", "55555"));
        assert!(!client_id_fits("ESP32_METER_55555_", "55555"));
        assert_eq!(
            FirmwareForm::Modified.meter_in("ESP32_METER_M_1_ab"),
            Some("M_1")
        );
    }
}
