//! `swarm ca [--rotate]`: shows the cluster CA and a rotation's progress,
//! and starts a rotation: a new CA (its key sealed with the managers' key)
//! and its cross-signed copy under the old CA, proposed as
//! `Command::StartCaRotation`. Every node's renewal loop does the rest,
//! and the leader finishes it once every node has adopted the new CA
//! (`mesh::ca`).

use shoal_mesh::ca::CaRotation;
use shoal_mesh::{ClusterState, Command};

use super::agent::Daemon;
use super::agent::NOT_IN_SWARM;
use super::clock::now_ms;
use super::pki;
use crate::api::{ApiError, Reply};
use crate::views::{CaRotationView, CaView};

/// `swarm ca`: the CA, and a rotation's progress; with `rotate`, a new
/// rotation first.
pub async fn swarm_ca(d: &Daemon, rotate: bool) -> anyhow::Result<Reply> {
    let m = d.member().await?;
    if rotate {
        let key = m.manager_key().ok_or_else(|| {
            ApiError::unavailable(
                "this manager has not received the managers' key yet; try again in a moment",
            )
        })?;
        let (old_der, sealed) = m
            .state
            .read(|s| {
                s.state
                    .cluster
                    .as_ref()
                    .map(|c| (c.ca_cert_der.clone(), c.sealed_ca_key.clone()))
            })
            .ok_or_else(|| ApiError::not_in_swarm(NOT_IN_SWARM))?;
        let old_key = pki::unseal(&key, &sealed)?;
        // Off the runtime's workers: Raft's heartbeats must not wait for it.
        let new =
            tokio::task::spawn_blocking(move || pki::new_rotated_ca(&old_der, &old_key)).await??;
        m.propose(Command::StartCaRotation(CaRotation {
            ca_fingerprint: pki::fingerprint(&new.cert),
            sealed_ca_key: pki::seal(&key, &new.key),
            ca_cert_der: new.cert,
            cross_cert_der: new.cross,
            started_at_ms: now_ms(),
            adopted: Default::default(),
        }))
        .await?;
    }
    let view = m
        .state
        .read(|s| view(&s.state))
        .ok_or_else(|| ApiError::not_in_swarm(NOT_IN_SWARM))?;
    Reply::of(&view)
}

/// What `swarm ca` shows of `state`. Pure.
pub fn view(state: &ClusterState) -> Option<CaView> {
    let cluster = state.cluster.as_ref()?;
    let rotation = state.ca_rotation.as_ref().map(|r| {
        let pending = state.ca_rotation_pending();
        CaRotationView {
            ca_fingerprint: r.ca_fingerprint.clone(),
            started_at_ms: r.started_at_ms,
            nodes: state.nodes.len(),
            adopted: state.nodes.len() - pending.len(),
            pending: pending
                .iter()
                .map(|n| {
                    let host = state.nodes.get(n).map_or("", |n| n.hostname.as_str());
                    format!("{n} ({host})")
                })
                .collect(),
        }
    });
    Some(CaView {
        ca_cert_pem: pem(&cluster.ca_cert_der),
        ca_fingerprint: cluster.ca_fingerprint.clone(),
        rotation,
    })
}

/// A certificate in PEM. Pure.
fn pem(der: &[u8]) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))
}
