//! Removed nodes' certificates, refused at the TLS handshake.
//!
//! `node rm` and `swarm leave` put the node's ID on the store's deny list
//! (`ClusterState::revoked`). Every node's TLS verifiers, on both sides of
//! every connection, refuse a certificate naming a node on it, after the CA
//! signature checks pass; and the connections a node already has from it
//! are closed when the list changes (`transport`).

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use shoal_mesh::NodeId;
use shoal_raft::StateHandle;
use tokio::sync::watch;

use super::pki;

/// Which nodes are revoked, and a signal when that may have changed.
#[derive(Clone)]
pub struct Revocations {
    is_revoked: Arc<dyn Fn(NodeId) -> bool + Send + Sync>,
    changes: watch::Receiver<u64>,
}

impl fmt::Debug for Revocations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Revocations")
    }
}

impl Revocations {
    /// The deny list of the store behind `state`.
    pub fn of_store(state: StateHandle) -> Self {
        let changes = state.changes();
        Revocations {
            is_revoked: Arc::new(move |id| state.read(|d| d.state.revoked.contains(&id))),
            changes,
        }
    }

    /// A fixed list (for tests).
    #[cfg(test)]
    pub fn fixed(ids: Vec<NodeId>) -> Self {
        let (_, changes) = watch::channel(0);
        Revocations {
            is_revoked: Arc::new(move |id| ids.contains(&id)),
            changes,
        }
    }

    /// Whether node `id` is revoked.
    pub fn is_revoked(&self, id: NodeId) -> bool {
        (self.is_revoked)(id)
    }

    /// A receiver that wakes when the list may have changed (its
    /// `changed()` fails once nothing can change it any more).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.clone()
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

/// A client-certificate verifier that also refuses revoked nodes.
#[derive(Debug)]
pub struct ClientNotRevoked {
    /// The CA checks.
    pub inner: Arc<dyn ClientCertVerifier>,
    /// The deny list.
    pub revocations: Revocations,
}

impl ClientCertVerifier for ClientNotRevoked {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        self.revocations.check(end_entity)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A server-certificate verifier that also refuses revoked nodes.
#[derive(Debug)]
pub struct ServerNotRevoked {
    /// The CA and name checks.
    pub inner: Arc<dyn ServerCertVerifier>,
    /// The deny list.
    pub revocations: Revocations,
}

impl ServerCertVerifier for ServerNotRevoked {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified =
            self.inner
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)?;
        self.revocations.check(end_entity)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
