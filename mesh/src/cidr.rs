//! IPv4 prefixes, parsed and compared without any I/O.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An IPv4 prefix in canonical form (host bits zero), e.g. `10.0.1.0/24`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Ipv4Net {
    addr: u32,
    len: u8,
}

/// Why a prefix did not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    /// Not `A.B.C.D/N`.
    #[error("invalid CIDR `{0}`: use A.B.C.D/N, e.g. 10.1.0.0/24")]
    Syntax(String),
    /// An IPv6 prefix.
    #[error("`{0}` is IPv6; only IPv4 subnets are supported")]
    Ipv6(String),
    /// Prefix length above 32.
    #[error("invalid CIDR `{0}`: the prefix length must be 0 to 32")]
    Length(String),
    /// Host bits set (`10.0.0.1/24`).
    #[error("invalid CIDR `{given}`: host bits are set; did you mean {canonical}?")]
    HostBits {
        /// What was typed.
        given: String,
        /// The network it probably meant.
        canonical: String,
    },
}

fn mask(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    }
}

impl Ipv4Net {
    /// `addr/len`, host bits cleared.
    pub fn new(addr: Ipv4Addr, len: u8) -> Option<Self> {
        (len <= 32).then(|| Ipv4Net {
            addr: u32::from(addr) & mask(len),
            len,
        })
    }

    /// The network address.
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.addr)
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    /// The broadcast (last) address.
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.addr | !mask(self.len))
    }

    /// Number of addresses.
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.len))
    }

    /// Whether `ip` is inside.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.len) == self.addr
    }

    /// Whether `other` lies entirely inside this prefix.
    pub fn contains_net(&self, other: &Ipv4Net) -> bool {
        other.len >= self.len && self.contains(other.network())
    }

    /// Whether the two prefixes share any address.
    pub fn overlaps(&self, other: &Ipv4Net) -> bool {
        self.contains_net(other) || other.contains_net(self)
    }

    /// The `i`-th address (0 = network address), if inside.
    pub fn nth(&self, i: u64) -> Option<Ipv4Addr> {
        (i < self.size()).then(|| Ipv4Addr::from(self.addr + i as u32))
    }

    /// The `/len` sub-prefixes of this one, in order.
    pub fn subnets(&self, len: u8) -> impl Iterator<Item = Ipv4Net> + '_ {
        let count = if len < self.len || len > 32 {
            0
        } else {
            1u64 << (len - self.len)
        };
        let step = 1u64 << (32 - u32::from(len.min(32)));
        (0..count).map(move |i| Ipv4Net {
            addr: self.addr + (i * step) as u32,
            len,
        })
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network(), self.len)
    }
}

impl fmt::Debug for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Ipv4Net {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (ip, len) = s
            .split_once('/')
            .ok_or_else(|| CidrError::Syntax(s.to_owned()))?;
        if ip.contains(':') {
            return Err(CidrError::Ipv6(s.to_owned()));
        }
        let ip: Ipv4Addr = ip.parse().map_err(|_| CidrError::Syntax(s.to_owned()))?;
        let len: u8 = len.parse().map_err(|_| CidrError::Syntax(s.to_owned()))?;
        let net = Ipv4Net::new(ip, len).ok_or_else(|| CidrError::Length(s.to_owned()))?;
        if net.network() != ip {
            return Err(CidrError::HostBits {
                given: s.to_owned(),
                canonical: net.to_string(),
            });
        }
        Ok(net)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_canonical_prefixes_and_explains_bad_ones() {
        let n: Ipv4Net = "10.1.0.0/16".parse().unwrap();
        assert_eq!(n.to_string(), "10.1.0.0/16");
        assert_eq!(n.broadcast(), Ipv4Addr::new(10, 1, 255, 255));
        assert!(matches!(
            "10.1.0.1/16".parse::<Ipv4Net>(),
            Err(CidrError::HostBits { .. })
        ));
        assert!(matches!(
            "10.1.0.0/33".parse::<Ipv4Net>(),
            Err(CidrError::Length(_))
        ));
        assert!(matches!(
            "fd00::/64".parse::<Ipv4Net>(),
            Err(CidrError::Ipv6(_))
        ));
        assert!(matches!(
            "10.1.0.0".parse::<Ipv4Net>(),
            Err(CidrError::Syntax(_))
        ));
        assert!(matches!(
            "300.1.0.0/8".parse::<Ipv4Net>(),
            Err(CidrError::Syntax(_))
        ));
    }

    #[test]
    fn overlap_and_containment() {
        let a: Ipv4Net = "10.0.0.0/8".parse().unwrap();
        let b: Ipv4Net = "10.255.0.0/16".parse().unwrap();
        let c: Ipv4Net = "192.168.0.0/24".parse().unwrap();
        assert!(a.overlaps(&b) && b.overlaps(&a) && a.contains_net(&b) && !b.contains_net(&a));
        assert!(!a.overlaps(&c));
        assert_eq!(
            a.subnets(24)
                .take(2)
                .map(|n| n.to_string())
                .collect::<Vec<_>>(),
            ["10.0.0.0/24", "10.0.1.0/24"]
        );
        assert_eq!(a.subnets(24).count(), 65536);
    }
}
