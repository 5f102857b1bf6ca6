//! The network seam: openraft's `RaftNetwork` over any [`RaftTransport`].
//!
//! The transport carries one [`RaftRpc`] to a peer and brings back its
//! [`RaftRpcReply`]; the node crate implements it over QUIC with mutual TLS,
//! tests can implement it in memory. [`serve_rpc`] is the receiving side.

use std::future::Future;
use std::time::Duration;

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{AnyError, BasicNode};
use serde::{Deserialize, Serialize};

use crate::types::{Raft, TypeConfig};

/// A Raft RPC on the wire.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftRpc {
    /// AppendEntries (also heartbeats).
    Append(AppendEntriesRequest<TypeConfig>),
    /// RequestVote.
    Vote(VoteRequest<u64>),
    /// One chunk of a snapshot.
    Snapshot(InstallSnapshotRequest<TypeConfig>),
}

/// The reply to a [`RaftRpc`].
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftRpcReply {
    /// Reply to `Append`.
    Append(Result<AppendEntriesResponse<u64>, RaftError<u64>>),
    /// Reply to `Vote`.
    Vote(Result<VoteResponse<u64>, RaftError<u64>>),
    /// Reply to `Snapshot`.
    Snapshot(Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>),
}

/// Why an RPC did not get a reply.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TransportError {
    /// The peer could not be reached (connect failed, timed out, refused).
    #[error("peer {addr} unreachable: {reason}")]
    Unreachable {
        /// The peer's address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The peer answered something that is not a valid reply.
    #[error("bad reply from {addr}: {reason}")]
    BadReply {
        /// The peer's address.
        addr: String,
        /// Why.
        reason: String,
    },
}

/// Carries Raft RPCs to peers.
pub trait RaftTransport: Clone + Send + Sync + 'static {
    /// Sends `rpc` to node `target` at `addr` and waits at most `timeout` for its reply.
    fn call(
        &self,
        target: u64,
        addr: &str,
        rpc: RaftRpc,
        timeout: std::time::Duration,
    ) -> impl Future<Output = Result<RaftRpcReply, TransportError>> + Send;
}

/// openraft's network factory over a transport.
#[derive(Clone)]
pub struct Network<T> {
    transport: T,
}

impl<T: RaftTransport> Network<T> {
    /// Wraps a transport.
    pub fn new(transport: T) -> Self {
        Network { transport }
    }
}

/// A connection to one peer.
pub struct PeerClient<T> {
    transport: T,
    target: u64,
    addr: String,
}

impl<T: RaftTransport> RaftNetworkFactory<TypeConfig> for Network<T> {
    type Network = PeerClient<T>;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> Self::Network {
        PeerClient {
            transport: self.transport.clone(),
            target,
            addr: node.addr.clone(),
        }
    }
}

/// A failed call as openraft takes it: unreachable, so that the leader
/// backs off ([`PeerClient::backoff`]). A bad or empty reply too: a peer
/// that refuses the caller (a former manager back after
/// `--force-new-cluster`, calling as the leader of an old term) closes the
/// stream without one, and openraft retries a network error at once: such
/// a node called its old peers every few milliseconds.
fn unreachable<E: std::error::Error>(e: &TransportError) -> RPCError<u64, BasicNode, E> {
    RPCError::Unreachable(Unreachable::new(e))
}

fn mismatch<E: std::error::Error>(addr: &str) -> RPCError<u64, BasicNode, E> {
    RPCError::Network(NetworkError::new(&AnyError::error(format!(
        "reply of the wrong kind from {addr}"
    ))))
}

impl<T: RaftTransport> PeerClient<T> {
    async fn call(&self, rpc: RaftRpc, option: &RPCOption) -> Result<RaftRpcReply, TransportError> {
        self.transport
            .call(self.target, &self.addr, rpc, option.hard_ttl())
            .await
    }
}

impl<T: RaftTransport> RaftNetwork<TypeConfig> for PeerClient<T> {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        match self.call(RaftRpc::Append(rpc), &option).await {
            Ok(RaftRpcReply::Append(r)) => r.map_err(|e| {
                RPCError::RemoteError(openraft::error::RemoteError::new(self.target, e))
            }),
            Ok(_) => Err(mismatch(&self.addr)),
            Err(e) => Err(unreachable(&e)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>,
    > {
        match self.call(RaftRpc::Snapshot(rpc), &option).await {
            Ok(RaftRpcReply::Snapshot(r)) => r.map_err(|e| {
                RPCError::RemoteError(openraft::error::RemoteError::new(self.target, e))
            }),
            Ok(_) => Err(mismatch(&self.addr)),
            Err(e) => Err(unreachable(&e)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        match self.call(RaftRpc::Vote(rpc), &option).await {
            Ok(RaftRpcReply::Vote(r)) => r.map_err(|e| {
                RPCError::RemoteError(openraft::error::RemoteError::new(self.target, e))
            }),
            Ok(_) => Err(mismatch(&self.addr)),
            Err(e) => Err(unreachable(&e)),
        }
    }

    /// After a failed call the leader waits [`BACKOFF_FIRST`], then twice
    /// as long each time, up to [`BACKOFF_MAX`] (openraft's default: 500 ms
    /// every time). One call lost or slow on a loaded machine is retried
    /// within the followers' election timeout instead of costing an
    /// election; a follower that is gone is still called only twice a
    /// second after the first few.
    fn backoff(&self) -> openraft::network::Backoff {
        openraft::network::Backoff::new(backoff_delays())
    }
}

/// The first wait after a failed call to a follower.
pub const BACKOFF_FIRST: Duration = Duration::from_millis(50);
/// The longest.
pub const BACKOFF_MAX: Duration = Duration::from_millis(500);

/// The waits between calls to a follower that fail (see
/// `PeerClient::backoff`).
pub fn backoff_delays() -> impl Iterator<Item = Duration> + Send + 'static {
    std::iter::successors(Some(BACKOFF_FIRST), |d| Some((*d * 2).min(BACKOFF_MAX)))
}

/// Hands an incoming RPC to the local Raft node and returns its reply.
pub async fn serve_rpc(raft: &Raft, rpc: RaftRpc) -> RaftRpcReply {
    match rpc {
        RaftRpc::Append(r) => RaftRpcReply::Append(raft.append_entries(r).await),
        RaftRpc::Vote(r) => RaftRpcReply::Vote(raft.vote(r).await),
        RaftRpc::Snapshot(r) => RaftRpcReply::Snapshot(raft.install_snapshot(r).await),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use shoal_mesh::codec::DEFAULT_LIMIT;
    use shoal_mesh::fixtures::decode_hostile;

    use super::{
        BACKOFF_FIRST, BACKOFF_MAX, RaftRpc, RaftRpcReply, TransportError, backoff_delays,
        unreachable,
    };
    use std::time::Duration;

    #[test]
    fn a_refused_or_bad_reply_makes_the_leader_back_off() {
        use openraft::error::{Infallible, RPCError};
        let bad = TransportError::BadReply {
            addr: "127.0.0.1:2377".into(),
            reason: "empty message".into(),
        };
        let e: RPCError<u64, openraft::BasicNode, Infallible> = unreachable(&bad);
        assert!(matches!(e, RPCError::Unreachable(_)), "{e:?}");
    }

    #[test]
    fn a_failed_call_is_retried_soon_then_less_and_less_often() {
        let waits: Vec<Duration> = backoff_delays().take(7).collect();
        let ms = |v: u64| Duration::from_millis(v);
        assert_eq!(
            waits,
            [ms(50), ms(100), ms(200), ms(400), ms(500), ms(500), ms(500)]
        );
        assert_eq!(
            (waits[0], *waits.last().unwrap()),
            (BACKOFF_FIRST, BACKOFF_MAX)
        );
    }

    proptest! {
        /// Any bytes on the Raft protocol decode to an RPC or an error,
        /// never a panic.
        #[test]
        fn hostile_bytes_decode_to_errors_not_panics(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            decode_hostile::<RaftRpc>(&bytes, DEFAULT_LIMIT);
            decode_hostile::<RaftRpcReply>(&bytes, DEFAULT_LIMIT);
        }
    }
}
