//! Join tokens: `SHOAL-1-<CA fingerprint>-<secret>`.
//!
//! The fingerprint (64 lowercase hex digits, SHA-256 of the CA certificate's
//! DER) lets the joiner pin the cluster CA before it trusts anything the
//! manager says; the secret (32 lowercase hex digits, 128 random bits) tells
//! the manager which role the joiner gets.

use std::fmt;
use std::str::FromStr;

/// A parsed join token.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// SHA-256 of the CA certificate (DER), lowercase hex.
    pub ca_fingerprint: String,
    /// The role secret, lowercase hex.
    pub secret: String,
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("ca_fingerprint", &self.ca_fingerprint)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// A token travels as its text, and is checked again when read back.
impl serde::Serialize for JoinToken {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for JoinToken {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Token prefix and format version.
pub const TOKEN_PREFIX: &str = "SHOAL-1-";
/// Hex digits in the fingerprint part.
pub const FINGERPRINT_LEN: usize = 64;
/// Hex digits in the secret part.
pub const SECRET_LEN: usize = 32;

/// What is wrong with a join token's text.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// It does not start with `SHOAL-1-`.
    #[error(
        "malformed join token: it must start with `SHOAL-1-` (get one with `shoal swarm join-token worker` on a manager)"
    )]
    BadPrefix,
    /// Wrong number of `-`-separated parts.
    #[error("malformed join token: expected SHOAL-1-<fingerprint>-<secret>")]
    BadShape,
    /// The fingerprint is not 64 hex digits.
    #[error("malformed join token: the CA fingerprint must be {FINGERPRINT_LEN} hex digits")]
    BadFingerprint,
    /// The secret is not 32 hex digits.
    #[error("malformed join token: the secret must be {SECRET_LEN} hex digits")]
    BadSecret,
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

impl FromStr for JoinToken {
    type Err = TokenError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .trim()
            .strip_prefix(TOKEN_PREFIX)
            .ok_or(TokenError::BadPrefix)?;
        let (fp, secret) = rest.split_once('-').ok_or(TokenError::BadShape)?;
        if secret.contains('-') {
            return Err(TokenError::BadShape);
        }
        if !is_hex(fp, FINGERPRINT_LEN) {
            return Err(TokenError::BadFingerprint);
        }
        if !is_hex(secret, SECRET_LEN) {
            return Err(TokenError::BadSecret);
        }
        Ok(JoinToken {
            ca_fingerprint: fp.to_ascii_lowercase(),
            secret: secret.to_ascii_lowercase(),
        })
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{TOKEN_PREFIX}{}-{}", self.ca_fingerprint, self.secret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> String {
        format!("SHOAL-1-{}-{}", "ab".repeat(32), "0f".repeat(16))
    }

    #[test]
    fn a_well_formed_token_round_trips() {
        let t: JoinToken = sample().parse().unwrap();
        assert_eq!(t.ca_fingerprint, "ab".repeat(32));
        assert_eq!(t.secret, "0f".repeat(16));
        assert_eq!(t.to_string(), sample());
    }

    #[test]
    fn malformed_tokens_say_what_is_wrong() {
        assert_eq!(
            "SWMTKN-1-x".parse::<JoinToken>(),
            Err(TokenError::BadPrefix)
        );
        assert_eq!(
            "SHOAL-1-abc".parse::<JoinToken>(),
            Err(TokenError::BadShape)
        );
        assert_eq!(
            format!("SHOAL-1-{}-{}", "zz".repeat(32), "0f".repeat(16)).parse::<JoinToken>(),
            Err(TokenError::BadFingerprint)
        );
        assert_eq!(
            format!("SHOAL-1-{}-{}", "ab".repeat(32), "0f".repeat(15)).parse::<JoinToken>(),
            Err(TokenError::BadSecret)
        );
        assert_eq!(
            format!("{}-extra", sample()).parse::<JoinToken>(),
            Err(TokenError::BadShape)
        );
    }

    #[test]
    fn debug_output_hides_the_secret() {
        let t: JoinToken = sample().parse().unwrap();
        assert!(!format!("{t:?}").contains(&"0f".repeat(16)));
    }
}
