//! The API's side of autolock: `swarm unlock` on a locked manager, `swarm
//! unlock-key [--rotate]` and `swarm update --autolock` (see `autolock`
//! for what each manager does with the store's unlock key).

use std::time::Duration;

use shoal_mesh::Command;

use super::agent::{Daemon, NOT_IN_SWARM};
use super::autolock::{BadUnlockKey, UnlockKey, Wanted, wanted};
use super::identity::IdentityError;
use super::member::Member;
use super::pki;
use crate::api::{ApiError, Reply};
use crate::views::UnlockKeyView;

/// The message for every request a locked daemon refuses.
pub const LOCKED: &str = "this manager is locked: its keys are sealed under the swarm's unlock key. Run `shoal swarm unlock` and enter the key (`shoal swarm unlock-key` on another manager shows it)";

/// `swarm unlock`: opens the sealed keys with `key` and starts the member.
pub async fn unlock(d: &Daemon, key: &str) -> anyhow::Result<Reply> {
    let mut slot = d.member.lock().await;
    if !d.is_locked() {
        return Err(ApiError::conflict(if slot.is_some() {
            "this node is not locked"
        } else {
            NOT_IN_SWARM
        }));
    }
    let key: UnlockKey = key
        .parse()
        .map_err(|e: BadUnlockKey| ApiError::invalid(e.to_string()))?;
    let identity = match d.dir.open(Some(&key.0)) {
        Ok(Some(id)) => id,
        Ok(None) => return Err(ApiError::not_in_swarm(NOT_IN_SWARM)),
        Err(e @ IdentityError::WrongUnlockKey) => return Err(ApiError::invalid(e.to_string())),
        Err(e) => return Err(e.into()),
    };
    let id = identity.node.node_id;
    let m = d.start_member(identity).await?;
    *slot = Some(m);
    d.set_locked(false);
    tracing::info!(node = %id, "unlocked; rejoined the swarm from saved state");
    Reply::of(&crate::views::Done {
        node_id: id.to_string(),
        message: "Swarm unlocked.".into(),
    })
}

/// The unlock key as the store holds it, opened with the managers' key.
fn current_key(m: &Member) -> anyhow::Result<Option<UnlockKey>> {
    let key = manager_key(m)?;
    let state = m.state.state();
    match wanted(&state, m.id, Some(&key)) {
        Wanted::Sealed(k) => Ok(Some(k)),
        Wanted::Clear => Ok(None),
        Wanted::Unknown => Err(anyhow::anyhow!(
            "the store's unlock key does not open with this manager's key"
        )),
    }
}

fn manager_key(m: &Member) -> anyhow::Result<[u8; 32]> {
    m.manager_key().ok_or_else(|| {
        ApiError::unavailable(
            "this manager has not received the managers' key yet; try again in a moment",
        )
    })
}

/// Turns autolock on with `key` (or off with `None`), and waits until this
/// manager's copy of the store has it, so its own keys are sealed next.
async fn propose(m: &Member, key: Option<UnlockKey>) -> anyhow::Result<()> {
    let sealed = match key {
        Some(k) => Some(pki::seal(&manager_key(m)?, &k.0)),
        None => None,
    };
    let want = sealed.clone();
    m.propose(Command::SetAutolock {
        sealed_unlock_key: sealed,
    })
    .await?;
    m.wait_for(Duration::from_secs(5), |s| s.autolock == want)
        .await;
    Ok(())
}

/// `swarm unlock-key [--rotate]`.
pub async fn unlock_key(d: &Daemon, rotate: bool) -> anyhow::Result<Reply> {
    let m = d.member().await?;
    let Some(old) = current_key(&m)? else {
        return Err(ApiError::conflict(
            "autolock is not on for this swarm, so there is no unlock key: turn it on with `shoal swarm update --autolock=true`",
        ));
    };
    let key = if rotate {
        let new = UnlockKey::random();
        propose(&m, Some(new)).await?;
        new
    } else {
        old
    };
    Reply::of(&UnlockKeyView {
        unlock_key: key.to_string(),
        rotated: rotate,
    })
}

/// `swarm update --autolock=BOOL`: the unlock key when it is on.
pub async fn set(m: &Member, on: bool) -> anyhow::Result<Option<UnlockKey>> {
    match (current_key(m)?, on) {
        (Some(k), true) => Ok(Some(k)),
        (None, false) => Ok(None),
        (None, true) => {
            let key = UnlockKey::random();
            propose(m, Some(key)).await?;
            Ok(Some(key))
        }
        (Some(_), false) => {
            propose(m, None).await?;
            Ok(None)
        }
    }
}
