//! Whom a node trusts: the CAs whose certificates it takes, and the removed
//! nodes whose certificates it refuses, both read from the store.
//!
//! - **CAs.** The cluster's CA, and during a rotation (`swarm ca --rotate`)
//!   the new one too (`ClusterState::trusted_cas`); before the store has a
//!   cluster (a joiner), the CA saved in the state dir. A certificate under
//!   the new CA travels with the new CA's cross-signed copy, so a node whose
//!   store has not seen the rotation yet takes it as well.
//! - **Removed nodes.** `node rm` and `swarm leave` put the node's ID on the
//!   store's deny list (`ClusterState::revoked`).
//!
//! The TLS verifiers, on both sides of every connection, consult both on
//! every handshake; the connections a node already has are closed when
//! their peer is removed or its certificate is no longer trusted
//! (`transport`).

use std::fmt;
use std::sync::{Arc, Mutex};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
};
use shoal_mesh::NodeId;
use shoal_raft::StateHandle;
use tokio::sync::watch;

use super::pki;
use super::poison::lock;

/// The CAs a node trusts, as DER.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Anchors {
    /// The trusted CA certificates.
    pub roots: Vec<Vec<u8>>,
    /// During a rotation: the new CA, and its copy signed by the old one.
    pub rotation: Option<(Vec<u8>, Vec<u8>)>,
}

impl Anchors {
    /// The anchors in `state`, and `own_ca` (the CA that issued this
    /// node's certificate) whatever the store says: a node whose store is
    /// behind (a joiner replaying the log) still takes the certificates
    /// of the swarm it joined.
    pub fn of_state(state: &shoal_mesh::ClusterState, own_ca: &[u8]) -> Anchors {
        let mut roots: Vec<Vec<u8>> = state
            .trusted_cas()
            .into_iter()
            .map(<[u8]>::to_vec)
            .collect();
        if !roots.iter().any(|r| r == own_ca) {
            roots.push(own_ca.to_vec());
        }
        Anchors {
            roots,
            rotation: state
                .ca_rotation
                .as_ref()
                .map(|r| (r.ca_cert_der.clone(), r.cross_cert_der.clone())),
        }
    }

    /// The certificates to send after `cert` (DER): the cross-signed new CA
    /// when `cert` is under it, then every trusted CA (a joiner finds the
    /// one its token pins among them). Pure.
    pub fn chain_for(&self, cert: &[u8]) -> Vec<Vec<u8>> {
        let mut chain: Vec<Vec<u8>> = self.intermediates_for(cert);
        chain.extend(self.roots.iter().cloned());
        chain
    }

    /// The cross-signed new CA, when `cert` is under the new CA.
    pub fn intermediates_for(&self, cert: &[u8]) -> Vec<Vec<u8>> {
        match &self.rotation {
            Some((new, cross)) if pki::issued_by(cert, new) => vec![cross.clone()],
            _ => Vec::new(),
        }
    }

    /// Which trusted CA issued `cert`.
    pub fn issuer_of(&self, cert: &[u8]) -> Option<&[u8]> {
        self.roots
            .iter()
            .find(|r| pki::issued_by(cert, r))
            .map(Vec::as_slice)
    }
}

/// The verifiers built from one set of anchors.
#[derive(Clone)]
struct Verifiers {
    anchors: Anchors,
    epoch: u64,
    client: Arc<dyn ClientCertVerifier>,
    server: Arc<WebPkiServerVerifier>,
}

fn build(anchors: &Anchors, epoch: u64) -> Result<Verifiers, rustls::Error> {
    let mut roots = RootCertStore::empty();
    for ca in &anchors.roots {
        roots.add(CertificateDer::from(ca.clone()))?;
    }
    let roots = Arc::new(roots);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let bad = |e: rustls::server::VerifierBuilderError| rustls::Error::General(e.to_string());
    Ok(Verifiers {
        anchors: anchors.clone(),
        epoch,
        client: WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .allow_unauthenticated()
            .build()
            .map_err(bad)?,
        server: WebPkiServerVerifier::builder_with_provider(roots, provider)
            .build()
            .map_err(bad)?,
    })
}

type RevokedFn = Arc<dyn Fn(NodeId) -> bool + Send + Sync>;
type AnchorsFn = Arc<dyn Fn() -> Anchors + Send + Sync>;

/// Whom this node trusts, and a signal when that may have changed.
#[derive(Clone)]
pub struct Trust {
    is_revoked: RevokedFn,
    anchors: AnchorsFn,
    own_ca: Option<Arc<Mutex<Vec<u8>>>>,
    changes: watch::Receiver<u64>,
    cache: Arc<Mutex<Option<Verifiers>>>,
}

impl fmt::Debug for Trust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Trust")
    }
}

impl Trust {
    /// What the store behind `state` trusts, and `own_ca` (see
    /// [`Anchors::of_state`]), replaced with [`Self::set_own_ca`].
    pub fn of_store(state: StateHandle, own_ca: Vec<u8>) -> Self {
        let changes = state.changes();
        let revoked = state.clone();
        let own_ca = Arc::new(Mutex::new(own_ca));
        let own = own_ca.clone();
        Trust {
            is_revoked: Arc::new(move |id| revoked.read(|d| d.state.revoked.contains(&id))),
            anchors: Arc::new(move || {
                let own = lock(&own).clone();
                state.read(|d| Anchors::of_state(&d.state, &own))
            }),
            own_ca: Some(own_ca),
            changes,
            cache: Arc::default(),
        }
    }

    /// Records the CA that issued this node's (renewed) certificate.
    pub fn set_own_ca(&self, ca_der: &[u8]) {
        if let Some(own) = &self.own_ca {
            *lock(own) = ca_der.to_vec();
        }
    }

    /// Fixed anchors and deny list (for tests).
    #[cfg(test)]
    pub fn fixed(anchors: Anchors, revoked: Vec<NodeId>) -> Self {
        let (_, changes) = watch::channel(0);
        Trust {
            is_revoked: Arc::new(move |id| revoked.contains(&id)),
            anchors: Arc::new(move || anchors.clone()),
            own_ca: None,
            changes,
            cache: Arc::default(),
        }
    }

    /// One CA and nothing revoked (for tests).
    #[cfg(test)]
    pub fn only(ca_der: &[u8]) -> Self {
        let anchors = Anchors {
            roots: vec![ca_der.to_vec()],
            rotation: None,
        };
        Self::fixed(anchors, vec![])
    }

    /// Whether node `id` is revoked.
    pub fn is_revoked(&self, id: NodeId) -> bool {
        (self.is_revoked)(id)
    }

    /// The CAs trusted now.
    pub fn anchors(&self) -> Anchors {
        (self.anchors)()
    }

    /// A receiver that wakes when the store may have changed (its
    /// `changed()` fails once nothing can change it any more).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }

    /// The verifiers for the anchors trusted now, rebuilt when they change.
    fn verifiers(&self) -> Result<Verifiers, rustls::Error> {
        let anchors = self.anchors();
        let mut cache = lock(&self.cache);
        match cache.as_ref() {
            Some(v) if v.anchors == anchors => Ok(v.clone()),
            old => {
                let epoch = old.map_or(0, |v| v.epoch + 1);
                let fresh = build(&anchors, epoch)?;
                *cache = Some(fresh.clone());
                Ok(fresh)
            }
        }
    }

    /// A number that changes whenever the trusted CAs do.
    pub fn epoch(&self) -> u64 {
        self.verifiers().map_or(u64::MAX, |v| v.epoch)
    }

    /// Whether `chain` (a certificate, then what came with it) is a
    /// trusted certificate of a node not removed.
    pub fn verifies(&self, chain: &[CertificateDer<'_>]) -> bool {
        let Some((end, rest)) = chain.split_first() else {
            return false;
        };
        self.verify_client(end, rest, UnixTime::now()).is_ok()
    }

    fn verify_client(
        &self,
        end: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .verifiers()?
            .client
            .verify_client_cert(end, intermediates, now)?;
        self.check(end)?;
        Ok(verified)
    }

    /// Refuses a certificate that names a revoked node.
    fn check(&self, cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        match pki::node_id_of(cert) {
            Ok(id) if self.is_revoked(id) => {
                tracing::warn!(node = %id, "refused the certificate of a removed node");
                Err(rustls::Error::InvalidCertificate(CertificateError::Revoked))
            }
            _ => Ok(()),
        }
    }
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

/// Checks a TLS 1.2 handshake signature (the verifiers' common part).
pub fn tls12_signature(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls12_signature(message, cert, dss, &algorithms())
}

/// Checks a TLS 1.3 handshake signature (the verifiers' common part).
pub fn tls13_signature(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
}

/// The signature schemes the verifiers take.
pub fn schemes() -> Vec<SignatureScheme> {
    algorithms().supported_schemes()
}

/// Checks a client's certificate against [`Trust`].
#[derive(Debug)]
pub struct ClientTrusted(pub Trust);

impl ClientCertVerifier for ClientTrusted {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        // A joiner has none; it is served the join protocol only.
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0.verify_client(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes()
    }
}

/// Checks a server's certificate (and name) against [`Trust`].
#[derive(Debug)]
pub struct ServerTrusted(pub Trust);

impl ServerCertVerifier for ServerTrusted {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.0.verifiers()?.server.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp,
            now,
        )?;
        self.0.check(end_entity)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::transport::test_identity;

    #[test]
    fn during_a_rotation_both_cas_are_trusted_and_the_new_one_through_its_cross_signature() {
        let old = pki::new_ca().unwrap();
        let new = pki::new_rotated_ca(&old.0, &old.1).unwrap();
        let a = test_identity(&old, NodeId(1));
        let b = test_identity(&(new.cert.clone(), new.key.clone()), NodeId(2));
        let chain = |id: &crate::daemon::transport::TlsIdentity, anchors: &Anchors| {
            let mut c = vec![CertificateDer::from(id.cert_der.clone())];
            c.extend(
                anchors
                    .intermediates_for(&id.cert_der)
                    .into_iter()
                    .map(CertificateDer::from),
            );
            c
        };
        let before = Trust::only(&old.0);
        let during = Anchors {
            roots: vec![old.0.clone(), new.cert.clone()],
            rotation: Some((new.cert.clone(), new.cross.clone())),
        };
        let rotating = Trust::fixed(during.clone(), vec![]);
        let after = Trust::only(&new.cert);
        // A node that has not seen the rotation takes a certificate under
        // the new CA only with its cross-signed copy.
        assert!(before.verifies(&chain(&a, &during)));
        assert!(before.verifies(&chain(&b, &during)));
        assert!(!before.verifies(&chain(&b, &Anchors::default())));
        assert!(rotating.verifies(&chain(&a, &during)));
        assert!(rotating.verifies(&chain(&b, &during)));
        assert!(
            !after.verifies(&chain(&a, &during)),
            "the old CA is dropped"
        );
        assert!(after.verifies(&chain(&b, &during)));
        // Joiners find the CA their token pins among what servers send.
        assert_eq!(
            during.chain_for(&b.cert_der),
            vec![new.cross.clone(), old.0.clone(), new.cert.clone()]
        );
        assert_eq!(during.chain_for(&a.cert_der), during.roots);
        assert_eq!(during.issuer_of(&b.cert_der), Some(new.cert.as_slice()));
        assert_eq!(during.issuer_of(&a.cert_der), Some(old.0.as_slice()));
        // A changed set of anchors changes the epoch.
        let e = before.epoch();
        assert_eq!(before.epoch(), e);
        assert_ne!(rotating.epoch(), u64::MAX);
    }
}
