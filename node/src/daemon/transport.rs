//! The node's QUIC endpoint: one UDP port, mutual TLS under the cluster CA,
//! ALPN to tell Raft RPCs, control calls and joins apart.
//!
//! Every call is one bidirectional stream: the caller writes one encoded
//! request and finishes its side, the callee answers with one encoded reply.
//! Connections are cached per peer and protocol and dropped on error.
//!
//! Who may talk: a `shoal-raft/1` or `shoal-ctl/1` peer must present a
//! certificate signed by the cluster CA (checked by rustls) naming a node
//! (checked here, against the store, by the handler). Only `shoal-join/1`
//! accepts a peer without a certificate, and it serves nothing but the join
//! handshake.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use shoal_mesh::NodeId;
use shoal_mesh::wire::{ALPN_CTL, ALPN_GOSSIP, ALPN_JOIN, ALPN_RAFT, MAX_JOIN_REQUEST};

use super::gate::{ANON_PER_SOURCE, ANON_TOTAL, AnonSlots};
use super::pki;
use super::poison::lock;
use super::trust::{ClientTrusted, ServerTrusted, Trust};

/// Largest request or reply accepted on a stream.
pub const MAX_MESSAGE: usize = shoal_mesh::codec::DEFAULT_LIMIT;

/// Errors of the QUIC layer.
#[derive(Debug, thiserror::Error)]
pub enum QuicError {
    /// TLS configuration could not be built from our certificates.
    #[error("TLS setup failed: {0}")]
    Tls(String),
    /// The UDP socket could not be bound.
    #[error("cannot listen on {addr}: {reason}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        reason: String,
    },
    /// The peer did not answer in time.
    #[error("no answer from {addr} within {secs:.1} s")]
    Timeout {
        /// The peer.
        addr: SocketAddr,
        /// The time waited.
        secs: f64,
    },
    /// The connection or stream failed.
    #[error("connection to {addr} failed: {reason}")]
    Connection {
        /// The peer.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
}

/// This node's certificate material.
#[derive(Clone)]
pub struct TlsIdentity {
    /// The cluster CA (DER).
    pub ca_der: Vec<u8>,
    /// This node's certificate (DER).
    pub cert_der: Vec<u8>,
    /// This node's key (PKCS#8 DER).
    pub key_der: Vec<u8>,
}

/// A worker's identity for node `id` under `ca` (certificate, key), valid
/// for an hour: for tests.
#[cfg(test)]
pub fn test_identity(ca: &(Vec<u8>, Vec<u8>), id: NodeId) -> TlsIdentity {
    let (key_der, csr) = pki::new_key_and_csr().unwrap_or_else(|e| panic!("{e}"));
    let hour = Duration::from_secs(3600);
    TlsIdentity {
        ca_der: ca.0.clone(),
        cert_der: pki::sign_node_csr(&ca.0, &ca.1, &csr, id, shoal_mesh::Role::Worker, hour)
            .unwrap_or_else(|e| panic!("{e}")),
        key_der,
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Bytes a peer may have sent on one connection that this node has not
/// read yet, all streams together (a larger message flows as it is read).
/// It bounds what a peer without a certificate can make a node buffer.
const CONNECTION_WINDOW: u32 = 4 << 20;
/// Requests a peer may have open at once on one connection.
const MAX_STREAMS: u32 = 32;
/// How long a joiner has to send its request.
const JOIN_READ_DEADLINE: Duration = Duration::from_secs(5);
/// How long a removed node's requests in flight may take to be answered
/// before its connection is closed.
const REVOKED_DRAIN: Duration = Duration::from_secs(2);
/// How long a joiner has to take the reply and close.
const JOIN_LINGER: Duration = Duration::from_secs(2);

/// How long a peer has to take a reply (a feed's may be megabytes): one
/// that stops reading has the stream reset then, so it holds no task and
/// no buffer of this node's longer than that.
const REPLY_DEADLINE: Duration = if cfg!(test) {
    Duration::from_secs(1)
} else {
    Duration::from_secs(30)
};

/// Replies abandoned because their peer did not take them in time.
#[derive(Default)]
pub struct Stalled {
    count: std::sync::atomic::AtomicU64,
    /// The last peer that did not read, and when (ms since the epoch).
    last: Mutex<Option<(Option<NodeId>, u64)>>,
}

impl Stalled {
    fn note(&self, peer: Option<NodeId>) {
        self.count
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some((peer, super::clock::now_ms()));
    }

    /// For `shoal info`: how many replies were abandoned, the last peer
    /// that did not read, and when.
    pub fn view(&self) -> serde_json::Value {
        let last = *self.last.lock().unwrap_or_else(|p| p.into_inner());
        serde_json::json!({
            "replies_abandoned": self.count.load(std::sync::atomic::Ordering::Relaxed),
            "last_peer": last.and_then(|(p, _)| p).map(|p| p.to_string()),
            "last_at_ms": last.map(|(_, at)| at),
        })
    }
}

/// How long a connection may carry nothing before it is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// The endpoint's configuration, its keys derived from `seed` (a secret of
/// the node's that survives restarts and renewals): the key of its
/// stateless resets, and the one its connection IDs are checked with. Both
/// are the same across restarts, so that a restarted node's endpoint takes
/// the connection IDs its previous run issued as its own and resets the
/// connections its peers still hold, at the first packet they send on them:
/// they dial again at once instead of waiting out [`IDLE_TIMEOUT`].
fn endpoint_config(seed: &[u8; 32]) -> quinn::EndpointConfig {
    let derive = |label: &[u8]| {
        ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, seed), label)
    };
    let reset = derive(b"shoal quic stateless reset v1");
    let cid = derive(b"shoal quic connection ids v1");
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&cid.as_ref()[..8]);
    let cid_key = u64::from_le_bytes(cid_key);
    let mut cfg = quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        reset.as_ref(),
    )));
    cfg.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    cfg
}

fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.receive_window(CONNECTION_WINDOW.into());
    t.max_concurrent_bidi_streams(MAX_STREAMS.into());
    // No keep-alives: an idle connection costs nothing until it is used
    // again or this timeout ends it (a keep-alive a second on every
    // connection to every peer was per-second work growing with the swarm).
    // A dead peer is noticed by the calls' own timeouts and by SWIM; a
    // restarted one resets the old connections at their first packet
    // (`reset_key`).
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(IDLE_TIMEOUT).unwrap_or_else(|_| unreachable!()),
    ));
    t.keep_alive_interval(None);
    Arc::new(t)
}

fn roots(ca_der: &[u8]) -> Result<RootCertStore, QuicError> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from(ca_der.to_vec()))
        .map_err(|e| QuicError::Tls(e.to_string()))?;
    Ok(roots)
}

fn key(key_der: &[u8]) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der.to_vec()))
}

fn server_config(id: &TlsIdentity, trust: &Trust) -> Result<quinn::ServerConfig, QuicError> {
    let tls = |e: rustls::Error| QuicError::Tls(e.to_string());
    let mut chain = vec![CertificateDer::from(id.cert_der.clone())];
    chain.extend(
        trust
            .anchors()
            .chain_for(&id.cert_der)
            .into_iter()
            .map(CertificateDer::from),
    );
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .with_client_cert_verifier(Arc::new(ClientTrusted(trust.clone())))
        .with_single_cert(chain, key(&id.key_der))
        .map_err(tls)?;
    cfg.alpn_protocols = vec![
        ALPN_RAFT.to_vec(),
        ALPN_CTL.to_vec(),
        ALPN_JOIN.to_vec(),
        ALPN_GOSSIP.to_vec(),
    ];

    let quic = QuicServerConfig::try_from(cfg).map_err(|e| QuicError::Tls(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
    server.transport_config(transport_config());
    // Handshakes in progress at once, and what they may buffer.
    server.max_incoming(1024);
    server.incoming_buffer_size(64 << 10);
    server.incoming_buffer_size_total(16 << 20);
    Ok(server)
}

fn client_config(
    id: &TlsIdentity,
    alpn: &[u8],
    trust: &Trust,
) -> Result<quinn::ClientConfig, QuicError> {
    let tls = |e: rustls::Error| QuicError::Tls(e.to_string());
    let mut chain = vec![CertificateDer::from(id.cert_der.clone())];
    chain.extend(
        trust
            .anchors()
            .intermediates_for(&id.cert_der)
            .into_iter()
            .map(CertificateDer::from),
    );
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ServerTrusted(trust.clone())))
        .with_client_auth_cert(chain, key(&id.key_der))
        .map_err(tls)?;
    cfg.alpn_protocols = vec![alpn.to_vec()];
    let quic = QuicClientConfig::try_from(cfg).map_err(|e| QuicError::Tls(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(quic));
    client.transport_config(transport_config());
    Ok(client)
}

/// The client configurations for Raft, control calls and gossip.
fn clients(id: &TlsIdentity, trust: &Trust) -> Result<[quinn::ClientConfig; 3], QuicError> {
    Ok([
        client_config(id, ALPN_RAFT, trust)?,
        client_config(id, ALPN_CTL, trust)?,
        client_config(id, ALPN_GOSSIP, trust)?,
    ])
}

/// Trusts exactly the CA whose SHA-256 fingerprint is pinned (from a join
/// token), and a server certificate that CA signed. Names are not checked:
/// the joiner does not know the manager's node ID, and any cluster node
/// signed by the pinned CA is a node of the cluster it meant to join.
#[derive(Debug)]
struct PinnedCa {
    fingerprint: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| pki::fingerprint(c) == self.fingerprint)
            .ok_or_else(|| {
                rustls::Error::General(
                    "the manager's CA does not match the join token's fingerprint (a token of another cluster?)"
                        .into(),
                )
            })?;
        let roots = roots(ca).map_err(|e| rustls::Error::General(e.to_string()))?;
        let parsed = ParsedCertificate::try_from(end_entity)?;
        // Through the cross-signed new CA during a rotation.
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        super::trust::tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        super::trust::tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        super::trust::schemes()
    }
}

/// Client config for the join handshake: no client certificate, the CA pinned.
fn join_client_config(ca_fingerprint: &str) -> Result<quinn::ClientConfig, QuicError> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| QuicError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCa {
            fingerprint: ca_fingerprint.to_owned(),
            provider: provider(),
        }))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![ALPN_JOIN.to_vec()];
    let quic = QuicClientConfig::try_from(cfg).map_err(|e| QuicError::Tls(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(quic));
    client.transport_config(transport_config());
    Ok(client)
}

/// An incoming call: which protocol, and who (the node ID in the peer's
/// certificate; `None` only on the join protocol).
pub struct Incoming {
    /// The ALPN.
    pub alpn: Vec<u8>,
    /// The authenticated peer, if it presented a certificate.
    pub peer: Option<NodeId>,
    /// The peer's address.
    pub remote: SocketAddr,
    /// The request bytes.
    pub request: Vec<u8>,
}

/// Serves incoming calls.
pub trait Handler: Send + Sync + 'static {
    /// Answers one call; the returned bytes are the reply.
    fn handle(&self, call: Incoming) -> impl Future<Output = Vec<u8>> + Send;

    /// Takes one gossip message (a datagram or a one-way stream); no reply.
    fn gossip(&self, call: Incoming);
}

/// A cached client connection, and the node it reaches.
type Dialled = (NodeId, quinn::Connection);

/// The node's QUIC endpoint, as client and server.
pub struct Quic {
    endpoint: quinn::Endpoint,
    /// Client configurations (Raft, control, gossip), replaced when the
    /// node's certificate is renewed.
    clients: Mutex<[quinn::ClientConfig; 3]>,
    conns: Mutex<HashMap<(SocketAddr, &'static [u8]), Dialled>>,
    /// The certificate presented now (DER).
    cert: Mutex<Vec<u8>>,
    anon: Arc<Mutex<AnonSlots>>,
    trust: Trust,
    /// Replies peers did not read in time.
    pub stalled: Arc<Stalled>,
}

impl Quic {
    /// Binds `listen` with `identity`; peers are taken as `trust` says,
    /// and their connections closed when it no longer takes them.
    /// Its stateless resets use a random key (see [`Quic::bind_with_reset`]).
    #[cfg(test)]
    pub fn bind(
        identity: &TlsIdentity,
        listen: SocketAddr,
        trust: Trust,
    ) -> Result<Arc<Self>, QuicError> {
        let mut seed = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
            .map_err(|_| QuicError::Tls("no randomness for the reset key".into()))?;
        Self::bind_with_reset(identity, listen, trust, &seed)
    }

    /// As [`Quic::bind`], its stateless resets keyed by `seed` (a node
    /// secret that survives restarts): peers holding connections to this
    /// node's previous run have them reset at their first packet.
    pub fn bind_with_reset(
        identity: &TlsIdentity,
        listen: SocketAddr,
        trust: Trust,
        seed: &[u8; 32],
    ) -> Result<Arc<Self>, QuicError> {
        let server = server_config(identity, &trust)?;
        let bind_error = |reason: String| QuicError::Bind {
            addr: listen,
            reason,
        };
        let socket = std::net::UdpSocket::bind(listen).map_err(|e| bind_error(e.to_string()))?;
        let runtime =
            quinn::default_runtime().ok_or_else(|| bind_error("no async runtime".into()))?;
        let endpoint = quinn::Endpoint::new(endpoint_config(seed), Some(server), socket, runtime)
            .map_err(|e| bind_error(e.to_string()))?;
        Ok(Arc::new(Quic {
            endpoint,
            clients: Mutex::new(clients(identity, &trust)?),
            conns: Mutex::new(HashMap::new()),
            cert: Mutex::new(identity.cert_der.clone()),
            anon: Arc::new(Mutex::new(AnonSlots::new(ANON_TOTAL, ANON_PER_SOURCE))),
            trust,
            stalled: Arc::default(),
        }))
    }

    /// Takes `identity` (a renewed certificate and key) for every new
    /// connection, as server and as client, with the chain the trusted CAs
    /// call for now (after a CA rotation began or ended). After a renewal,
    /// each open client connection is replaced, in the background, by one
    /// that presents the new certificate (so that no peer holds a
    /// connection under a CA it drops later); calls use the old one until
    /// the new one is up.
    pub fn reload(self: &Arc<Self>, identity: &TlsIdentity) -> Result<(), QuicError> {
        let server = server_config(identity, &self.trust)?;
        let fresh = clients(identity, &self.trust)?;
        self.endpoint.set_server_config(Some(server));
        *lock(&self.clients) = fresh;
        let renewed = std::mem::replace(&mut *lock(&self.cert), identity.cert_der.clone())
            != identity.cert_der;
        if !renewed {
            // Only the chain sent after the same certificate changed:
            // open connections go on as they are.
            return Ok(());
        }
        let open: Vec<_> = lock(&self.conns)
            .iter()
            .map(|(&(addr, alpn), (peer, _))| (addr, alpn, *peer))
            .collect();
        let quic = self.clone();
        tokio::spawn(async move {
            for (addr, alpn, peer) in open {
                if let Err(e) = quic.dial(addr, peer, alpn).await {
                    tracing::debug!(%addr, error = %e, "could not dial again with the new certificate");
                }
            }
        });
        Ok(())
    }

    /// Accepts connections until the endpoint closes, handing calls to `handler`.
    pub fn serve<H: Handler>(self: &Arc<Self>, handler: Arc<H>) -> tokio::task::JoinHandle<()> {
        let endpoint = self.endpoint.clone();
        let anon = self.anon.clone();
        let trust = self.trust.clone();
        let stalled = self.stalled.clone();
        tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                let handler = handler.clone();
                let anon = anon.clone();
                let trust = trust.clone();
                let stalled = stalled.clone();
                let remote = incoming.remote_address();
                tokio::spawn(async move {
                    match serve_connection(incoming, handler, anon, trust, stalled).await {
                        Err(e @ quinn::ConnectionError::TransportError(_))
                        | Err(e @ quinn::ConnectionError::ConnectionClosed(_)) => {
                            log_refusal_once(remote, &e)
                        }
                        Err(e) => tracing::debug!(error = %e, "connection ended"),
                        Ok(()) => {}
                    }
                });
            }
        })
    }

    /// Sends one gossip message to node `peer` at `addr`: a datagram when it
    /// fits and `datagram` is asked for, else a one-way stream.
    pub async fn gossip(
        &self,
        addr: SocketAddr,
        peer: NodeId,
        bytes: &[u8],
        datagram: bool,
        timeout: Duration,
    ) -> Result<(), QuicError> {
        let fut = async {
            let conn = self.connection(addr, peer, ALPN_GOSSIP).await?;
            let fail = |reason: String| QuicError::Connection { addr, reason };
            if datagram && conn.max_datagram_size().is_some_and(|m| bytes.len() <= m) {
                return conn
                    .send_datagram(bytes.to_vec().into())
                    .map_err(|e| fail(e.to_string()));
            }
            let mut send = conn.open_uni().await.map_err(|e| fail(e.to_string()))?;
            send.write_all(bytes)
                .await
                .map_err(|e| fail(e.to_string()))?;
            send.finish().map_err(|e| fail(e.to_string()))
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                self.forget(addr, ALPN_GOSSIP);
                Err(e)
            }
            Err(_) => {
                self.forget(addr, ALPN_GOSSIP);
                Err(QuicError::Timeout {
                    addr,
                    secs: timeout.as_secs_f64(),
                })
            }
        }
    }

    /// Closes the endpoint (stops serving, drops connections).
    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"shutdown");
    }

    /// Waits until every connection has closed.
    pub async fn wait_idle(&self) {
        self.endpoint.wait_idle().await;
    }

    /// Frees the port: moves the endpoint to an ephemeral one of the same
    /// address, so that a new member can bind it at once even while a
    /// handle to this endpoint lingers (after a Raft core ended on its own
    /// the port stayed bound until the daemon stopped; which handle kept
    /// it was not found). Call after [`Quic::close`] and
    /// [`Quic::wait_idle`]: the close frames leave from the old port.
    pub fn release_port(&self) {
        let Ok(addr) = self.endpoint.local_addr() else {
            return;
        };
        // quinn keeps the socket it moved from until traffic arrives on the
        // new one: moving twice lets go of the first.
        let any = SocketAddr::new(addr.ip(), 0);
        for _ in 0..2 {
            if let Err(e) = std::net::UdpSocket::bind(any).and_then(|s| self.endpoint.rebind(s)) {
                tracing::warn!(error = %e, port = addr.port(), "the QUIC port stays bound until the daemon stops");
                return;
            }
        }
    }

    /// One call on `alpn` to node `peer` at `addr`, within `timeout`.
    pub async fn call(
        &self,
        addr: SocketAddr,
        peer: NodeId,
        alpn: &'static [u8],
        request: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>, QuicError> {
        let fut = self.call_inner(addr, peer, alpn, request);
        match tokio::time::timeout(timeout, fut).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(e)) => {
                self.forget(addr, alpn);
                Err(e)
            }
            Err(_) => {
                self.forget(addr, alpn);
                Err(QuicError::Timeout {
                    addr,
                    secs: timeout.as_secs_f64(),
                })
            }
        }
    }

    fn forget(&self, addr: SocketAddr, alpn: &'static [u8]) {
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(addr, alpn));
    }

    async fn connection(
        &self,
        addr: SocketAddr,
        peer: NodeId,
        alpn: &'static [u8],
    ) -> Result<quinn::Connection, QuicError> {
        let cached = self
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(addr, alpn))
            .map(|(_, c)| c.clone());
        if let Some(c) = cached
            && c.close_reason().is_none()
        {
            return Ok(c);
        }
        self.dial(addr, peer, alpn).await
    }

    /// A new connection to node `peer` at `addr`, cached for later calls.
    async fn dial(
        &self,
        addr: SocketAddr,
        peer: NodeId,
        alpn: &'static [u8],
    ) -> Result<quinn::Connection, QuicError> {
        let cfg = {
            let [raft, ctl, gossip] = &*lock(&self.clients);
            match alpn {
                ALPN_RAFT => raft.clone(),
                ALPN_GOSSIP => gossip.clone(),
                _ => ctl.clone(),
            }
        };
        let conn = connect(&self.endpoint, cfg, addr, &pki::server_name(peer)).await?;
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((addr, alpn), (peer, conn.clone()));
        Ok(conn)
    }

    async fn call_inner(
        &self,
        addr: SocketAddr,
        peer: NodeId,
        alpn: &'static [u8],
        request: &[u8],
    ) -> Result<Vec<u8>, QuicError> {
        let conn = self.connection(addr, peer, alpn).await?;
        match exchange(&conn, addr, request).await {
            // The peer restarted: its new endpoint reset the connection
            // dialled to its previous run. Dial it again, once.
            Err(_) if matches!(conn.close_reason(), Some(quinn::ConnectionError::Reset)) => {
                self.forget(addr, alpn);
                let conn = self.dial(addr, peer, alpn).await?;
                exchange(&conn, addr, request).await
            }
            result => result,
        }
    }
}

async fn connect(
    endpoint: &quinn::Endpoint,
    cfg: quinn::ClientConfig,
    addr: SocketAddr,
    server_name: &str,
) -> Result<quinn::Connection, QuicError> {
    let fail = |reason: String| QuicError::Connection { addr, reason };
    let connecting = endpoint
        .connect_with(cfg, addr, server_name)
        .map_err(|e| fail(e.to_string()))?;
    let started = std::time::Instant::now();
    connecting.await.map_err(|e| match e {
        quinn::ConnectionError::TimedOut => QuicError::Timeout {
            addr,
            secs: started.elapsed().as_secs_f64(),
        },
        other => fail(other.to_string()),
    })
}

async fn exchange(
    conn: &quinn::Connection,
    addr: SocketAddr,
    request: &[u8],
) -> Result<Vec<u8>, QuicError> {
    let fail = |reason: String| QuicError::Connection { addr, reason };
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| fail(e.to_string()))?;
    send.write_all(request)
        .await
        .map_err(|e| fail(e.to_string()))?;
    send.finish().map_err(|e| fail(e.to_string()))?;
    recv.read_to_end(MAX_MESSAGE)
        .await
        .map_err(|e| fail(e.to_string()))
}

/// The join handshake's one call, from a node that has no certificate yet:
/// a throwaway client endpoint that trusts only the pinned CA.
pub async fn join_call(
    addr: SocketAddr,
    ca_fingerprint: &str,
    request: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>, QuicError> {
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().unwrap_or_else(|_| unreachable!())
    } else {
        "[::]:0".parse().unwrap_or_else(|_| unreachable!())
    };
    let endpoint = quinn::Endpoint::client(bind).map_err(|e| QuicError::Bind {
        addr: bind,
        reason: e.to_string(),
    })?;
    let cfg = join_client_config(ca_fingerprint)?;
    let result = tokio::time::timeout(timeout, async {
        let conn = connect(&endpoint, cfg, addr, "shoal").await?;
        let reply = exchange(&conn, addr, request).await;
        conn.close(0u32.into(), b"done");
        reply
    })
    .await;
    endpoint.close(0u32.into(), b"done");
    match result {
        Ok(r) => r,
        Err(_) => Err(QuicError::Timeout {
            addr,
            secs: timeout.as_secs_f64(),
        }),
    }
}

async fn serve_connection<H: Handler>(
    incoming: quinn::Incoming,
    handler: Arc<H>,
    anon: Arc<Mutex<AnonSlots>>,
    trust: Trust,
    stalled: Arc<Stalled>,
) -> Result<(), quinn::ConnectionError> {
    let conn = incoming.await?;
    let alpn = conn
        .handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol)
        .unwrap_or_default();
    let chain: Vec<CertificateDer<'static>> = conn
        .peer_identity()
        .and_then(|i| i.downcast::<Vec<CertificateDer<'static>>>().ok())
        .map(|c| *c)
        .unwrap_or_default();
    let peer = chain.first().and_then(|c| pki::node_id_of(c).ok());
    let remote = conn.remote_address();
    let Some(node) = peer else {
        if alpn != ALPN_JOIN {
            conn.close(1u32.into(), b"a cluster certificate is required");
            return Ok(());
        }
        return serve_join(conn, handler, anon, remote).await;
    };
    // Closed as soon as the node is removed from the swarm, or its
    // certificate's CA is no longer trusted (a CA rotation ended).
    let revoked = until_untrusted(trust, node, chain);
    tokio::pin!(revoked);
    if alpn == ALPN_GOSSIP {
        return tokio::select! {
            r = serve_gossip(conn.clone(), handler, peer, remote) => r,
            why = &mut revoked => close_untrusted(&conn, node, why),
        };
    }
    // Requests being answered: a removal lets them finish (the reply to
    // the node's own `swarm leave` among them) before the connection closes.
    let mut inflight = tokio::task::JoinSet::new();
    loop {
        while inflight.try_join_next().is_some() {}
        let (mut send, mut recv) = tokio::select! {
            s = conn.accept_bi() => match s {
                Ok(s) => s,
                Err(e) => {
                    // The connection is gone: what is being answered
                    // finishes on its own (a write already proposed, say).
                    inflight.detach_all();
                    return Err(e);
                }
            },
            why = &mut revoked => {
                let drain = async { while inflight.join_next().await.is_some() {} };
                let _ = tokio::time::timeout(REVOKED_DRAIN, drain).await;
                return close_untrusted(&conn, node, why);
            }
        };
        let handler = handler.clone();
        let alpn = alpn.clone();
        let stalled = stalled.clone();
        inflight.spawn(async move {
            let Ok(request) = recv.read_to_end(MAX_MESSAGE).await else {
                return;
            };
            let reply = handler
                .handle(Incoming {
                    alpn,
                    peer,
                    remote,
                    request,
                })
                .await;
            match tokio::time::timeout(REPLY_DEADLINE, send.write_all(&reply)).await {
                Ok(Ok(())) => {
                    if send.finish().is_ok() {
                        // Until the peer has it all (or a bound).
                        let _ = tokio::time::timeout(REVOKED_DRAIN, send.stopped()).await;
                    }
                }
                Ok(Err(_)) => {}
                Err(_) => {
                    let _ = send.reset(0u32.into());
                    stalled.note(peer);
                    tracing::warn!(
                        peer = ?peer.map(|p| p.to_string()),
                        %remote,
                        bytes = reply.len(),
                        "a peer did not take its reply in time: abandoned"
                    );
                }
            }
        });
    }
}

/// Resolves once node `node` is on the deny list, or once its certificate
/// `chain` no longer verifies under the trusted CAs (never, if nothing can
/// change either any more); why.
async fn until_untrusted(
    trust: Trust,
    node: NodeId,
    chain: Vec<CertificateDer<'static>>,
) -> &'static str {
    let mut changes = trust.changes();
    let mut epoch = None;
    loop {
        if trust.is_revoked(node) {
            return "this node was removed from the swarm";
        }
        // Verified again only when the trusted CAs changed (and once at
        // first, in case they changed since the handshake).
        let now = Some(trust.epoch());
        if now != epoch {
            epoch = now;
            if !trust.verifies(&chain) {
                return "this node's certificate is not under the swarm's CA";
            }
        }
        if changes.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

fn close_untrusted(
    conn: &quinn::Connection,
    node: NodeId,
    why: &'static str,
) -> Result<(), quinn::ConnectionError> {
    tracing::warn!(%node, remote = %conn.remote_address(), why, "closed a connection");
    conn.close(4u32.into(), why.as_bytes());
    Ok(())
}

/// Holds one of the unauthenticated slots until dropped.
struct AnonSlot {
    slots: Arc<Mutex<AnonSlots>>,
    ip: std::net::IpAddr,
}

impl Drop for AnonSlot {
    fn drop(&mut self) {
        lock(&self.slots).leave(self.ip);
    }
}

/// A connection without a certificate: one join request of at most
/// [`MAX_JOIN_REQUEST`] bytes, read within [`JOIN_READ_DEADLINE`], in one
/// of a bounded number of slots; then the connection is closed.
async fn serve_join<H: Handler>(
    conn: quinn::Connection,
    handler: Arc<H>,
    slots: Arc<Mutex<AnonSlots>>,
    remote: SocketAddr,
) -> Result<(), quinn::ConnectionError> {
    let entered = lock(&slots).enter(remote.ip());
    if let Err(why) = entered {
        tracing::debug!(%remote, why, "unauthenticated connection refused");
        conn.close(2u32.into(), why.as_bytes());
        return Ok(());
    }
    let _slot = AnonSlot {
        slots,
        ip: remote.ip(),
    };
    // One request stream, no more.
    conn.set_max_concurrent_bi_streams(0u32.into());
    conn.set_max_concurrent_uni_streams(0u32.into());
    let read = async {
        let (send, mut recv) = conn.accept_bi().await.ok()?;
        let request = recv.read_to_end(MAX_JOIN_REQUEST).await.ok()?;
        Some((send, request))
    };
    let Ok(Some((mut send, request))) = tokio::time::timeout(JOIN_READ_DEADLINE, read).await else {
        conn.close(
            3u32.into(),
            b"send one join request of at most 16 KiB, promptly",
        );
        return Ok(());
    };
    let reply = handler
        .handle(Incoming {
            alpn: ALPN_JOIN.to_vec(),
            peer: None,
            remote,
            request,
        })
        .await;
    if send.write_all(&reply).await.is_ok() && send.finish().is_ok() {
        // The joiner closes once it has the reply.
        let _ = tokio::time::timeout(JOIN_LINGER, conn.closed()).await;
    }
    conn.close(0u32.into(), b"done");
    Ok(())
}

async fn serve_gossip<H: Handler>(
    conn: quinn::Connection,
    handler: Arc<H>,
    peer: Option<NodeId>,
    remote: SocketAddr,
) -> Result<(), quinn::ConnectionError> {
    let call = move |request: Vec<u8>| Incoming {
        alpn: ALPN_GOSSIP.to_vec(),
        peer,
        remote,
        request,
    };
    loop {
        tokio::select! {
            d = conn.read_datagram() => handler.gossip(call(d?.to_vec())),
            s = conn.accept_uni() => {
                let mut recv = s?;
                let handler = handler.clone();
                tokio::spawn(async move {
                    if let Ok(bytes) = recv.read_to_end(shoal_gossip::message::MAX_STREAM_MESSAGE).await {
                        handler.gossip(call(bytes));
                    }
                });
            }
        }
    }
}

/// Remote addresses whose failed handshakes were already logged: a peer of
/// another cluster is reported once, not once per packet.
fn log_refusal_once(remote: SocketAddr, error: &quinn::ConnectionError) {
    static LOGGED: std::sync::OnceLock<Mutex<std::collections::HashSet<SocketAddr>>> =
        std::sync::OnceLock::new();
    let set = LOGGED.get_or_init(|| Mutex::new(std::collections::HashSet::new()));
    if set.lock().unwrap_or_else(|p| p.into_inner()).insert(remote) {
        tracing::warn!(%remote, %error, "refused a connection (not a node of this swarm?); further refusals from this address are not logged");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Echo {
        gossip: Mutex<Vec<(Option<NodeId>, Vec<u8>)>>,
    }

    impl Handler for Echo {
        fn gossip(&self, call: Incoming) {
            self.gossip.lock().unwrap().push((call.peer, call.request));
        }

        async fn handle(&self, call: Incoming) -> Vec<u8> {
            let mut out = call
                .peer
                .map(|p| p.to_string())
                .unwrap_or_default()
                .into_bytes();
            out.push(b':');
            out.extend_from_slice(&call.request);
            out
        }
    }

    fn trusting(ca: &(Vec<u8>, Vec<u8>), revoked: Vec<NodeId>) -> Trust {
        let anchors = crate::daemon::trust::Anchors {
            roots: vec![ca.0.clone()],
            rotation: None,
        };
        Trust::fixed(anchors, revoked)
    }

    fn loopback() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    /// Node `id` of the swarm of `ca`, on a loopback port.
    fn node_quic(ca: &(Vec<u8>, Vec<u8>), id: u64) -> Arc<Quic> {
        Quic::bind(
            &test_identity(ca, NodeId(id)),
            loopback(),
            Trust::only(&ca.0),
        )
        .unwrap()
    }

    #[test]
    fn a_restarted_peer_is_called_again_at_once_on_a_fresh_connection() {
        let runtime = || {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap()
        };
        let ca = pki::new_ca().unwrap();
        let seed = [7u8; 32];
        let identity = test_identity(&ca, NodeId(1));
        let start = |rt: &tokio::runtime::Runtime, addr: SocketAddr| {
            let _in = rt.enter();
            let server = Quic::bind_with_reset(&identity, addr, Trust::only(&ca.0), &seed).unwrap();
            server.serve(Arc::new(Echo::default()));
            server
        };
        let first = runtime();
        let addr = start(&first, loopback()).endpoint.local_addr().unwrap();

        let client = runtime();
        let peer = {
            let _in = client.enter();
            Quic::bind(
                &test_identity(&ca, NodeId(2)),
                loopback(),
                Trust::only(&ca.0),
            )
            .unwrap()
        };
        let t = Duration::from_secs(10);
        let hi = format!("{}:hi", NodeId(2)).into_bytes();
        let call = || client.block_on(peer.call(addr, NodeId(1), ALPN_CTL, b"hi", t));
        assert_eq!(call().unwrap(), hi);

        // The server's process ends without a word (its runtime is gone:
        // no CONNECTION_CLOSE reaches the peer), and a new run comes up on
        // the same address with the same seed.
        drop(first);
        let second = runtime();
        let _server = start(&second, addr);

        // The cached connection is reset at its first packet and the call
        // goes through on a new one, long before any timeout.
        let started = std::time::Instant::now();
        assert_eq!(call().unwrap(), hi);
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
    }

    /// Answers every call with 16 MiB (more than the windows a peer
    /// offers: the writer has to wait for it to read).
    struct Big;

    impl Handler for Big {
        fn gossip(&self, _call: Incoming) {}

        async fn handle(&self, _call: Incoming) -> Vec<u8> {
            vec![7; 16 << 20]
        }
    }

    #[tokio::test]
    async fn a_peer_that_stops_reading_has_its_reply_abandoned_and_others_are_served() {
        let ca = pki::new_ca().unwrap();
        let server = node_quic(&ca, 1);
        server.serve(Arc::new(Big));
        let addr = server.endpoint.local_addr().unwrap();
        let client = node_quic(&ca, 2);
        // Node 2 asks, then never reads the reply.
        let conn = client.connection(addr, NodeId(1), ALPN_CTL).await.unwrap();
        let (mut send, recv) = conn.open_bi().await.unwrap();
        send.write_all(b"give").await.unwrap();
        send.finish().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while server.stalled.view()["replies_abandoned"] == 0 {
            assert!(std::time::Instant::now() < deadline, "never abandoned");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let seen = server.stalled.view();
        assert_eq!(seen["last_peer"], NodeId(2).to_string());
        drop(recv);
        // Another peer is served in full meanwhile.
        let other = node_quic(&ca, 3);
        let reply = other
            .call(addr, NodeId(1), ALPN_CTL, b"give", Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(reply.len(), 16 << 20);
    }

    #[tokio::test]
    async fn cluster_peers_talk_and_strangers_are_served_nothing() {
        let ca = pki::new_ca().unwrap();
        let server = node_quic(&ca, 1);
        let addr = server.endpoint.local_addr().unwrap();
        server.serve(Arc::new(Echo::default()));
        let t = Duration::from_secs(3);

        // A node of the same cluster is served, and identified by its certificate.
        let peer = node_quic(&ca, 2);
        let reply = peer
            .call(addr, NodeId(1), ALPN_CTL, b"hi", t)
            .await
            .unwrap();
        assert_eq!(reply, format!("{}:hi", NodeId(2)).into_bytes());

        let other_ca = pki::new_ca().unwrap();

        // Dialling node 1 but reaching a server whose certificate names
        // another node fails: connections reach the node they meant to.
        assert!(
            peer.call(addr, NodeId(3), ALPN_RAFT, b"hi", t)
                .await
                .is_err()
        );

        // Without a certificate only the join protocol answers: the CA is
        // pinned by fingerprint, and the server sees no peer identity.
        let fp = pki::fingerprint(&ca.0);
        let reply = join_call(addr, &fp, b"join", t).await.unwrap();
        assert_eq!(reply, b":join");
        let wrong_pin = pki::fingerprint(&other_ca.0);
        assert!(join_call(addr, &wrong_pin, b"join", t).await.is_err());
    }

    /// A client that trusts the server's CA and presents `cert` (or none).
    async fn call_as(
        server_ca: &[u8],
        cert: Option<&TlsIdentity>,
        addr: SocketAddr,
        alpn: &[u8],
    ) -> Result<Vec<u8>, QuicError> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots(server_ca).unwrap());
        let mut cfg = match cert {
            Some(id) => builder
                .with_client_auth_cert(
                    vec![CertificateDer::from(id.cert_der.clone())],
                    key(&id.key_der),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        cfg.alpn_protocols = vec![alpn.to_vec()];
        let client_cfg =
            quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(cfg).unwrap()));
        let endpoint = quinn::Endpoint::client(loopback()).unwrap();
        tokio::time::timeout(Duration::from_secs(3), async {
            let conn = connect(&endpoint, client_cfg, addr, &pki::server_name(NodeId(1))).await?;
            exchange(&conn, addr, b"hi").await
        })
        .await
        .unwrap_or(Err(QuicError::Timeout { addr, secs: 3.0 }))
    }

    #[tokio::test]
    async fn gossip_arrives_from_members_only() {
        let ca = pki::new_ca().unwrap();
        let server = node_quic(&ca, 1);
        let addr = server.endpoint.local_addr().unwrap();
        let echo = Arc::new(Echo::default());
        server.serve(echo.clone());
        let t = Duration::from_secs(3);
        let member = node_quic(&ca, 2);
        member
            .gossip(addr, NodeId(1), b"probe", true, t)
            .await
            .unwrap();
        member
            .gossip(addr, NodeId(1), &vec![7u8; 50_000], true, t)
            .await
            .unwrap();
        // A node of another cluster that somehow trusts our CA fails the
        // handshake on the server's side: whatever it sends (its side may
        // believe it sent) never reaches the handler.
        let mut foreign = test_identity(&pki::new_ca().unwrap(), NodeId(3));
        foreign.ca_der = ca.0.clone();
        let stranger = Quic::bind(&foreign, loopback(), Trust::only(&ca.0)).unwrap();
        let _ = stranger.gossip(addr, NodeId(1), b"evil", true, t).await;
        let _ = stranger.gossip(addr, NodeId(1), b"evil", false, t).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        for _ in 0..100 {
            if echo.gossip.lock().unwrap().len() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let got = echo.gossip.lock().unwrap().clone();
        assert_eq!(
            got.len(),
            2,
            "the member's datagram and stream arrive, nothing else"
        );
        assert!(got.iter().all(|(p, _)| *p == Some(NodeId(2))));
        assert!(got.iter().any(|(_, b)| b == b"probe"));
        assert!(got.iter().any(|(_, b)| b.len() == 50_000));
    }

    #[tokio::test]
    async fn removed_nodes_are_refused_at_the_handshake_both_ways() {
        let ca = pki::new_ca().unwrap();
        let server = Quic::bind(
            &test_identity(&ca, NodeId(1)),
            loopback(),
            trusting(&ca, vec![NodeId(3)]),
        )
        .unwrap();
        let addr = server.endpoint.local_addr().unwrap();
        server.serve(Arc::new(Echo::default()));
        let t = Duration::from_secs(3);
        let none = || Trust::only(&ca.0);
        let member = Quic::bind(&test_identity(&ca, NodeId(2)), loopback(), none()).unwrap();
        assert!(
            member
                .call(addr, NodeId(1), ALPN_CTL, b"hi", t)
                .await
                .is_ok()
        );
        let removed = Quic::bind(&test_identity(&ca, NodeId(3)), loopback(), none()).unwrap();
        // (TLS 1.3: the client learns of it when the server closes.)
        let refused = removed.call(addr, NodeId(1), ALPN_CTL, b"hi", t).await;
        assert!(refused.is_err(), "{refused:?}");
        // A node that knows the server as removed does not talk to it.
        let wary = Quic::bind(
            &test_identity(&ca, NodeId(4)),
            loopback(),
            trusting(&ca, vec![NodeId(1)]),
        )
        .unwrap();
        assert!(
            wary.call(addr, NodeId(1), ALPN_RAFT, b"hi", t)
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn the_server_refuses_clients_without_a_cluster_certificate() {
        let ca = pki::new_ca().unwrap();
        let server = node_quic(&ca, 1);
        let addr = server.endpoint.local_addr().unwrap();
        server.serve(Arc::new(Echo::default()));
        let member = test_identity(&ca, NodeId(2));
        let foreign = test_identity(&pki::new_ca().unwrap(), NodeId(2));
        for alpn in [ALPN_RAFT, ALPN_CTL] {
            assert!(call_as(&ca.0, Some(&member), addr, alpn).await.is_ok());
            assert!(
                call_as(&ca.0, None, addr, alpn).await.is_err(),
                "no certificate must not be answered"
            );
            assert!(
                call_as(&ca.0, Some(&foreign), addr, alpn).await.is_err(),
                "a certificate from another CA must not be answered"
            );
        }
    }
}
