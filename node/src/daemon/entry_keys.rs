//! The node's side of gossip integrity (`shoal_gossip::keys`): entries are
//! signed with the node's TLS key (ECDSA P-256), and another owner's entry
//! is taken only under a certificate the swarm's CA signed, naming that
//! owner, not revoked, whose key made the signature. What travels as a
//! node's "certificate" is its chain: the certificate, then (during a CA
//! rotation) the cross-signed new CA, DER after DER.

use std::collections::HashMap;
use std::sync::Arc;

use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, UnparsedPublicKey,
};
use rustls::pki_types::CertificateDer;
use shoal_gossip::Keys;
use shoal_mesh::NodeId;

use super::pki;
use super::poison::lock;
use super::transport::TlsIdentity;
use super::trust::Trust;

/// This node's certificate and key, replaced when they are renewed.
pub struct Signing {
    cert: Vec<u8>,
    key: EcdsaKeyPair,
}

/// Shared access to a node's [`Signing`] (gossip signs with it, the
/// renewal loop replaces it).
pub type SigningHandle = Arc<std::sync::Mutex<Signing>>;

/// This node's signing pair from its TLS identity, with the chain `trust`
/// calls for.
pub fn signing(id: &TlsIdentity, trust: &Trust) -> anyhow::Result<Signing> {
    let key = EcdsaKeyPair::from_pkcs8(
        &ECDSA_P256_SHA256_ASN1_SIGNING,
        &id.key_der,
        &SystemRandom::new(),
    )
    .map_err(|e| anyhow::anyhow!("this node's key cannot sign gossip entries: {e}"))?;
    let mut cert = id.cert_der.clone();
    for c in trust.anchors().intermediates_for(&id.cert_der) {
        cert.extend_from_slice(&c);
    }
    Ok(Signing { cert, key })
}

/// The certificates in `bytes`, DER after DER (at most four).
fn split_chain(mut bytes: &[u8]) -> Option<Vec<CertificateDer<'static>>> {
    let mut out = Vec::new();
    while !bytes.is_empty() && out.len() < 4 {
        let (rest, _) = x509_parser::parse_x509_certificate(bytes).ok()?;
        let len = bytes.len() - rest.len();
        out.push(CertificateDer::from(bytes[..len].to_vec()));
        bytes = rest;
    }
    (bytes.is_empty() && !out.is_empty()).then_some(out)
}

/// Signs this node's entries; checks others' against the swarm's CA.
pub struct NodeKeys {
    signing: SigningHandle,
    rng: SystemRandom,
    trust: Trust,
    /// Certificates already checked, with their public keys, by owner,
    /// under the trusted CAs of epoch `epoch`.
    known: HashMap<NodeId, (Vec<u8>, Vec<u8>)>,
    epoch: u64,
}

impl NodeKeys {
    /// The keys of the node with TLS identity `id`.
    pub fn new(id: &TlsIdentity, trust: Trust) -> anyhow::Result<Self> {
        let signing = Arc::new(std::sync::Mutex::new(signing(id, &trust)?));
        Ok(NodeKeys {
            signing,
            rng: SystemRandom::new(),
            epoch: trust.epoch(),
            trust,
            known: HashMap::new(),
        })
    }

    /// The handle to replace this node's certificate and key with.
    pub fn signing(&self) -> SigningHandle {
        self.signing.clone()
    }

    /// The public key of `cert`, if it is a valid certificate of `owner`.
    fn public_key(&mut self, owner: NodeId, cert: &[u8]) -> Option<Vec<u8>> {
        let epoch = self.trust.epoch();
        if epoch != self.epoch {
            // Another CA: what was checked under the old one is checked again.
            self.known.clear();
            self.epoch = epoch;
        }
        if let Some((c, pk)) = self.known.get(&owner)
            && c == cert
        {
            return Some(pk.clone());
        }
        let chain = split_chain(cert)?;
        if !self.trust.verifies(&chain) || pki::node_id_of(&chain[0]).ok()? != owner {
            return None;
        }
        let (_, parsed) = x509_parser::parse_x509_certificate(&chain[0]).ok()?;
        let pk = parsed.public_key().subject_public_key.data.to_vec();
        self.known.insert(owner, (cert.to_vec(), pk.clone()));
        Some(pk)
    }
}

impl Keys for NodeKeys {
    fn cert(&self) -> Vec<u8> {
        lock(&self.signing).cert.clone()
    }

    fn sign(&self, msg: &[u8]) -> Vec<u8> {
        lock(&self.signing)
            .key
            .sign(&self.rng, msg)
            .map(|s| s.as_ref().to_vec())
            .unwrap_or_default()
    }

    fn verify(&mut self, owner: NodeId, cert: &[u8], msg: &[u8], sig: &[u8]) -> bool {
        if self.trust.is_revoked(owner) {
            self.known.remove(&owner);
            return false;
        }
        let Some(pk) = self.public_key(owner, cert) else {
            return false;
        };
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &pk)
            .verify(msg, sig)
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::transport::test_identity;

    #[test]
    fn only_the_owner_under_the_swarms_ca_signs_its_entries() {
        let ca = pki::new_ca().unwrap();
        let none = || Trust::only(&ca.0);
        let a = NodeKeys::new(&test_identity(&ca, NodeId(1)), none()).unwrap();
        let mut b = NodeKeys::new(&test_identity(&ca, NodeId(2)), none()).unwrap();
        let sig = a.sign(b"entry");
        assert!(b.verify(NodeId(1), &a.cert(), b"entry", &sig));
        assert!(!b.verify(NodeId(1), &a.cert(), b"other entry", &sig));
        // Node 2's signature under node 1's name, or node 1's certificate
        // claimed for another node: refused.
        assert!(!b.verify(NodeId(1), &a.cert(), b"entry", &b.sign(b"entry")));
        assert!(!b.verify(NodeId(3), &a.cert(), b"entry", &sig));
        // A certificate of another swarm's CA.
        let other = pki::new_ca().unwrap();
        let stranger =
            NodeKeys::new(&test_identity(&other, NodeId(1)), Trust::only(&other.0)).unwrap();
        assert!(!b.verify(
            NodeId(1),
            &stranger.cert(),
            b"entry",
            &stranger.sign(b"entry")
        ));
        // A removed owner.
        let mut c = NodeKeys::new(
            &test_identity(&ca, NodeId(3)),
            Trust::fixed(
                crate::daemon::trust::Anchors {
                    roots: vec![ca.0.clone()],
                    rotation: None,
                },
                vec![NodeId(1)],
            ),
        )
        .unwrap();
        assert!(!c.verify(NodeId(1), &a.cert(), b"entry", &sig));
    }

    #[test]
    fn a_renewed_key_signs_from_then_on() {
        let ca = pki::new_ca().unwrap();
        let issue = |id| test_identity(&ca, id);
        let none = || Trust::only(&ca.0);
        let a = NodeKeys::new(&issue(NodeId(1)), none()).unwrap();
        let mut b = NodeKeys::new(&issue(NodeId(2)), none()).unwrap();
        let old = (a.cert(), a.sign(b"m"));
        *lock(&a.signing()) = signing(&issue(NodeId(1)), &none()).unwrap();
        let new = (a.cert(), a.sign(b"m"));
        assert_ne!(old.0, new.0);
        assert!(b.verify(NodeId(1), &new.0, b"m", &new.1));
        assert!(
            !b.verify(NodeId(1), &new.0, b"m", &old.1),
            "the old key's signature under the new certificate"
        );
    }
}
