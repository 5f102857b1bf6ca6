//! Autolock, as in Docker Swarm: a manager's keys (its node key, the
//! managers' key, the Raft data's key) are sealed at rest under the swarm's
//! unlock key, so a
//! stolen disk or a restarted manager yields nothing until someone gives
//! the key (`swarm unlock`).
//!
//! The store holds the unlock key sealed with the managers' key
//! (`ClusterState::autolock`, set by `swarm init --autolock`, `swarm update
//! --autolock`, `swarm unlock-key --rotate`). Every manager's loop here
//! opens it and seals its own secrets under it, or keeps them in the clear
//! when autolock is off; workers are never locked. A manager that restarts
//! with sealed secrets starts locked (the daemon answers "locked" to all
//! but `info`, `swarm unlock` and `swarm leave --force`; see `unlock`).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use shoal_mesh::{ClusterState, NodeId, Role};
use shoal_raft::StateHandle;

use super::identity::Secrets;
use super::pki;

/// How an unlock key is written: `SWMKEY-1-` and 64 hex digits.
const PREFIX: &str = "SWMKEY-1-";

/// The swarm's unlock key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct UnlockKey(pub [u8; 32]);

impl UnlockKey {
    /// A fresh random key.
    pub fn random() -> Self {
        UnlockKey(rand::random())
    }
}

impl fmt::Display for UnlockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}", shoal_mesh::ids::to_hex(&self.0))
    }
}

impl fmt::Debug for UnlockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("UnlockKey(…)")
    }
}

/// Why a string is not an unlock key.
#[derive(Debug, thiserror::Error)]
#[error(
    "malformed unlock key: expected SWMKEY-1- followed by 64 hex digits, as `shoal swarm unlock-key` prints it"
)]
pub struct BadUnlockKey;

impl FromStr for UnlockKey {
    type Err = BadUnlockKey;

    fn from_str(s: &str) -> Result<Self, BadUnlockKey> {
        let hex = s.trim().strip_prefix(PREFIX).ok_or(BadUnlockKey)?;
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(BadUnlockKey);
        }
        let mut key = [0u8; 32];
        for (i, byte) in key.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| BadUnlockKey)?;
        }
        Ok(UnlockKey(key))
    }
}

/// How a node's secrets should be kept, from the store's view.
#[derive(Debug, PartialEq, Eq)]
pub enum Wanted {
    /// In the clear: autolock is off, or the node is not a manager.
    Clear,
    /// Sealed under this key.
    Sealed(UnlockKey),
    /// Cannot tell yet (no managers' key to open the store's copy): leave
    /// them as they are.
    Unknown,
}

/// What autolock asks of node `me` in `state`, holding `manager_key`. Pure.
pub fn wanted(state: &ClusterState, me: NodeId, manager_key: Option<&[u8; 32]>) -> Wanted {
    let is_manager = state.nodes.get(&me).map(|n| n.role) == Some(Role::Manager);
    match (&state.autolock, is_manager, manager_key) {
        (None, _, _) | (Some(_), false, _) => Wanted::Clear,
        (Some(_), true, None) => Wanted::Unknown,
        (Some(sealed), true, Some(k)) => match pki::unseal(k, sealed)
            .ok()
            .and_then(|plain| <[u8; 32]>::try_from(plain.as_slice()).ok())
        {
            Some(key) => Wanted::Sealed(UnlockKey(key)),
            None => Wanted::Unknown,
        },
    }
}

/// The unlock key to switch to, if `wanted` differs from `current`. Pure.
pub fn change(wanted: &Wanted, current: Option<[u8; 32]>) -> Option<Option<[u8; 32]>> {
    match (wanted, current) {
        (Wanted::Clear, Some(_)) => Some(None),
        (Wanted::Sealed(k), current) if current != Some(k.0) => Some(Some(k.0)),
        _ => None,
    }
}

/// What the autolock loop uses.
pub struct AutolockCtx {
    /// This node.
    pub id: NodeId,
    /// The store: the sealed unlock key, this node's role.
    pub state: StateHandle,
    /// The secrets it seals or unseals.
    pub keys: Arc<Secrets>,
}

/// How long a failed write of the secrets waits before the next try.
const RETRY: Duration = Duration::from_secs(2);

/// Keeps this node's secrets as the store says, on every change of the
/// store or of the managers' key. Runs until aborted.
pub async fn run(ctx: AutolockCtx) {
    let mut store = ctx.state.changes();
    let mut keys = ctx.keys.changes();
    loop {
        let want = ctx
            .state
            .read(|s| wanted(&s.state, ctx.id, ctx.keys.get().as_ref()));
        if let Some(new) = change(&want, ctx.keys.unlock_key()) {
            match ctx.keys.set_unlock_key(new) {
                Ok(()) if new.is_some() => {
                    tracing::info!("this manager's keys are now sealed under the unlock key")
                }
                Ok(()) => {
                    tracing::info!("this node's keys are now kept in the clear (autolock off)")
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot write this node's keys as autolock asks; retrying");
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
            }
        }
        tokio::select! {
            r = store.changed() => if r.is_err() { return },
            r = keys.changed() => if r.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_mesh::fixtures;

    #[test]
    fn an_unlock_key_reads_back_as_written_and_nothing_else_reads() {
        let k = UnlockKey::random();
        let text = k.to_string();
        assert!(text.starts_with("SWMKEY-1-") && text.len() == 9 + 64);
        assert_eq!(text.parse::<UnlockKey>().unwrap(), k);
        assert_eq!(format!(" {text}\n").parse::<UnlockKey>().unwrap(), k);
        for bad in [
            "",
            "SWMKEY-1-",
            &text[9..],
            &text[..text.len() - 1],
            &format!("{text}0"),
            &text.replace("SWMKEY-1-", "SWMTKN-1-"),
            &format!("SWMKEY-1-{}", "g".repeat(64)),
            &format!("SWMKEY-1-{}", "é".repeat(32)),
        ] {
            assert!(bad.parse::<UnlockKey>().is_err(), "{bad:?}");
        }
        assert!(!format!("{k:?}").contains(&text[9..]));
    }

    #[test]
    fn managers_seal_under_the_stores_key_and_workers_never() {
        let mut state = ClusterState::default();
        for (id, role) in [(1, Role::Manager), (2, Role::Worker)] {
            let n = shoal_mesh::Node {
                role,
                ..fixtures::node(id)
            };
            state.nodes.insert(n.id, n);
        }
        let mk = [3u8; 32];
        let key = UnlockKey([9u8; 32]);
        assert_eq!(wanted(&state, NodeId(1), Some(&mk)), Wanted::Clear);
        state.autolock = Some(pki::seal(&mk, &key.0));
        assert_eq!(wanted(&state, NodeId(1), Some(&mk)), Wanted::Sealed(key));
        assert_eq!(wanted(&state, NodeId(1), None), Wanted::Unknown);
        assert_eq!(wanted(&state, NodeId(1), Some(&[4u8; 32])), Wanted::Unknown);
        assert_eq!(wanted(&state, NodeId(2), Some(&mk)), Wanted::Clear);
        assert_eq!(wanted(&state, NodeId(7), Some(&mk)), Wanted::Clear);

        assert_eq!(change(&Wanted::Sealed(key), None), Some(Some(key.0)));
        assert_eq!(change(&Wanted::Sealed(key), Some(key.0)), None);
        assert_eq!(
            change(&Wanted::Sealed(key), Some([1; 32])),
            Some(Some(key.0))
        );
        assert_eq!(change(&Wanted::Clear, Some(key.0)), Some(None));
        assert_eq!(change(&Wanted::Clear, None), None);
        assert_eq!(change(&Wanted::Unknown, Some(key.0)), None);
        assert_eq!(change(&Wanted::Unknown, None), None);
    }
}
