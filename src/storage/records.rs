//! Values stored under the keys of [`super::keys`]. Hand-rolled fixed layouts
//! with a leading format byte: they are read on every delivery, so they are
//! cheap to decode, and the envelope inside is kept exactly as the publisher's
//! encoded bytes (the broker never re-encodes a payload).

use bytes::Bytes;

use super::StorageError;

const FORMAT_V1: u8 = 1;

/// One published message, stored once per topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub topic: u32,
    pub seq: u64,
    /// Broker clock when the publish was accepted (ms since the Unix epoch).
    pub publish_ms: u64,
    /// Never delivered at or after this instant; 0 means never expires.
    pub expires_ms: u64,
    /// The encoded `joinery.v1.Envelope`, with `sender` and `message_id` set.
    pub envelope: Bytes,
}

impl StoredMessage {
    const HEADER: usize = 1 + 8 + 8;

    pub fn encode_value(publish_ms: u64, expires_ms: u64, envelope: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::HEADER + envelope.len());
        out.push(FORMAT_V1);
        out.extend_from_slice(&publish_ms.to_be_bytes());
        out.extend_from_slice(&expires_ms.to_be_bytes());
        out.extend_from_slice(envelope);
        out
    }

    pub fn decode(topic: u32, seq: u64, value: &[u8]) -> Result<Self, StorageError> {
        let corrupt = || StorageError::Corrupt {
            what: format!("message {seq} of topic id {topic}"),
        };
        if value.first() != Some(&FORMAT_V1) || value.len() < Self::HEADER {
            return Err(corrupt());
        }
        let publish_ms = super::keys::be_u64(&value[1..9]).ok_or_else(corrupt)?;
        let expires_ms = super::keys::be_u64(&value[9..17]).ok_or_else(corrupt)?;
        Ok(Self {
            topic,
            seq,
            publish_ms,
            expires_ms,
            envelope: Bytes::copy_from_slice(&value[Self::HEADER..]),
        })
    }

    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.expires_ms != 0 && now_ms >= self.expires_ms
    }
}

/// A subscription's pending entry: the message is neither acked nor dead-lettered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pending {
    /// Deliveries known to have been made (persisted on redelivery and nack).
    pub attempts: u32,
    /// Not to be delivered before this instant (ms since epoch; 0 = at once).
    pub not_before_ms: u64,
}

impl Pending {
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
    const HEADER: usize = 1 + 1 + 4 + 8 + 8 + 8;

    pub fn encode(&self) -> Vec<u8> {
        let m = &self.message;
        let mut out = Vec::with_capacity(Self::HEADER + m.envelope.len());
        out.push(FORMAT_V1);
        out.push(self.reason.code());
        out.extend_from_slice(&self.attempts.to_be_bytes());
        out.extend_from_slice(&self.dead_ms.to_be_bytes());
        out.extend_from_slice(&m.publish_ms.to_be_bytes());
        out.extend_from_slice(&m.expires_ms.to_be_bytes());
        out.extend_from_slice(&m.envelope);
        out
    }

    pub fn decode(topic: u32, seq: u64, value: &[u8]) -> Result<Self, StorageError> {
        let corrupt = || StorageError::Corrupt {
            what: format!("dead letter {seq} of topic id {topic}"),
        };
        if value.first() != Some(&FORMAT_V1) || value.len() < Self::HEADER {
            return Err(corrupt());
        }
        let reason = DeadReason::from_code(value[1]).ok_or_else(corrupt)?;
        let num = |range: std::ops::Range<usize>| super::keys::be_u64(&value[range]);
        Ok(Self {
            reason,
            attempts: super::keys::be_u32(&value[2..6]).ok_or_else(corrupt)?,
            dead_ms: num(6..14).ok_or_else(corrupt)?,
            message: StoredMessage {
                topic,
                seq,
                publish_ms: num(14..22).ok_or_else(corrupt)?,
                expires_ms: num(22..30).ok_or_else(corrupt)?,
                envelope: Bytes::copy_from_slice(&value[Self::HEADER..]),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_message_round_trips() {
        let value = StoredMessage::encode_value(10, 20, b"env");
        let m = StoredMessage::decode(3, 4, &value).unwrap();
        assert_eq!(
            (m.publish_ms, m.expires_ms, &m.envelope[..]),
            (10, 20, &b"env"[..])
        );
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
                envelope: Bytes::from_static(b"xyz"),
            },
        };
        assert_eq!(DeadLetter::decode(1, 2, &d.encode()).unwrap(), d);
    }
}
