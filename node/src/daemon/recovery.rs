//! `swarm init --force-new-cluster`: after losing quorum for good, make this
//! manager the only one, keeping everything in its copy of the store.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use openraft::BasicNode;
use shoal_mesh::{Command, Role};

use super::agent::Daemon;
use crate::api::{ApiError, Reply};

/// Rebuilds a one-manager swarm from this manager's local state.
pub async fn force_new_cluster(d: &Arc<Daemon>) -> anyhow::Result<Reply> {
    let mut slot = d.member.lock().await;
    let m = slot.clone().ok_or_else(|| {
        ApiError::not_in_swarm(
            "--force-new-cluster needs this node's swarm state, and this node is not part of a swarm",
        )
    })?;
    let state = m.state.state();
    if state.nodes.get(&m.id).map(|n| n.role) != Some(Role::Manager) {
        return Err(ApiError::not_in_swarm(
            "--force-new-cluster must run on a manager; this node is a worker",
        ));
    }
    if m.manager_key().is_none() {
        return Err(ApiError::conflict(
            "this manager does not hold the managers' key, so it cannot run the swarm alone",
        ));
    }
    // As saved: the certificate and the managers' key this member runs with.
    let identity = m
        .keys
        .identity()?
        .ok_or_else(|| anyhow!("this node's identity is missing from its state dir"))?;
    let nodes: BTreeMap<u64, BasicNode> = state
        .nodes
        .values()
        .map(|n| (n.id.0, BasicNode::new(n.addr.clone())))
        .collect();
    let me = m.id;
    m.shutdown().await;
    *slot = None;
    drop(m);
    // The old Raft's tasks and QUIC driver let go of the log database and the
    // UDP port shortly after shutdown; until then, opening either fails.
    retry_briefly(|| async {
        let at_rest = shoal_raft::AtRest::with_key(&identity.raft_key);
        shoal_raft::recovery::force_single_voter(&d.dir.raft(), at_rest, me.0, nodes.clone())
            .map_err(anyhow::Error::from)
    })
    .await?;
    let m = retry_briefly(|| d.start_member(identity.clone())).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while m.leader() != Some(me) {
        if Instant::now() > deadline {
            *slot = Some(m);
            bail!(
                "this node did not become leader of the new swarm within 10 s; see the daemon log"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let result = m.propose(Command::ForceNewCluster { keep: me }).await;
    *slot = Some(m);
    result?;
    Reply::of(&crate::views::Done {
        node_id: me.to_string(),
        message: "this node is now the only manager; the other managers were demoted to workers: promote new managers with `shoal node promote`".into(),
    })
}

/// Runs `f` until it succeeds, for up to 5 s.
async fn retry_briefly<T, F, Fut>(mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}
