//! Certificate renewal: every node renews its certificate at half its
//! validity, with a fresh key, over a CSR to a manager (`RenewCert`), and
//! takes the new one without a restart: new connections present it, open
//! ones go on, and gossip signs this node's entries again with the new key.
//!
//! The same loop follows a CA rotation (`swarm ca --rotate`): when the
//! store's trusted CAs change it presents the chain they call for, and
//! while a rotation runs it renews under the new CA at once and reports
//! that it has (`AdoptCa`). It sleeps until the renewal is due (waking at
//! least hourly) or the store changes; an idle node does nothing else.

use std::sync::Arc;
use std::time::Duration;

use shoal_mesh::wire::{CtlReply, CtlRequest};
use shoal_mesh::{Command, NodeId, Role};
use shoal_raft::StateHandle;

use super::clock::now_ms;
use super::entry_keys::{SigningHandle, signing};
use super::gossip::{GossipCmd, GossipHandle};
use super::identity::Secrets;
use super::pki;
use super::poison::lock;
use super::transport::{Quic, TlsIdentity};
use super::trust::Trust;
use super::writer::{Propose, Writer};

/// How long to wait after a failed renewal.
const RETRY: Duration = Duration::from_secs(5);
/// The longest the loop sleeps before it looks again.
const MAX_SLEEP: Duration = Duration::from_secs(3600);
/// How long one manager has to answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// What the renewal loop uses.
pub struct RenewalCtx {
    /// This node.
    pub id: NodeId,
    /// The store: who the managers are, a CA rotation.
    pub state: StateHandle,
    /// Control calls to managers.
    pub writer: Writer,
    /// The endpoint whose certificate is replaced.
    pub quic: Arc<Quic>,
    /// The CAs trusted now.
    pub trust: Trust,
    /// Gossip's signing pair, replaced too.
    pub signing: SigningHandle,
    /// Told to sign this node's entries again.
    pub gossip: GossipHandle,
    /// Where the certificate and key are kept (sealed when autolocked).
    pub keys: Arc<Secrets>,
}

/// When a certificate valid from `from_ms` until `until_ms` is renewed:
/// half-way. Pure.
pub fn renew_at(from_ms: i64, until_ms: i64) -> i64 {
    from_ms + (until_ms - from_ms) / 2
}

/// A random delay before renewing for a CA rotation, so that the managers
/// sign for a swarm of `nodes` over about `nodes` × 20 ms (at least a
/// second, at most a minute) rather than all at once.
fn spread(nodes: usize) -> Duration {
    let window = (nodes as u64 * 20).clamp(1_000, 60_000);
    Duration::from_millis(rand::random_range(0..window))
}

/// A CA rotation as this node sees it.
pub struct Rotating<'a> {
    /// The new CA (DER).
    pub ca_der: &'a [u8],
    /// Its fingerprint.
    pub fingerprint: &'a str,
    /// Whether the store has this node's report that it adopted it.
    pub adopted: bool,
}

/// What the loop does next.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Renew this node's certificate now.
    Renew,
    /// Report that this node's certificate is under the new CA.
    Adopt(String),
    /// Nothing until then.
    Wait(Duration),
}

/// What to do for certificate `cert_der` (valid `validity`, in ms since the
/// epoch) at `now_ms`, given a CA rotation. Pure.
pub fn next(
    cert_der: &[u8],
    validity: (i64, i64),
    now_ms: i64,
    rotation: Option<Rotating>,
) -> Next {
    if let Some(r) = rotation {
        if !pki::issued_by(cert_der, r.ca_der) {
            return Next::Renew;
        }
        if !r.adopted {
            return Next::Adopt(r.fingerprint.to_owned());
        }
    }
    let left = renew_at(validity.0, validity.1) - now_ms;
    if left > 0 {
        Next::Wait(Duration::from_millis(left as u64))
    } else {
        Next::Renew
    }
}

/// Runs until the task is aborted.
pub async fn run(ctx: RenewalCtx) {
    let mut identity = loop {
        match ctx.keys.identity() {
            Ok(Some(id)) => break id.tls,
            Ok(None) => tracing::warn!("no identity in the state dir to renew"),
            Err(e) => tracing::warn!(error = %e, "cannot read this node's certificate"),
        }
        tokio::time::sleep(RETRY).await;
    };
    let mut anchors = ctx.trust.anchors();
    let mut changes = ctx.trust.changes();
    loop {
        let now = ctx.trust.anchors();
        if now != anchors {
            anchors = now;
            if let Err(e) = present(&ctx, &identity) {
                tracing::warn!(error = %format!("{e:#}"), "cannot present the chain the new CAs call for");
            }
        }
        let wait = match step(&ctx, &mut identity).await {
            Ok(wait) => wait,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "certificate renewal failed; retrying");
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        let Some(wait) = wait else { continue };
        tokio::select! {
            () = tokio::time::sleep(wait.min(MAX_SLEEP)) => {}
            changed = changes.changed() => {
                if changed.is_err() {
                    // Nothing changes the store any more.
                    tokio::time::sleep(wait.min(MAX_SLEEP)).await;
                }
            }
        }
    }
}

/// Does what [`next`] says; how long to wait then (`None`: look again now).
async fn step(ctx: &RenewalCtx, identity: &mut TlsIdentity) -> anyhow::Result<Option<Duration>> {
    let validity = pki::validity_ms(&identity.cert_der)?;
    let (rotating, decided) = ctx.state.read(|d| {
        let rotating = d.state.ca_rotation.as_ref().map(|r| Rotating {
            ca_der: &r.ca_cert_der,
            fingerprint: &r.ca_fingerprint,
            adopted: r.adopted.contains(&ctx.id),
        });
        let rotating_now = rotating.is_some();
        let decided = next(&identity.cert_der, validity, now_ms() as i64, rotating);
        (rotating_now, decided)
    });
    match decided {
        Next::Wait(wait) => Ok(Some(wait)),
        Next::Renew => {
            if rotating {
                // Not every node at once: spread over a time that grows
                // with the swarm.
                tokio::time::sleep(spread(ctx.state.read(|d| d.state.nodes.len()))).await;
            }
            *identity = renew(ctx).await?;
            let until = pki::expires_at_ms(&identity.cert_der)?;
            tracing::info!(expires_at_ms = until, "renewed this node's certificate");
            Ok(None)
        }
        Next::Adopt(fingerprint) => {
            let cmd = Command::AdoptCa {
                node: ctx.id,
                fingerprint: fingerprint.clone(),
            };
            ctx.writer.propose(cmd).await?;
            tracing::info!(ca = %fingerprint, "reported this node's certificate under the new CA");
            // Until the report is applied here too.
            let mut changes = ctx.state.changes();
            let applied = async {
                while !ctx.state.read(|d| {
                    d.state
                        .ca_rotation
                        .as_ref()
                        .is_none_or(|r| r.adopted.contains(&ctx.id))
                }) {
                    if changes.changed().await.is_err() {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(RETRY, applied).await;
            Ok(None)
        }
    }
}

/// Renews through a manager (the leader last); the new identity, taken.
async fn renew(ctx: &RenewalCtx) -> anyhow::Result<TlsIdentity> {
    let (key_der, csr_der) = pki::new_key_and_csr()?;
    let mut managers: Vec<NodeId> = ctx.state.read(|d| {
        d.state
            .nodes
            .values()
            .filter(|n| n.role == Role::Manager)
            .map(|n| n.id)
            .collect()
    });
    // Other managers first, in random order: the leader has Raft's
    // heartbeats to keep.
    rand::seq::SliceRandom::shuffle(&mut managers[..], &mut rand::rng());
    if let Some(l) = ctx.writer.leader() {
        managers.retain(|m| *m != l);
        managers.push(l);
    }
    let req = CtlRequest::RenewCert { csr_der };
    let mut last = String::from("no manager known");
    for m in managers {
        match ctx.writer.ctl(m, &req, CALL_TIMEOUT).await {
            Ok(CtlReply::Cert(cert_der)) => {
                let ca_der = ctx
                    .trust
                    .anchors()
                    .issuer_of(&cert_der)
                    .map(<[u8]>::to_vec)
                    .ok_or_else(|| {
                        anyhow::anyhow!(
                            "node {m} sent a certificate under a CA this node does not trust"
                        )
                    })?;
                let new = TlsIdentity {
                    ca_der,
                    cert_der,
                    key_der,
                };
                take(ctx, &new)?;
                return Ok(new);
            }
            Ok(CtlReply::Refused(msg)) => last = format!("node {m}: {msg}"),
            Ok(other) => last = format!("node {m}: unexpected reply {other:?}"),
            Err(e) => last = format!("node {m}: {e:#}"),
        }
    }
    anyhow::bail!("no manager renewed the certificate ({last})")
}

/// Takes a renewed certificate: its CA is trusted whatever the store says
/// (see `trust::Anchors::of_state`), the endpoint and gossip present it
/// (the endpoint checks that it fits the key), then the state dir keeps it.
fn take(ctx: &RenewalCtx, new: &TlsIdentity) -> anyhow::Result<()> {
    anyhow::ensure!(
        pki::node_id_of(&new.cert_der)? == ctx.id,
        "the manager sent a certificate for another node"
    );
    ctx.trust.set_own_ca(&new.ca_der);
    present(ctx, new)?;
    ctx.keys.save_tls(new)?;
    Ok(())
}

/// Presents `identity` with the chain the trusted CAs call for, to peers
/// and in gossip.
fn present(ctx: &RenewalCtx, identity: &TlsIdentity) -> anyhow::Result<()> {
    ctx.quic.reload(identity)?;
    *lock(&ctx.signing) = signing(identity, &ctx.trust)?;
    ctx.gossip.send(GossipCmd::Rekey);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_is_renewed_half_way_through_its_life() {
        assert_eq!(renew_at(1_000, 3_000), 2_000);
        let day = 86_400_000;
        assert_eq!(renew_at(0, 90 * day), 45 * day);
    }

    #[test]
    fn during_a_ca_rotation_a_node_renews_under_the_new_ca_then_reports_it() {
        let old = pki::new_ca().unwrap();
        let new = pki::new_rotated_ca(&old.0, &old.1).unwrap();
        let id = NodeId(5);
        let under_old = crate::daemon::transport::test_identity(&old, id).cert_der;
        let under_new =
            crate::daemon::transport::test_identity(&(new.cert.clone(), new.key.clone()), id)
                .cert_der;
        let validity = (0, 10_000);
        let rotating = |adopted| {
            Some(Rotating {
                ca_der: &new.cert,
                fingerprint: "fp",
                adopted,
            })
        };
        assert_eq!(
            next(&under_old, validity, 1_000, None),
            Next::Wait(Duration::from_millis(4_000))
        );
        assert_eq!(next(&under_old, validity, 6_000, None), Next::Renew);
        assert_eq!(
            next(&under_old, validity, 1_000, rotating(false)),
            Next::Renew
        );
        assert_eq!(
            next(&under_new, validity, 1_000, rotating(false)),
            Next::Adopt("fp".into())
        );
        assert_eq!(
            next(&under_new, validity, 1_000, rotating(true)),
            Next::Wait(Duration::from_millis(4_000))
        );
    }
}
