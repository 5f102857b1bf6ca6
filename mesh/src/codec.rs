//! The wire codec: bincode with an explicit version byte and a size limit.
//! Every decode of network or disk input goes through [`decode`], which never
//! panics and never allocates more than the limit.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The envelope version written before every message.
pub const WIRE_VERSION: u8 = 1;

/// Largest message accepted by default (16 MiB): Raft snapshots of large
/// clusters fit; anything bigger is hostile or broken.
pub const DEFAULT_LIMIT: usize = 16 << 20;

/// Why bytes did not decode.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The input is empty.
    #[error("empty message")]
    Empty,
    /// The version byte is not one we speak.
    #[error("unsupported message version {0} (this node speaks {WIRE_VERSION})")]
    Version(u8),
    /// The input is larger than the limit.
    #[error("message of {size} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// Input size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The body is not a valid encoding of the expected type.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// Bytes left over after the value.
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
}

/// Why a value did not encode (only for values serde cannot express).
#[derive(Debug, thiserror::Error)]
#[error("cannot encode message: {0}")]
pub struct EncodeError(pub String);

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<DEFAULT_LIMIT>()
}

/// Encodes `value` behind the version byte, into one buffer of the exact
/// size (measured first: no growing and copying of large messages).
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, EncodeError> {
    let fail = |e: bincode::error::EncodeError| EncodeError(e.to_string());
    let mut size = bincode::enc::write::SizeWriter::default();
    bincode::serde::encode_into_writer(value, &mut size, config()).map_err(fail)?;
    let mut out = vec![0; 1 + size.bytes_written];
    out[0] = WIRE_VERSION;
    let used = bincode::serde::encode_into_slice(value, &mut out[1..], config()).map_err(fail)?;
    out.truncate(1 + used);
    Ok(out)
}

/// Decodes a value written by [`encode`], refusing inputs above `limit` bytes.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], limit: usize) -> Result<T, DecodeError> {
    let limit = limit.min(DEFAULT_LIMIT);
    if bytes.len() > limit {
        return Err(DecodeError::TooLarge {
            size: bytes.len(),
            limit,
        });
    }
    let (&version, body) = bytes.split_first().ok_or(DecodeError::Empty)?;
    if version != WIRE_VERSION {
        return Err(DecodeError::Version(version));
    }
    let (value, used) = bincode::serde::decode_from_slice(body, config())
        .map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if used != body.len() {
        return Err(DecodeError::Trailing(body.len() - used));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::Command;
    use crate::ids::NodeId;
    use proptest::prelude::*;

    #[test]
    fn commands_round_trip() {
        let cmd = Command::RemoveNode(NodeId(42));
        let bytes = encode(&cmd).unwrap();
        assert_eq!(decode::<Command>(&bytes, 1024).unwrap(), cmd);
    }

    #[test]
    fn wrong_version_and_size_are_refused() {
        let mut bytes = encode(&Command::RemoveNode(NodeId(1))).unwrap();
        assert!(matches!(
            decode::<Command>(&bytes, 1),
            Err(DecodeError::TooLarge { .. })
        ));
        bytes[0] = 9;
        assert!(matches!(
            decode::<Command>(&bytes, 1024),
            Err(DecodeError::Version(9))
        ));
        assert!(matches!(
            decode::<Command>(&[], 1024),
            Err(DecodeError::Empty)
        ));
    }

    proptest! {
        #[test]
        fn hostile_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode::<Command>(&bytes, 4096);
            let mut v = vec![WIRE_VERSION];
            v.extend_from_slice(&bytes);
            let _ = decode::<Command>(&v, 4096);
        }
    }
}
