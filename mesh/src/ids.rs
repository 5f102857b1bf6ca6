//! Identifiers.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A node's identity in the cluster. It is also the node's Raft ID.
///
/// Shown to users as 16 lowercase hex digits; any unique prefix of that text
/// names the node on the command line.
///
/// In human-readable formats (JSON, TOML) it is that hex text; in binary
/// ones (the wire, the log) a plain `u64`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub u64);

impl Serialize for NodeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.collect_str(self)
        } else {
            s.serialize_u64(self.0)
        }
    }
}

impl<'de> Deserialize<'de> for NodeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let text = String::deserialize(d)?;
            text.parse().map_err(serde::de::Error::custom)
        } else {
            u64::deserialize(d).map(NodeId)
        }
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The text was not 16 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a node ID (16 hex digits)")]
pub struct ParseNodeIdError(pub String);

impl FromStr for NodeId {
    type Err = ParseNodeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ParseNodeIdError(s.to_owned()));
        }
        u64::from_str_radix(s, 16)
            .map(NodeId)
            .map_err(|_| ParseNodeIdError(s.to_owned()))
    }
}

/// Lowercase hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    out
}

/// IDs made of text (16 hex digits when Shoal makes them), one type per
/// kind of object, so that a task's ID cannot be passed where a network's
/// is wanted. Each reads as its text (`Deref<Target = str>`, `Display`),
/// serializes as it (the log and snapshots keep their format), and looks up
/// maps keyed by it with a `&str`.
macro_rules! text_id {
    ($name:ident, $what:literal) => {
        #[doc = concat!("The ID of a ", $what, ".")]
        #[derive(
            Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            #[doc = concat!("The ", $what, " ID `text`.")]
            pub fn new(text: impl Into<String>) -> Self {
                $name(text.into())
            }

            /// Its text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl std::borrow::Borrow<String> for $name {
            fn borrow(&self) -> &String {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<String> for $name {
            fn from(text: String) -> Self {
                $name(text)
            }
        }

        impl From<&str> for $name {
            fn from(text: &str) -> Self {
                $name(text.to_owned())
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                &self.0 == other
            }
        }

        impl PartialEq<$name> for String {
            fn eq(&self, other: &$name) -> bool {
                *self == other.0
            }
        }

        impl PartialEq<$name> for str {
            fn eq(&self, other: &$name) -> bool {
                self == other.0
            }
        }
    };
}

text_id!(NetworkId, "network");
text_id!(ServiceId, "service");
text_id!(TaskId, "task");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_round_trips_through_text() {
        let id = NodeId(0x00ab_cdef_0123_4567);
        assert_eq!(id.to_string(), "00abcdef01234567");
        assert_eq!("00abcdef01234567".parse::<NodeId>(), Ok(id));
        assert!("xyz".parse::<NodeId>().is_err());
        assert!("00abcdef0123456".parse::<NodeId>().is_err());
    }

    #[test]
    fn node_ids_are_hex_text_in_json() {
        let id = NodeId(0xab);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"00000000000000ab\"");
        assert_eq!(serde_json::from_str::<NodeId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<NodeId>("171").is_err());
        let bin = crate::codec::encode(&id).unwrap();
        assert_eq!(crate::codec::decode::<NodeId>(&bin, 64).unwrap(), id);
    }

    #[test]
    fn hex_is_lowercase_two_digits_per_byte() {
        assert_eq!(to_hex(&[0, 0x0f, 0xa0, 0xff]), "000fa0ff");
    }

    #[test]
    fn text_ids_encode_as_their_text_and_look_up_by_it() {
        // The log and snapshots written before these types read the same.
        let id = TaskId::from("0123abcd");
        let text = String::from("0123abcd");
        let enc = crate::codec::encode(&id).unwrap();
        assert_eq!(enc, crate::codec::encode(&text).unwrap());
        let back: TaskId = crate::codec::decode(&enc, 64).unwrap();
        assert_eq!(back, id);
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"0123abcd\"");
        // Maps keyed by an ID answer a `&str` (a user's reference).
        let map = std::collections::BTreeMap::from([(id.clone(), 1)]);
        assert_eq!(map.get("0123abcd"), Some(&1));
        assert!(id == "0123abcd" && id.starts_with("0123"));
        assert_eq!(id.to_string(), "0123abcd");
    }
}
