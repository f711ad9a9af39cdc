//! One spool record on disk (pure: bytes in, bytes out).
//!
//! ```text
//! magic  u32  "EBR1"
//! len    u32  length of what follows the CRC (the body)
//! seq    u64  the record's sequence number in its spool
//! crc    u32  CRC32C of len, seq and the body
//! body:  appended_us u64 (Unix time, microseconds), qos u8, flags u8 (bit 0 retain,
//!        bit 1 properties follow), topic (u16 length + bytes), [properties], payload (the rest)
//! ```
//!
//! Little-endian throughout. The magic lets recovery find the next record after a corrupt
//! one; the CRC covers everything but the magic, so a record is either whole and as written
//! or refused.

use bytes::Bytes;

use crate::model::{Message, Properties, QoS};

/// The first four bytes of every record.
pub const MAGIC: [u8; 4] = *b"EBR1";
/// Bytes before the body.
pub const HEADER: usize = 20;
/// Largest body accepted when reading (an MQTT packet is at most 256 MiB).
pub const MAX_BODY: usize = 268_435_455 + 4096;

/// A record read back.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Sequence number.
    pub seq: u64,
    /// When it was appended (Unix time, microseconds).
    pub appended_us: u64,
    /// The message.
    pub msg: Message,
}

/// What [`decode`] found at the start of a buffer.
#[derive(Debug, PartialEq)]
pub enum Decoded {
    /// A whole, valid record, and its size in bytes.
    Record(Box<Record>, usize),
    /// The buffer ends inside a record that looks valid so far (read more, or a torn tail).
    Incomplete,
    /// Not a valid record here.
    Corrupt,
}

/// Appends the record of `msg` to `out`; returns its size in bytes.
pub fn encode(seq: u64, appended_us: u64, msg: &Message, out: &mut Vec<u8>) -> usize {
    let start = out.len();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&[0; 4]); // len, below
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&[0; 4]); // crc, below
    let body = out.len();
    out.extend_from_slice(&appended_us.to_le_bytes());
    out.push(msg.qos.as_u8());
    let props = !msg.properties.is_empty();
    out.push(u8::from(msg.retain) | (u8::from(props) << 1));
    put_str(out, &msg.topic);
    if props {
        put_properties(out, &msg.properties);
    }
    out.extend_from_slice(&msg.payload);
    let len = (out.len() - body) as u32;
    out[start + 4..start + 8].copy_from_slice(&len.to_le_bytes());
    let mut crc = crc32c::crc32c(&out[start + 4..start + 16]);
    crc = crc32c::crc32c_append(crc, &out[body..]);
    out[start + 16..start + 20].copy_from_slice(&crc.to_le_bytes());
    out.len() - start
}

/// Reads the record at the start of `buf`.
pub fn decode(buf: &[u8]) -> Decoded {
    if buf.len() < 4 {
        return if MAGIC.starts_with(buf) {
            Decoded::Incomplete
        } else {
            Decoded::Corrupt
        };
    }
    if buf[..4] != MAGIC {
        return Decoded::Corrupt;
    }
    if buf.len() < HEADER {
        return Decoded::Incomplete;
    }
    let len = u32::from_le_bytes(buf[4..8].try_into().expect("4 bytes")) as usize;
    if !(10..=MAX_BODY).contains(&len) {
        return Decoded::Corrupt;
    }
    if buf.len() < HEADER + len {
        return Decoded::Incomplete;
    }
    let seq = u64::from_le_bytes(buf[8..16].try_into().expect("8 bytes"));
    let crc = u32::from_le_bytes(buf[16..20].try_into().expect("4 bytes"));
    let body = &buf[HEADER..HEADER + len];
    let mut c = crc32c::crc32c(&buf[4..16]);
    c = crc32c::crc32c_append(c, body);
    if c != crc {
        return Decoded::Corrupt;
    }
    match body_of(body) {
        Some((appended_us, msg)) => Decoded::Record(
            Box::new(Record {
                seq,
                appended_us,
                msg,
            }),
            HEADER + len,
        ),
        // A CRC that matches a body we cannot read: written by another version, or a bug.
        None => Decoded::Corrupt,
    }
}

/// The offset of the next place in `buf` (after its first byte) where a record could start.
pub fn next_candidate(buf: &[u8]) -> Option<usize> {
    (1..buf.len()).find(|&i| MAGIC.starts_with(&buf[i..(i + 4).min(buf.len())]))
}

fn body_of(b: &[u8]) -> Option<(u64, Message)> {
    let mut r = Reader(b);
    let appended_us = u64::from_le_bytes(r.take(8)?.try_into().ok()?);
    let qos = QoS::from_u8(r.take(1)?[0])?;
    let flags = r.take(1)?[0];
    let topic = r.string()?;
    let properties = if flags & 2 != 0 {
        r.properties()?
    } else {
        Properties::default()
    };
    Some((
        appended_us,
        Message {
            topic: topic.into(),
            payload: Bytes::copy_from_slice(r.0),
            qos,
            retain: flags & 1 != 0,
            properties: properties.into(),
        },
    ))
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_bytes(out, s.as_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    // MQTT strings and binary data are at most 65,535 bytes; longer is cut (never happens for
    // what a broker sent).
    let b = &b[..b.len().min(u16::MAX as usize)];
    out.extend_from_slice(&(b.len() as u16).to_le_bytes());
    out.extend_from_slice(b);
}

fn put_properties(out: &mut Vec<u8>, p: &Properties) {
    let mut present = 0u8;
    present |= u8::from(p.payload_format.is_some());
    present |= u8::from(p.message_expiry.is_some()) << 1;
    present |= u8::from(p.content_type.is_some()) << 2;
    present |= u8::from(p.response_topic.is_some()) << 3;
    present |= u8::from(p.correlation_data.is_some()) << 4;
    out.push(present);
    if let Some(v) = p.payload_format {
        out.push(v);
    }
    if let Some(v) = p.message_expiry {
        out.extend_from_slice(&v.to_le_bytes());
    }
    if let Some(v) = &p.content_type {
        put_str(out, v);
    }
    if let Some(v) = &p.response_topic {
        put_str(out, v);
    }
    if let Some(v) = &p.correlation_data {
        put_bytes(out, v);
    }
    out.extend_from_slice(&(p.user_properties.len() as u32).to_le_bytes());
    for (k, v) in &p.user_properties {
        put_str(out, k);
        put_str(out, v);
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = u16::from_le_bytes(self.take(2)?.try_into().ok()?) as usize;
        self.take(n)
    }

    fn string(&mut self) -> Option<String> {
        String::from_utf8(self.bytes()?.to_vec()).ok()
    }

    fn properties(&mut self) -> Option<Properties> {
        let present = self.take(1)?[0];
        let mut p = Properties::default();
        if present & 1 != 0 {
            p.payload_format = Some(self.take(1)?[0]);
        }
        if present & 2 != 0 {
            p.message_expiry = Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?));
        }
        if present & 4 != 0 {
            p.content_type = Some(self.string()?);
        }
        if present & 8 != 0 {
            p.response_topic = Some(self.string()?);
        }
        if present & 16 != 0 {
            p.correlation_data = Some(Bytes::copy_from_slice(self.bytes()?));
        }
        let n = u32::from_le_bytes(self.take(4)?.try_into().ok()?) as usize;
        if n > self.0.len() / 4 {
            return None;
        }
        for _ in 0..n {
            let k = self.string()?;
            let v = self.string()?;
            p.user_properties.push((k, v));
        }
        Some(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Props;

    fn message(topic: &str, payload: &[u8]) -> Message {
        Message {
            topic: topic.into(),
            payload: Bytes::copy_from_slice(payload),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Props::default(),
        }
    }

    #[test]
    fn a_record_reads_back_as_written_with_every_property() {
        let mut m = message("a/b", b"hello");
        m.retain = true;
        m.qos = QoS::ExactlyOnce;
        m.properties = Properties {
            payload_format: Some(1),
            message_expiry: Some(30),
            content_type: Some("text/plain".into()),
            response_topic: Some("r/t".into()),
            correlation_data: Some(Bytes::from_static(b"\x00\x01")),
            user_properties: vec![("k".into(), "v".into()), ("k".into(), "w".into())],
        }
        .into();
        let mut buf = Vec::new();
        let n = encode(42, 1_700_000_000_000_000, &m, &mut buf);
        assert_eq!(n, buf.len());
        match decode(&buf) {
            Decoded::Record(r, size) => {
                assert_eq!(size, n);
                assert_eq!(r.seq, 42);
                assert_eq!(r.appended_us, 1_700_000_000_000_000);
                assert_eq!(r.msg, m);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_cut_of_a_record_is_incomplete_and_every_flipped_bit_is_corrupt() {
        let mut buf = Vec::new();
        encode(7, 1, &message("t", b"payload"), &mut buf);
        for cut in 0..buf.len() {
            assert_eq!(decode(&buf[..cut]), Decoded::Incomplete, "cut at {cut}");
        }
        for byte in 0..buf.len() {
            for bit in 0..8 {
                let mut b = buf.clone();
                b[byte] ^= 1 << bit;
                assert!(
                    matches!(decode(&b), Decoded::Corrupt | Decoded::Incomplete),
                    "flipping bit {bit} of byte {byte} was accepted"
                );
            }
        }
    }

    #[test]
    fn the_next_candidate_skips_to_the_following_magic() {
        let mut buf = Vec::new();
        encode(1, 1, &message("t", b"x"), &mut buf);
        let second = buf.len();
        encode(2, 1, &message("t", b"y"), &mut buf);
        buf[0] = b'X';
        assert_eq!(decode(&buf), Decoded::Corrupt);
        assert_eq!(next_candidate(&buf), Some(second));
    }
}
