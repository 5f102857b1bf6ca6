//! Writing to the store, wherever the leader is: the [`Propose`] handle the
//! loops and the API write through, and [`Writer`], its Raft-backed side.
//! A write made on a follower is forwarded to the leader over the control
//! protocol; it fails within [`WRITE_TIMEOUT`] when no leader can commit it.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::BasicNode;
use openraft::error::{ClientWriteError, RaftError};
use shoal_mesh::{ApplyError, ClusterState, Command, NodeId, Outcome, codec};
use shoal_raft::{Raft, StateHandle};

use super::liveness::{Liveness, NodeStatus};
use super::quota::Quota;
use super::transport::{MAX_MESSAGE, Quic};
use shoal_mesh::wire::{ALPN_CTL, CtlReply, CtlRequest};

/// How long a write may take before it is reported as failed.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(4);

/// Why a write did not happen.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The state machine refused it; nothing changed.
    #[error(transparent)]
    Refused(#[from] ApplyError),
    /// No leader could commit it in time.
    #[error(
        "no quorum: {reachable} of {total} managers reachable; the change was not confirmed. Restart the unreachable managers, or run `shoal swarm init --force-new-cluster` on a surviving manager"
    )]
    NoQuorum {
        /// Managers this node can reach (itself included).
        reachable: usize,
        /// Managers in the store.
        total: usize,
    },
    /// A majority of managers is reachable, yet no leader confirmed the
    /// write in time.
    #[error(
        "the change was not confirmed within {} s although {reachable} of {total} managers are reachable: the leader is overloaded or slow. It may still be applied: check (`shoal node ls`, `shoal service ls`) before retrying",
        WRITE_TIMEOUT.as_secs()
    )]
    NotConfirmed {
        /// Managers this node can reach (itself included).
        reachable: usize,
        /// Managers in the store.
        total: usize,
    },
    /// The store is over its quota and the write would grow it.
    #[error(
        "store quota exceeded: the swarm's state is {size} bytes, over its quota of {limit}; nothing was changed. Remove services, networks or nodes (removals still go through), or raise [store] quota_mib on the managers"
    )]
    QuotaExceeded {
        /// The state's encoded size.
        size: u64,
        /// The quota.
        limit: u64,
    },
    /// Any other failure (reported by a peer or by Raft).
    #[error("{0}")]
    Other(String),
}

/// Commits commands to the store. The daemon's side is [`Writer`]; a test
/// can apply them with `shoal_mesh::apply` in memory instead.
pub trait Propose: Send + Sync {
    /// Commits `cmd`; its outcome once applied.
    fn propose(&self, cmd: Command) -> impl Future<Output = Result<Outcome, WriteError>> + Send;
}

/// Why a write was not confirmed in time, with `reachable` of `total`
/// managers reachable from here: a lost quorum only without a majority.
/// Pure.
pub fn unconfirmed(reachable: usize, total: usize) -> WriteError {
    if reachable > total / 2 {
        WriteError::NotConfirmed { reachable, total }
    } else {
        WriteError::NoQuorum { reachable, total }
    }
}

/// How node `me` asks the leader to write `cmd`: its own task reports, its
/// resources and its own departure as what they are (any member may send
/// those), the rest as a proposal, which the leader takes from managers
/// only. Pure.
fn forwarded(me: NodeId, cmd: Command) -> CtlRequest {
    match cmd {
        Command::ReportTask { node, report } if node == me => CtlRequest::ReportTask(report),
        Command::RemoveNode(node) if node == me => CtlRequest::Leave,
        Command::AdoptCa { node, fingerprint } if node == me => CtlRequest::AdoptCa { fingerprint },
        Command::SetNodeResources { node, resources } if node == me => {
            CtlRequest::ReportResources(resources)
        }
        other => CtlRequest::Propose(Box::new(other)),
    }
}

/// Writes through Raft: on the leader directly, elsewhere forwarded to it.
/// Cheap to clone.
#[derive(Clone)]
pub struct Writer {
    id: NodeId,
    raft: Raft,
    state: StateHandle,
    quic: Arc<Quic>,
    live: Arc<Liveness>,
    quota: Arc<Quota>,
}

impl Propose for Writer {
    async fn propose(&self, cmd: Command) -> Result<Outcome, WriteError> {
        self.write(cmd).await
    }
}

impl Writer {
    /// A writer for node `id`.
    pub fn new(
        id: NodeId,
        raft: Raft,
        state: StateHandle,
        quic: Arc<Quic>,
        live: Arc<Liveness>,
        quota: Arc<Quota>,
    ) -> Self {
        Writer {
            id,
            raft,
            state,
            quic,
            live,
            quota,
        }
    }

    /// Refuses `cmd` on this node (as leader) when the store is over its
    /// quota and `cmd` would grow it.
    pub fn check_quota(&self, cmd: &Command) -> Result<(), WriteError> {
        self.quota
            .check(&self.state, cmd)
            .map_err(|e| WriteError::QuotaExceeded {
                size: e.size as u64,
                limit: e.limit as u64,
            })
    }

    /// This node's ID.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The leader this node knows of.
    pub fn leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader.map(NodeId)
    }

    /// Whether this node leads.
    pub fn is_leader(&self) -> bool {
        self.leader() == Some(self.id)
    }

    /// Managers reachable from here (this node included) and all managers.
    pub fn manager_reachability(&self, state: &ClusterState) -> (usize, usize) {
        let total = state.managers().count();
        let now = Instant::now();
        let reachable = state
            .managers()
            .filter(|m| self.live.status(m.id, now) == NodeStatus::Ready)
            .count();
        (reachable, total)
    }

    /// The error of a write no leader confirmed in time.
    pub fn no_quorum(&self) -> WriteError {
        let (reachable, total) = self.manager_reachability(&self.state.state());
        unconfirmed(reachable, total)
    }

    async fn write(&self, cmd: Command) -> Result<Outcome, WriteError> {
        let deadline = Instant::now() + WRITE_TIMEOUT;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(self.no_quorum());
            }
            let remaining = deadline - now;
            tracing::debug!(leader = ?self.leader(), elapsed_ms = (WRITE_TIMEOUT - remaining).as_millis() as u64, "propose attempt");
            match self.leader() {
                Some(l) if l == self.id => {
                    self.check_quota(&cmd)?;
                    match tokio::time::timeout(remaining, self.raft.client_write(cmd.clone())).await
                    {
                        Ok(Ok(resp)) => return resp.data.map_err(WriteError::Refused),
                        Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => {}
                        Ok(Err(e)) => return Err(WriteError::Other(e.to_string())),
                        Err(_) => return Err(self.no_quorum()),
                    }
                }
                Some(l) => {
                    // Give up on this leader as soon as Raft reports another
                    // one: a dead leader's connection would otherwise hold the
                    // write until the QUIC idle timeout.
                    let req = forwarded(self.id, cmd.clone());
                    let forward = self.ctl(l, &req, remaining);
                    tokio::select! {
                        reply = forward => match reply {
                            Ok(CtlReply::Applied(r)) => return r.map_err(WriteError::Refused),
                            Ok(CtlReply::Refused(msg)) => return Err(WriteError::Other(msg)),
                            Ok(CtlReply::QuotaExceeded { size, limit }) => {
                                return Err(WriteError::QuotaExceeded { size, limit });
                            }
                            Ok(_) | Err(_) => {}
                        },
                        () = self.leader_changed_from(l) => continue,
                    }
                }
                None => {}
            }
            // Retry as soon as Raft's view changes (a leader is elected), or
            // after a short pause.
            let mut metrics = self.raft.metrics();
            metrics.borrow_and_update();
            let _ = tokio::time::timeout(Duration::from_millis(50), metrics.changed()).await;
        }
    }

    /// Resolves when Raft reports a leader other than `l` (or none).
    async fn leader_changed_from(&self, l: NodeId) {
        let mut rx = self.raft.metrics();
        while rx.borrow().current_leader == Some(l.0) {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// The address of node `id`: from the store, else from Raft's membership.
    pub fn addr_of(&self, id: NodeId) -> Option<SocketAddr> {
        let from_state = self
            .state
            .read(|d| d.state.nodes.get(&id).map(|n| n.addr.clone()));
        let addr = from_state.or_else(|| {
            self.raft
                .metrics()
                .borrow()
                .membership_config
                .membership()
                .get_node(&id.0)
                .map(|n: &BasicNode| n.addr.clone())
        })?;
        addr.parse().ok()
    }

    /// One control call to node `id`.
    pub async fn ctl(
        &self,
        id: NodeId,
        req: &CtlRequest,
        timeout: Duration,
    ) -> anyhow::Result<CtlReply> {
        let addr = self
            .addr_of(id)
            .ok_or_else(|| anyhow::anyhow!("no address known for node {id}"))?;
        let bytes = codec::encode(req)?;
        let reply = self.quic.call(addr, id, ALPN_CTL, &bytes, timeout).await?;
        Ok(codec::decode(&reply, MAX_MESSAGE)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_mesh::task::{TaskReport, TaskState};

    #[test]
    fn an_unconfirmed_write_blames_the_quorum_only_without_a_majority() {
        assert!(matches!(unconfirmed(1, 3), WriteError::NoQuorum { .. }));
        assert!(matches!(unconfirmed(1, 2), WriteError::NoQuorum { .. }));
        let slow = unconfirmed(3, 3);
        assert!(matches!(slow, WriteError::NotConfirmed { .. }));
        let text = slow.to_string();
        assert!(
            !text.contains("no quorum") && text.contains("3 of 3"),
            "{text}"
        );
        assert!(matches!(unconfirmed(1, 1), WriteError::NotConfirmed { .. }));
    }

    #[test]
    fn a_node_forwards_its_own_reports_and_departure_as_such() {
        let me = NodeId(7);
        let report = TaskReport::new("t1".into(), TaskState::Running, String::new(), None, 1);
        let own = Command::ReportTask {
            node: me,
            report: report.clone(),
        };
        assert!(matches!(forwarded(me, own), CtlRequest::ReportTask(r) if r == report));
        assert!(matches!(
            forwarded(me, Command::RemoveNode(me)),
            CtlRequest::Leave
        ));
        // Anything else is a proposal, which only a manager may make.
        assert!(matches!(
            forwarded(me, Command::RemoveNode(NodeId(8))),
            CtlRequest::Propose(_)
        ));
        let other = Command::ReportTask {
            node: NodeId(8),
            report,
        };
        assert!(matches!(forwarded(me, other), CtlRequest::Propose(_)));
    }
}
