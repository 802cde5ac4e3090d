//! The MQTT 3.1.1 packets a meter needs (CONNECT, PUBLISH, PUBACK, SUBSCRIBE, PINGREQ,
//! DISCONNECT out; CONNACK, PUBLISH, PUBACK, SUBACK, PINGRESP in), written into and read from
//! caller buffers. The gateway speaks 3.1.1 only and refuses protocol level 5, so the board
//! crate uses this over a plain TCP socket instead of an MQTT 5 client library.

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MqttError {
    #[error("buffer too small for the packet")]
    BufferTooSmall,
    #[error("malformed packet from the broker")]
    Malformed,
    #[error("packet of {0} bytes is larger than the receive buffer")]
    TooLarge(usize),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QoS {
    AtMostOnce = 0,
    AtLeastOnce = 1,
}

/// A packet from the broker, borrowing from the receive buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Incoming<'a> {
    /// `code` 0 = accepted; 1 = refused protocol level, 4 = bad credentials, 5 = not authorised.
    ConnAck {
        session_present: bool,
        code: u8,
    },
    Publish {
        topic: &'a str,
        payload: &'a [u8],
        qos: u8,
        retain: bool,
        pkid: Option<u16>,
    },
    PubAck {
        pkid: u16,
    },
    SubAck {
        pkid: u16,
        granted: u8,
    },
    PingResp,
    /// Any other packet type (first byte's high nibble).
    Other(u8),
}

/// Options for CONNECT.
pub struct Connect<'a> {
    pub client_id: &'a str,
    pub username: &'a str,
    pub password: &'a [u8],
    pub keep_alive_s: u16,
    pub clean_session: bool,
    /// Last Will: topic, payload, retained, QoS 1.
    pub will: Option<(&'a str, &'a [u8])>,
}

struct W<'a> {
    buf: &'a mut [u8],
    at: usize,
}

impl W<'_> {
    fn bytes(&mut self, b: &[u8]) -> Result<(), MqttError> {
        let end = self.at + b.len();
        self.buf
            .get_mut(self.at..end)
            .ok_or(MqttError::BufferTooSmall)?
            .copy_from_slice(b);
        self.at = end;
        Ok(())
    }
    fn u8(&mut self, v: u8) -> Result<(), MqttError> {
        self.bytes(&[v])
    }
    fn u16(&mut self, v: u16) -> Result<(), MqttError> {
        self.bytes(&v.to_be_bytes())
    }
    fn str(&mut self, s: &[u8]) -> Result<(), MqttError> {
        let len = u16::try_from(s.len()).map_err(|_| MqttError::BufferTooSmall)?;
        self.u16(len)?;
        self.bytes(s)
    }
    fn remaining_length(&mut self, mut n: usize) -> Result<(), MqttError> {
        if n > 268_435_455 {
            return Err(MqttError::BufferTooSmall);
        }
        loop {
            let mut b = (n % 128) as u8;
            n /= 128;
            if n > 0 {
                b |= 0x80;
            }
            self.u8(b)?;
            if n == 0 {
                return Ok(());
            }
        }
    }
}

fn packet(
    buf: &mut [u8],
    first: u8,
    body_len: usize,
    body: impl FnOnce(&mut W) -> Result<(), MqttError>,
) -> Result<usize, MqttError> {
    let mut w = W { buf, at: 0 };
    w.u8(first)?;
    w.remaining_length(body_len)?;
    let start = w.at;
    body(&mut w)?;
    debug_assert_eq!(w.at - start, body_len);
    Ok(w.at)
}

pub fn connect(buf: &mut [u8], c: &Connect) -> Result<usize, MqttError> {
    let mut flags = 0x80 | 0x40; // username, password
    if c.clean_session {
        flags |= 0x02;
    }
    let mut len = 10 + 2 + c.client_id.len() + 2 + c.username.len() + 2 + c.password.len();
    if let Some((t, p)) = c.will {
        flags |= 0x04 | 0x08 | 0x20; // will, QoS 1, retain
        len += 2 + t.len() + 2 + p.len();
    }
    packet(buf, 0x10, len, |w| {
        w.str(b"MQTT")?;
        w.u8(4)?; // protocol level 3.1.1
        w.u8(flags)?;
        w.u16(c.keep_alive_s)?;
        w.str(c.client_id.as_bytes())?;
        if let Some((t, p)) = c.will {
            w.str(t.as_bytes())?;
            w.str(p)?;
        }
        w.str(c.username.as_bytes())?;
        w.str(c.password)
    })
}

pub fn publish(
    buf: &mut [u8],
    topic: &str,
    payload: &[u8],
    qos: QoS,
    retain: bool,
    pkid: u16,
    dup: bool,
) -> Result<usize, MqttError> {
    let mut first = 0x30 | ((qos as u8) << 1) | retain as u8;
    if dup && qos == QoS::AtLeastOnce {
        first |= 0x08;
    }
    let id_len = if qos == QoS::AtLeastOnce { 2 } else { 0 };
    packet(buf, first, 2 + topic.len() + id_len + payload.len(), |w| {
        w.str(topic.as_bytes())?;
        if qos == QoS::AtLeastOnce {
            w.u16(pkid)?;
        }
        w.bytes(payload)
    })
}

pub fn puback(buf: &mut [u8], pkid: u16) -> Result<usize, MqttError> {
    packet(buf, 0x40, 2, |w| w.u16(pkid))
}

pub fn subscribe(buf: &mut [u8], pkid: u16, filter: &str, qos: QoS) -> Result<usize, MqttError> {
    packet(buf, 0x82, 2 + 2 + filter.len() + 1, |w| {
        w.u16(pkid)?;
        w.str(filter.as_bytes())?;
        w.u8(qos as u8)
    })
}

pub fn pingreq(buf: &mut [u8]) -> Result<usize, MqttError> {
    packet(buf, 0xC0, 0, |_| Ok(()))
}

pub fn disconnect(buf: &mut [u8]) -> Result<usize, MqttError> {
    packet(buf, 0xE0, 0, |_| Ok(()))
}

/// Reads one packet from the start of `buf`: `Ok(None)` when more bytes are needed, else the
/// packet and how many bytes it used. `max` bounds the packet size (the receive buffer).
pub fn decode(buf: &[u8], max: usize) -> Result<Option<(Incoming<'_>, usize)>, MqttError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let mut len = 0usize;
    let mut i = 1;
    loop {
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        len += ((b & 0x7F) as usize) << (7 * (i - 1));
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        if i > 4 {
            return Err(MqttError::Malformed);
        }
    }
    let total = i + len;
    if total > max {
        return Err(MqttError::TooLarge(total));
    }
    let Some(body) = buf.get(i..total) else {
        return Ok(None);
    };
    let u16_at = |k: usize| -> Result<u16, MqttError> {
        match (body.get(k), body.get(k + 1)) {
            (Some(&a), Some(&b)) => Ok(u16::from_be_bytes([a, b])),
            _ => Err(MqttError::Malformed),
        }
    };
    let p = match first >> 4 {
        2 => Incoming::ConnAck {
            session_present: body.first().ok_or(MqttError::Malformed)? & 1 == 1,
            code: *body.get(1).ok_or(MqttError::Malformed)?,
        },
        3 => {
            let qos = (first >> 1) & 3;
            let tlen = u16_at(0)? as usize;
            let topic = body.get(2..2 + tlen).ok_or(MqttError::Malformed)?;
            let topic = core::str::from_utf8(topic).map_err(|_| MqttError::Malformed)?;
            let mut at = 2 + tlen;
            let pkid = if qos > 0 {
                at += 2;
                Some(u16_at(2 + tlen)?)
            } else {
                None
            };
            if qos > 2 || at > body.len() {
                return Err(MqttError::Malformed);
            }
            Incoming::Publish {
                topic,
                payload: &body[at..],
                qos,
                retain: first & 1 == 1,
                pkid,
            }
        }
        4 => Incoming::PubAck { pkid: u16_at(0)? },
        9 => Incoming::SubAck {
            pkid: u16_at(0)?,
            granted: *body.get(2).ok_or(MqttError::Malformed)?,
        },
        13 => Incoming::PingResp,
        t => Incoming::Other(t),
    };
    Ok(Some((p, total)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_is_mqtt_311_with_credentials() {
        let mut buf = [0u8; 128];
        let n = connect(
            &mut buf,
            &Connect {
                client_id: "M1",
                username: "M1",
                password: b"pw",
                keep_alive_s: 60,
                clean_session: true,
                will: None,
            },
        )
        .unwrap();
        assert_eq!(
            &buf[..n],
            &[
                0x10, 22, 0, 4, b'M', b'Q', b'T', b'T', 4, 0xC2, 0, 60, 0, 2, b'M', b'1', 0, 2,
                b'M', b'1', 0, 2, b'p', b'w'
            ][..]
        );
    }

    #[test]
    fn publish_round_trips_through_decode() {
        let mut buf = [0u8; 300];
        let payload = [b'x'; 200]; // two-byte remaining length
        let n = publish(&mut buf, "a/b", &payload, QoS::AtLeastOnce, true, 7, false).unwrap();
        assert_eq!(decode(&buf[..n - 1], 512), Ok(None), "needs the last byte");
        let (p, used) = decode(&buf[..n], 512).unwrap().unwrap();
        assert_eq!(used, n);
        assert_eq!(
            p,
            Incoming::Publish {
                topic: "a/b",
                payload: &payload,
                qos: 1,
                retain: true,
                pkid: Some(7)
            }
        );
        assert_eq!(decode(&buf[..n], 100), Err(MqttError::TooLarge(n)));
    }

    #[test]
    fn broker_packets_decode() {
        assert_eq!(
            decode(&[0x20, 2, 0, 5], 16).unwrap(),
            Some((
                Incoming::ConnAck {
                    session_present: false,
                    code: 5
                },
                4
            ))
        );
        assert_eq!(
            decode(&[0x40, 2, 1, 2], 16).unwrap(),
            Some((Incoming::PubAck { pkid: 258 }, 4))
        );
        assert_eq!(
            decode(&[0x90, 3, 0, 1, 1], 16).unwrap(),
            Some((
                Incoming::SubAck {
                    pkid: 1,
                    granted: 1
                },
                5
            ))
        );
        assert_eq!(
            decode(&[0xD0, 0], 16).unwrap(),
            Some((Incoming::PingResp, 2))
        );
        assert_eq!(
            decode(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 1], 1 << 30),
            Err(MqttError::Malformed)
        );
    }
}
