//! Values stored under the keys of [`super::keys`]. Hand-rolled fixed layouts
//! with a leading format byte: they are read on every delivery, so they are
//! cheap to decode, and the envelope inside is kept exactly as the publisher's
//! encoded bytes (the broker never re-encodes a payload).

use bytes::Bytes;

use super::bodies::BodyRef;
use super::StorageError;

const FORMAT_V1: u8 = 1;
/// A message whose expiry came from its topic's retention: it has no
/// expiry-index entry, the sweep finds it by walking the topic in sequence
/// order (see the writer's sweep). Otherwise laid out as [`FORMAT_V1`].
const FORMAT_BY_ORDER: u8 = 2;

/// One published message, stored once per topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub topic: u32,
    pub seq: u64,
    /// Broker clock when the publish was accepted (ms since the Unix epoch).
    pub publish_ms: u64,
    /// Never delivered at or after this instant; 0 means never expires.
    pub expires_ms: u64,
    /// SHA-256 of the payload, for the audit log.
    pub digest: [u8; 32],
    pub message_id: String,
    pub message_type: String,
    /// The encoded `joinery.v1.Envelope`, with `sender` and `message_id` set.
    pub envelope: Bytes,
    /// Its expiry is the topic's retention and it has no expiry-index entry.
    pub expiry_by_order: bool,
}

/// The header fields of a message as written by a publish.
#[derive(Debug, Clone, Copy)]
pub struct MessageHeader<'a> {
    pub publish_ms: u64,
    pub expires_ms: u64,
    pub digest: &'a [u8; 32],
    pub message_id: &'a str,
    pub message_type: &'a str,
    /// The expiry is the topic's retention: no expiry-index entry is kept.
    pub expiry_by_order: bool,
}

impl StoredMessage {
    /// format, publish_ms, expires_ms, digest, id length, type length
    const FIXED: usize = 1 + 8 + 8 + 32 + 2 + 2;

    pub fn encode_value(header: MessageHeader<'_>, envelope: &[u8]) -> Vec<u8> {
        let mut out = Self::encode_head(header, envelope.len());
        out.extend_from_slice(envelope);
        out
    }

    /// [`Self::encode_value`] of an envelope not yet encoded: it is encoded
    /// straight into the value, not into a buffer of its own first.
    pub fn encode_value_of(
        header: MessageHeader<'_>,
        envelope: &crate::proto::Envelope,
    ) -> Vec<u8> {
        let mut out = Self::encode_head(header, prost::Message::encoded_len(envelope));
        prost::Message::encode_raw(envelope, &mut out);
        out
    }

    /// Everything of a value before its envelope, with room for `envelope` bytes more.
    fn encode_head(header: MessageHeader<'_>, envelope: usize) -> Vec<u8> {
        let id = clip(header.message_id);
        let ty = clip(header.message_type);
        let mut out = Vec::with_capacity(Self::FIXED + id.len() + ty.len() + envelope);
        let by_order = header.expiry_by_order && header.expires_ms != 0;
        out.push(if by_order { FORMAT_BY_ORDER } else { FORMAT_V1 });
        out.extend_from_slice(&header.publish_ms.to_be_bytes());
        out.extend_from_slice(&header.expires_ms.to_be_bytes());
        out.extend_from_slice(header.digest);
        out.extend_from_slice(&(id.len() as u16).to_be_bytes());
        out.extend_from_slice(id);
        out.extend_from_slice(&(ty.len() as u16).to_be_bytes());
        out.extend_from_slice(ty);
        out
    }

    pub fn decode(topic: u32, seq: u64, value: &[u8]) -> Result<Self, StorageError> {
        let corrupt = || StorageError::Corrupt {
            what: format!("message {seq} of topic id {topic}"),
        };
        let expiry_by_order = match value.first() {
            Some(&FORMAT_V1) => false,
            Some(&FORMAT_BY_ORDER) => true,
            _ => return Err(corrupt()),
        };
        let mut r = Reader { buf: value, at: 1 };
        let publish_ms = r.u64().ok_or_else(corrupt)?;
        let expires_ms = r.u64().ok_or_else(corrupt)?;
        let digest: [u8; 32] = r
            .take(32)
            .and_then(|d| d.try_into().ok())
            .ok_or_else(corrupt)?;
        let message_id = r.short_str().ok_or_else(corrupt)?;
        let message_type = r.short_str().ok_or_else(corrupt)?;
        Ok(Self {
            topic,
            seq,
            publish_ms,
            expires_ms,
            digest,
            message_id,
            message_type,
            envelope: Bytes::copy_from_slice(r.rest()),
            expiry_by_order,
        })
    }

    /// Stands in for a message whose topic copy is gone, so its pending
    /// entry can still be settled.
    pub fn placeholder(topic: u32, seq: u64) -> Self {
        Self {
            topic,
            seq,
            publish_ms: 0,
            expires_ms: 0,
            digest: [0; 32],
            message_id: String::new(),
            message_type: String::new(),
            envelope: Bytes::new(),
            expiry_by_order: false,
        }
    }

    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.expires_ms != 0 && now_ms >= self.expires_ms
    }

    /// The expiry time in an encoded value, read without decoding the rest.
    pub fn expires_ms_of(value: &[u8]) -> Option<u64> {
        if !matches!(value.first(), Some(&FORMAT_V1 | &FORMAT_BY_ORDER)) {
            return None;
        }
        super::keys::be_u64(value.get(9..17)?)
    }

    /// Whether an encoded value's expiry comes from its topic's retention
    /// (no expiry-index entry).
    pub fn expiry_by_order_of(value: &[u8]) -> bool {
        value.first() == Some(&FORMAT_BY_ORDER)
    }

    /// The expiry-index entry's time, if the message has one.
    pub fn indexed_expiry(&self) -> Option<u64> {
        (self.expires_ms != 0 && !self.expiry_by_order).then_some(self.expires_ms)
    }

    /// [`Self::indexed_expiry`] of an encoded value.
    pub fn indexed_expiry_of(value: &[u8]) -> Option<u64> {
        match Self::expires_ms_of(value) {
            Some(at) if at != 0 && !Self::expiry_by_order_of(value) => Some(at),
            _ => None,
        }
    }

    pub(crate) fn header(&self) -> MessageHeader<'_> {
        MessageHeader {
            publish_ms: self.publish_ms,
            expires_ms: self.expires_ms,
            digest: &self.digest,
            message_id: &self.message_id,
            message_type: &self.message_type,
            expiry_by_order: self.expiry_by_order,
        }
    }
}

/// At most u16::MAX bytes, cut on a character boundary.
fn clip(s: &str) -> &[u8] {
    let mut end = s.len().min(u16::MAX as usize);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s.as_bytes()[..end]
}

/// Bounds-checked reading of a value.
struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let out = self.buf.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(out)
    }

    fn u64(&mut self) -> Option<u64> {
        super::keys::be_u64(self.take(8)?)
    }

    fn u32(&mut self) -> Option<u32> {
        super::keys::be_u32(self.take(4)?)
    }

    fn short_str(&mut self) -> Option<String> {
        let len = u16::from_be_bytes(self.take(2)?.try_into().ok()?) as usize;
        String::from_utf8(self.take(len)?.to_vec()).ok()
    }

    fn rest(&self) -> &'a [u8] {
        self.buf.get(self.at..).unwrap_or_default()
    }
}

/// Where a pending entry's message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body<'a> {
    /// The topic copy (`m topic seq`).
    TopicCopy,
    /// Inline: the stored value follows the entry (written by store
    /// formats 2 and 3, still read).
    Inline(&'a [u8]),
    /// In a segment file ([`super::bodies`]), with the head of its stored
    /// value (enough for [`StoredMessage::expires_ms_of`] and
    /// [`StoredMessage::expiry_by_order_of`]).
    Segment(BodyRef, &'a [u8]),
}

/// A subscription's pending entry: the message is neither acked nor dead-lettered.
///
/// Stored as its [`Pending::LEN`] bytes when the message is the topic copy
/// (`m topic seq`), or followed by a [`BodyRef`] to the message's body in a
/// segment file ([`super::bodies`]): a message published to exactly one
/// subscription (and with no expiry-index entry) has no topic copy, so it
/// costs one tree key to store and one to ack instead of two and two, and
/// its bytes stay out of sled. Stores of formats 2 and 3 hold such messages
/// **inline** instead, their stored value after the entry; both are read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pending {
    /// Deliveries known to have been made (persisted on redelivery and nack).
    pub attempts: u32,
    /// Not to be delivered before this instant (ms since epoch; 0 = at once).
    pub not_before_ms: u64,
}

impl Pending {
    /// Bytes of the entry's own fields.
    pub const LEN: usize = 12;

    pub fn encode(&self) -> [u8; 12] {
        let mut out = [0u8; 12];
        out[..4].copy_from_slice(&self.attempts.to_be_bytes());
        out[4..].copy_from_slice(&self.not_before_ms.to_be_bytes());
        out
    }

    pub fn decode(value: &[u8]) -> Result<Self, StorageError> {
        let corrupt = || StorageError::Corrupt {
            what: "pending entry".into(),
        };
        Ok(Self {
            attempts: super::keys::be_u32(value).ok_or_else(corrupt)?,
            not_before_ms: super::keys::be_u64(value.get(4..).ok_or_else(corrupt)?)
                .ok_or_else(corrupt)?,
        })
    }

    /// Whether the entry carries its message (inline or a reference to a
    /// segment file), so that there is no topic copy.
    pub fn is_inline(value: &[u8]) -> bool {
        value.len() > Self::LEN
    }

    /// The entry, and where its message is.
    pub fn split(value: &[u8]) -> Result<(Self, Body<'_>), StorageError> {
        let pending = Self::decode(value)?;
        let body = match value.get(Self::LEN..) {
            Some(tail) if !tail.is_empty() => match BodyRef::decode(tail) {
                Some((body, head)) => Body::Segment(body, head),
                None => Body::Inline(tail),
            },
            _ => Body::TopicCopy,
        };
        Ok((pending, body))
    }

    /// The reference to the message's body in a segment file, if the entry
    /// holds one.
    pub fn body_ref(value: &[u8]) -> Option<BodyRef> {
        BodyRef::decode(value.get(Self::LEN..)?).map(|(body, _)| body)
    }

    /// The entry followed by a reference to its message's body, stored as
    /// `message` (the stored value, of which the head is kept).
    pub fn encode_ref(&self, body: &BodyRef, message: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::LEN + BodyRef::ENCODED);
        out.extend_from_slice(&self.encode());
        body.encode_into(message, &mut out);
        out
    }

    /// The entry followed by the stored message value `message` (inline).
    pub fn encode_inline(&self, message: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::LEN + message.len());
        out.extend_from_slice(&self.encode());
        out.extend_from_slice(message);
        out
    }

    /// `value` with its entry fields replaced by `self`, keeping an inline
    /// message as it is.
    pub fn reencode(&self, value: &[u8]) -> Vec<u8> {
        self.encode_inline(value.get(Self::LEN..).unwrap_or_default())
    }
}

/// Why a message left a subscription without being acked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadReason {
    /// Delivered `max_deliveries` times without an ack.
    MaxDeliveries,
    /// Past `expires_at` or the topic's retention.
    Expired,
    /// The stored envelope could not be decoded (damaged storage).
    Unreadable,
}

impl DeadReason {
    /// Stable wire name, also used in logs and (later) metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadReason::MaxDeliveries => "max_deliveries",
            DeadReason::Expired => "expired",
            DeadReason::Unreadable => "unreadable",
        }
    }

    fn code(self) -> u8 {
        match self {
            DeadReason::MaxDeliveries => 1,
            DeadReason::Expired => 2,
            DeadReason::Unreadable => 3,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(DeadReason::MaxDeliveries),
            2 => Some(DeadReason::Expired),
            3 => Some(DeadReason::Unreadable),
            _ => None,
        }
    }
}

/// A dead letter: a copy of the message (so the topic's copy can be released)
/// with why and when it died.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub reason: DeadReason,
    pub attempts: u32,
    pub dead_ms: u64,
    pub message: StoredMessage,
}

impl DeadLetter {
    pub fn encode(&self) -> Vec<u8> {
        let message = StoredMessage::encode_value(self.message.header(), &self.message.envelope);
        let mut out = Vec::with_capacity(1 + 1 + 4 + 8 + message.len());
        out.push(FORMAT_V1);
        out.push(self.reason.code());
        out.extend_from_slice(&self.attempts.to_be_bytes());
        out.extend_from_slice(&self.dead_ms.to_be_bytes());
        out.extend_from_slice(&message);
        out
    }

    pub fn decode(topic: u32, seq: u64, value: &[u8]) -> Result<Self, StorageError> {
        let corrupt = || StorageError::Corrupt {
            what: format!("dead letter {seq} of topic id {topic}"),
        };
        if value.first() != Some(&FORMAT_V1) {
            return Err(corrupt());
        }
        let mut r = Reader { buf: value, at: 1 };
        let reason = r
            .take(1)
            .and_then(|c| DeadReason::from_code(c[0]))
            .ok_or_else(corrupt)?;
        let attempts = r.u32().ok_or_else(corrupt)?;
        let dead_ms = r.u64().ok_or_else(corrupt)?;
        Ok(Self {
            reason,
            attempts,
            dead_ms,
            message: StoredMessage::decode(topic, seq, r.rest())?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header expiring at 20, by retention order or not.
    fn header(expiry_by_order: bool) -> MessageHeader<'static> {
        MessageHeader {
            publish_ms: 10,
            expires_ms: 20,
            digest: &[7; 32],
            message_id: "id-1",
            message_type: "a.B",
            expiry_by_order,
        }
    }

    #[test]
    fn stored_message_round_trips() {
        let header = header(false);
        let value = StoredMessage::encode_value(header, b"env");
        let m = StoredMessage::decode(3, 4, &value).unwrap();
        assert_eq!(StoredMessage::expires_ms_of(&value), Some(20));
        assert_eq!(StoredMessage::indexed_expiry_of(&value), Some(20));
        assert_eq!(m.indexed_expiry(), Some(20));
        assert!(!m.expiry_by_order);
        assert_eq!(
            (m.publish_ms, m.expires_ms, &m.envelope[..]),
            (10, 20, &b"env"[..])
        );
        assert_eq!(
            (m.message_id.as_str(), m.message_type.as_str()),
            ("id-1", "a.B")
        );
        assert_eq!(m.digest, [7; 32]);
    }

    #[test]
    fn truncated_values_are_corrupt_not_panics() {
        assert!(StoredMessage::decode(1, 1, &[1, 2, 3]).is_err());
        assert!(Pending::decode(&[0, 0]).is_err());
        assert!(DeadLetter::decode(1, 1, &[1]).is_err());
    }

    #[test]
    fn dead_letter_round_trips() {
        let d = DeadLetter {
            reason: DeadReason::Expired,
            attempts: 3,
            dead_ms: 99,
            message: StoredMessage {
                topic: 1,
                seq: 2,
                publish_ms: 5,
                expires_ms: 6,
                digest: [1; 32],
                message_id: "m".into(),
                message_type: "t.T".into(),
                envelope: Bytes::from_static(b"xyz"),
                expiry_by_order: true,
            },
        };
        assert_eq!(DeadLetter::decode(1, 2, &d.encode()).unwrap(), d);
    }

    #[test]
    fn a_retention_expiry_has_no_index_entry_and_reads_back() {
        let header = header(true);
        let value = StoredMessage::encode_value(header, b"env");
        let m = StoredMessage::decode(3, 4, &value).unwrap();
        assert!(m.expiry_by_order && StoredMessage::expiry_by_order_of(&value));
        assert_eq!(StoredMessage::expires_ms_of(&value), Some(20));
        assert_eq!(
            (m.indexed_expiry(), StoredMessage::indexed_expiry_of(&value)),
            (None, None)
        );
        // Without an expiry there is nothing to find by order.
        let never = MessageHeader {
            expires_ms: 0,
            ..header
        };
        let value = StoredMessage::encode_value(never, b"env");
        assert!(!StoredMessage::expiry_by_order_of(&value));
    }
}
