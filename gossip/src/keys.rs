//! Who wrote an entry. Every entry carries its owner's signature over its
//! key, owner, version and value, made with the owner's node key; entries
//! travel with their owners' certificates. A node takes an entry, whoever
//! relays it, only when the certificate is a valid one of that owner and
//! the signature checks, so that no member can write another node's
//! endpoints, tunnels or network list (docs/security.md).
//!
//! The core only asks a [`Keys`]; the node crate implements it with the
//! swarm's CA and its node key, [`TestKeys`] stands in for tests and the
//! simulator.

use shoal_mesh::NodeId;

/// Signs this node's entries and checks others'.
pub trait Keys: Send {
    /// This node's certificate (DER), sent along with its entries.
    fn cert(&self) -> Vec<u8>;
    /// This node's signature of `msg`.
    fn sign(&self, msg: &[u8]) -> Vec<u8>;
    /// Whether `cert` is a valid certificate of node `owner` (for the
    /// node: signed by the swarm's CA, naming `owner`, not revoked) and
    /// `sig` its signature of `msg`.
    fn verify(&mut self, owner: NodeId, cert: &[u8], msg: &[u8], sig: &[u8]) -> bool;
}

/// Keys for tests and the simulator: a node's "certificate" is its ID and
/// its "signature" a keyed hash of the message under that ID. Anyone can
/// compute one, so this proves nothing; it lets tests check that an entry
/// whose signature does not match its owner is refused.
#[derive(Clone, Debug)]
pub struct TestKeys(pub NodeId);

/// The test signature of `msg` by `owner`.
pub fn test_signature(owner: NodeId, msg: &[u8]) -> Vec<u8> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ owner.0;
    for b in msg {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h.to_le_bytes().to_vec()
}

impl Keys for TestKeys {
    fn cert(&self) -> Vec<u8> {
        self.0.0.to_le_bytes().to_vec()
    }

    fn sign(&self, msg: &[u8]) -> Vec<u8> {
        test_signature(self.0, msg)
    }

    fn verify(&mut self, owner: NodeId, cert: &[u8], msg: &[u8], sig: &[u8]) -> bool {
        cert == owner.0.to_le_bytes() && sig == test_signature(owner, msg)
    }
}

/// [`TestKeys`] with certificates and signatures of a real node's sizes
/// (`cert_len`, `sig_len`: a node certificate of the swarm's CA is about
/// 423 bytes, an ECDSA P-256 signature 71), so that the simulator counts
/// the bytes a swarm would send. Proves nothing either.
#[derive(Clone, Debug)]
pub struct SizedTestKeys {
    /// The node.
    pub id: NodeId,
    /// Bytes of a certificate (at least 8).
    pub cert_len: usize,
    /// Bytes of a signature (at least 8).
    pub sig_len: usize,
}

impl SizedTestKeys {
    fn cert_of(&self, owner: NodeId) -> Vec<u8> {
        let mut c = owner.0.to_le_bytes().to_vec();
        c.resize(self.cert_len.max(8), 0);
        c
    }

    fn sig_of(&self, owner: NodeId, msg: &[u8]) -> Vec<u8> {
        let mut s = test_signature(owner, msg);
        s.resize(self.sig_len.max(8), 0);
        s
    }
}

impl Keys for SizedTestKeys {
    fn cert(&self) -> Vec<u8> {
        self.cert_of(self.id)
    }

    fn sign(&self, msg: &[u8]) -> Vec<u8> {
        self.sig_of(self.id, msg)
    }

    fn verify(&mut self, owner: NodeId, cert: &[u8], msg: &[u8], sig: &[u8]) -> bool {
        // What `cert_of` and `sig_of` would make, compared in place (the
        // simulator checks every entry it takes).
        let padded = |bytes: &[u8], head: &[u8], len: usize| {
            bytes.len() == len.max(8)
                && bytes.starts_with(head)
                && bytes[head.len()..].iter().all(|b| *b == 0)
        };
        padded(cert, &owner.0.to_le_bytes(), self.cert_len)
            && padded(sig, &test_signature(owner, msg), self.sig_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sized_test_keys_check_owner_message_and_sizes() {
        let k = |id| SizedTestKeys {
            id: NodeId(id),
            cert_len: 423,
            sig_len: 71,
        };
        let (a, mut b) = (k(1), k(2));
        let (cert, sig) = (a.cert(), a.sign(b"entry"));
        assert_eq!((cert.len(), sig.len()), (423, 71));
        assert!(b.verify(NodeId(1), &cert, b"entry", &sig));
        assert!(!b.verify(NodeId(2), &cert, b"entry", &sig), "another owner");
        assert!(
            !b.verify(NodeId(1), &cert, b"entrx", &sig),
            "another message"
        );
        assert!(!b.verify(NodeId(1), &cert, b"entry", &sig[..70]), "short");
        let mut odd = sig.clone();
        odd[70] = 1;
        assert!(!b.verify(NodeId(1), &cert, b"entry", &odd), "padding");
        assert!(
            !b.verify(NodeId(1), &b.cert(), b"entry", &sig),
            "another cert"
        );
    }
}
