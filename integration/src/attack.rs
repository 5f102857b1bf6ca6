//! A hostile peer, for tests of what the serving side refuses: it speaks
//! Shoal's peer protocols over real QUIC with a real node's certificate
//! and key, read from that node's state dir, and sends whatever it is told
//! to (a worker proposing a promotion, a vote at a made-up term, an append
//! that speaks for another node…). It trusts any server: an attacker does
//! not care whom it talks to.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use quinn::crypto::rustls::QuicClientConfig;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use shoal_mesh::codec;
use shoal_mesh::wire::{ALPN_CTL, ALPN_GOSSIP, ALPN_JOIN, ALPN_RAFT, CtlReply, CtlRequest};
use shoal_raft::{RaftRpc, RaftRpcReply};

/// How long one call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// A client holding one node's identity, or none.
pub struct Attacker {
    rt: tokio::runtime::Runtime,
    identity: Option<(CertificateDer<'static>, Vec<u8>)>,
    bind: SocketAddr,
}

/// What a flood of unauthenticated connections achieved.
#[derive(Debug, Default)]
pub struct Flood {
    /// Connections whose handshake completed.
    pub connected: usize,
    /// Streams the attacker could open (the server's initial stream credit).
    pub streams: usize,
    /// Bytes the attacker's writes completed (into its send buffers, as far
    /// as the server's flow control let them), not what the server read.
    pub bytes_sent: u64,
}

impl Attacker {
    /// An attacker with the certificate and key of the node whose state
    /// dir is `dir` (`node.der`, `node.key`).
    pub fn with_identity_of(dir: &Path) -> anyhow::Result<Self> {
        let read = |name: &str| {
            std::fs::read(dir.join(name)).with_context(|| format!("{}/{name}", dir.display()))
        };
        Ok(Attacker {
            rt: runtime()?,
            identity: Some((CertificateDer::from(read("node.der")?), read("node.key")?)),
            bind: "127.0.0.1:0".parse()?,
        })
    }

    /// An attacker without a certificate (only the join protocol is
    /// served to it), sending from address `from` (any 127/8 address is
    /// this machine's).
    pub fn anonymous(from: std::net::IpAddr) -> anyhow::Result<Self> {
        Ok(Attacker {
            rt: runtime()?,
            identity: None,
            bind: SocketAddr::new(from, 0),
        })
    }

    /// Opens `conns` connections on the join protocol at once; on each,
    /// `streams` streams that each try to send `bytes` bytes; gives up
    /// after `deadline`. What got through.
    pub fn flood(
        &self,
        addr: SocketAddr,
        conns: usize,
        streams: usize,
        bytes: usize,
        deadline: Duration,
    ) -> anyhow::Result<Flood> {
        let cfg = self.client_config(ALPN_JOIN)?;
        let payload = Arc::new(vec![0x5a_u8; bytes]);
        self.rt.block_on(async {
            let endpoint = quinn::Endpoint::client(self.bind)?;
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..conns {
                let (endpoint, cfg, payload) = (endpoint.clone(), cfg.clone(), payload.clone());
                tasks.spawn(async move {
                    let mut got = Flood::default();
                    let Ok(connecting) = endpoint.connect_with(cfg, addr, "shoal") else {
                        return got;
                    };
                    let Ok(conn) = connecting.await else {
                        return got;
                    };
                    got.connected = 1;
                    let mut sends = tokio::task::JoinSet::new();
                    for _ in 0..streams {
                        let Ok(Ok((mut send, _recv))) =
                            tokio::time::timeout(Duration::from_millis(200), conn.open_bi()).await
                        else {
                            break;
                        };
                        got.streams += 1;
                        let payload = payload.clone();
                        sends.spawn(async move {
                            let mut sent = 0u64;
                            for chunk in payload.chunks(64 << 10) {
                                if send.write_all(chunk).await.is_err() {
                                    break;
                                }
                                sent += chunk.len() as u64;
                            }
                            sent
                        });
                    }
                    while let Some(sent) = sends.join_next().await {
                        got.bytes_sent += sent.unwrap_or(0);
                    }
                    got
                });
            }
            let mut total = Flood::default();
            let _ = tokio::time::timeout(deadline, async {
                while let Some(Ok(got)) = tasks.join_next().await {
                    total.connected += got.connected;
                    total.streams += got.streams;
                    total.bytes_sent += got.bytes_sent;
                }
            })
            .await;
            tasks.abort_all();
            endpoint.close(0u32.into(), b"done");
            anyhow::Ok(total)
        })
    }

    /// A control call; the daemon's reply.
    pub fn ctl(&self, addr: SocketAddr, req: &CtlRequest) -> anyhow::Result<CtlReply> {
        let reply = self.call(addr, ALPN_CTL, &codec::encode(req)?)?;
        Ok(codec::decode(&reply, codec::DEFAULT_LIMIT)?)
    }

    /// A Raft RPC; `None` when the daemon answered nothing (it refuses a
    /// Raft call by closing the stream without a reply).
    pub fn raft(&self, addr: SocketAddr, rpc: &RaftRpc) -> anyhow::Result<Option<RaftRpcReply>> {
        let reply = self.call(addr, ALPN_RAFT, &codec::encode(rpc)?)?;
        if reply.is_empty() {
            return Ok(None);
        }
        Ok(Some(codec::decode(&reply, codec::DEFAULT_LIMIT)?))
    }

    /// One request on a fresh connection with ALPN `alpn`: the raw reply.
    pub fn call(&self, addr: SocketAddr, alpn: &[u8], request: &[u8]) -> anyhow::Result<Vec<u8>> {
        let session = self.session(addr, alpn)?;
        let reply = session.call(request);
        session.close();
        reply
    }

    /// One gossip message (a one-way stream on the gossip protocol); waits
    /// until the daemon has received it all, and a moment for it to be read.
    pub fn gossip(&self, addr: SocketAddr, message: &[u8]) -> anyhow::Result<()> {
        let session = self.session(addr, ALPN_GOSSIP)?;
        let sent = self.rt.block_on(async {
            let mut send = session.conn.open_uni().await?;
            send.write_all(message).await?;
            send.finish()?;
            let _ = tokio::time::timeout(CALL_TIMEOUT, send.stopped()).await;
            // `stopped` says the bytes arrived, not that the daemon's reader
            // took them: a connection closed now can lose them in its
            // buffers (seen in CI). A node's own connections stay open.
            tokio::time::sleep(Duration::from_millis(500)).await;
            anyhow::Ok(())
        });
        session.close();
        sent
    }

    /// A connection with ALPN `alpn` that stays open for several requests.
    pub fn session(&self, addr: SocketAddr, alpn: &[u8]) -> anyhow::Result<Session<'_>> {
        let cfg = self.client_config(alpn)?;
        self.rt.block_on(async {
            let endpoint = quinn::Endpoint::client(self.bind)?;
            let connecting = endpoint.connect_with(cfg, addr, "shoal")?;
            match tokio::time::timeout(CALL_TIMEOUT, connecting).await {
                Ok(Ok(conn)) => Ok(Session {
                    attacker: self,
                    endpoint,
                    conn,
                    addr,
                }),
                Ok(Err(e)) => bail!("cannot connect to {addr}: {e}"),
                Err(_) => bail!("no handshake with {addr} within {CALL_TIMEOUT:?}"),
            }
        })
    }

    fn client_config(&self, alpn: &[u8]) -> anyhow::Result<quinn::ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
        let mut tls = match &self.identity {
            Some((cert, key)) => builder.with_client_auth_cert(
                vec![cert.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.clone())),
            )?,
            None => builder.with_no_client_auth(),
        };
        tls.alpn_protocols = vec![alpn.to_vec()];
        Ok(quinn::ClientConfig::new(Arc::new(
            QuicClientConfig::try_from(tls)?,
        )))
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// An open connection of an [`Attacker`].
pub struct Session<'a> {
    attacker: &'a Attacker,
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    addr: SocketAddr,
}

impl Session<'_> {
    /// One request on this connection: the raw reply.
    pub fn call(&self, request: &[u8]) -> anyhow::Result<Vec<u8>> {
        let addr = self.addr;
        self.attacker.rt.block_on(async {
            let exchange = async {
                let (mut send, mut recv) = self.conn.open_bi().await?;
                send.write_all(request).await?;
                send.finish()?;
                anyhow::Ok(recv.read_to_end(codec::DEFAULT_LIMIT).await?)
            };
            match tokio::time::timeout(CALL_TIMEOUT, exchange).await {
                Ok(r) => r,
                Err(_) => bail!("no reply from {addr} within {CALL_TIMEOUT:?}"),
            }
        })
    }

    /// A control call on this connection.
    pub fn ctl(&self, req: &CtlRequest) -> anyhow::Result<CtlReply> {
        let reply = self.call(&codec::encode(req)?)?;
        Ok(codec::decode(&reply, codec::DEFAULT_LIMIT)?)
    }

    /// Closes the connection.
    pub fn close(self) {
        self.conn.close(0u32.into(), b"done");
        self.endpoint.close(0u32.into(), b"done");
    }
}

/// Accepts any server certificate (its handshake signatures are still
/// checked, as rustls requires).
#[derive(Debug)]
struct AnyServer(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
