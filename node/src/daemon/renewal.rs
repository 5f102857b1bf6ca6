//! Certificate renewal: every node renews its certificate at half its
//! validity, with a fresh key, over a CSR to a manager (`RenewCert`), and
//! takes the new one without a restart: new connections present it, open
//! ones go on, and gossip signs this node's entries again with the new key.
//! The loop sleeps until the renewal is due (waking at least hourly to look
//! again); an idle node does nothing else.

use std::sync::Arc;
use std::time::Duration;

use shoal_mesh::wire::{CtlReply, CtlRequest};
use shoal_mesh::{NodeId, Role};
use shoal_raft::StateHandle;

use super::clock::now_ms;
use super::entry_keys::{SigningHandle, signing};
use super::gossip::{GossipCmd, GossipHandle};
use super::identity::{Identity, StateDir};
use super::pki;
use super::poison::lock;
use super::transport::{Quic, TlsIdentity};
use super::writer::Writer;

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
    /// The store: who the managers are.
    pub state: StateHandle,
    /// Control calls to managers.
    pub writer: Writer,
    /// The endpoint whose certificate is replaced.
    pub quic: Arc<Quic>,
    /// Gossip's signing pair, replaced too.
    pub signing: SigningHandle,
    /// Told to sign this node's entries again.
    pub gossip: GossipHandle,
    /// Where the certificate and key are kept.
    pub dir: StateDir,
}

/// When a certificate valid from `from_ms` until `until_ms` is renewed:
/// half-way. Pure.
pub fn renew_at(from_ms: i64, until_ms: i64) -> i64 {
    from_ms + (until_ms - from_ms) / 2
}

/// Runs until the task is aborted.
pub async fn run(ctx: RenewalCtx) {
    loop {
        let wait = match due_in(&ctx.dir) {
            Ok(Some(wait)) => wait,
            Ok(None) => match renew(&ctx).await {
                Ok(until) => {
                    tracing::info!(expires_at_ms = until, "renewed this node's certificate");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "certificate renewal failed; retrying");
                    RETRY
                }
            },
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot read this node's certificate");
                RETRY
            }
        };
        tokio::time::sleep(wait.min(MAX_SLEEP)).await;
    }
}

/// How long until this node's certificate is due for renewal (`None`: now).
fn due_in(dir: &StateDir) -> anyhow::Result<Option<Duration>> {
    let identity = dir
        .load()?
        .ok_or_else(|| anyhow::anyhow!("no identity in the state dir"))?;
    let (from, until) = pki::validity_ms(&identity.tls.cert_der)?;
    let left = renew_at(from, until) - now_ms() as i64;
    Ok((left > 0).then(|| Duration::from_millis(left as u64)))
}

/// Renews through the leader, else any other manager; takes the new
/// certificate; its expiry.
async fn renew(ctx: &RenewalCtx) -> anyhow::Result<i64> {
    let identity: Identity = ctx
        .dir
        .load()?
        .ok_or_else(|| anyhow::anyhow!("no identity in the state dir"))?;
    let (key_der, csr_der) = pki::new_key_and_csr()?;
    let mut managers: Vec<NodeId> = ctx.state.read(|d| {
        d.state
            .nodes
            .values()
            .filter(|n| n.role == Role::Manager)
            .map(|n| n.id)
            .collect()
    });
    if let Some(l) = ctx.writer.leader() {
        managers.retain(|m| *m != l);
        managers.insert(0, l);
    }
    let req = CtlRequest::RenewCert { csr_der };
    let mut last = String::from("no manager known");
    for m in managers {
        match ctx.writer.ctl(m, &req, CALL_TIMEOUT).await {
            Ok(CtlReply::Cert(cert_der)) => {
                return take(ctx, identity.tls, cert_der, key_der);
            }
            Ok(CtlReply::Refused(msg)) => last = format!("node {m}: {msg}"),
            Ok(other) => last = format!("node {m}: unexpected reply {other:?}"),
            Err(e) => last = format!("node {m}: {e:#}"),
        }
    }
    anyhow::bail!("no manager renewed the certificate ({last})")
}

/// Takes a renewed certificate: the endpoint first (which checks that it
/// fits the key), then gossip's signing pair, then the state dir.
fn take(
    ctx: &RenewalCtx,
    old: TlsIdentity,
    cert_der: Vec<u8>,
    key_der: Vec<u8>,
) -> anyhow::Result<i64> {
    anyhow::ensure!(
        pki::node_id_of(&cert_der)? == ctx.id,
        "the manager sent a certificate for another node"
    );
    let until = pki::expires_at_ms(&cert_der)?;
    let new = TlsIdentity {
        ca_der: old.ca_der,
        cert_der,
        key_der,
    };
    ctx.quic.reload(&new)?;
    *lock(&ctx.signing) = signing(&new)?;
    ctx.dir.save_tls(&new.cert_der, &new.key_der)?;
    ctx.gossip.send(GossipCmd::Rekey);
    Ok(until)
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
}
