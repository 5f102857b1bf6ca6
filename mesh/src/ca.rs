//! The store's side of the cluster CA's lifecycle and of autolock: a CA
//! rotation in progress, which CAs nodes trust, and the handlers `apply`
//! runs for `swarm ca --rotate` and `swarm update --autolock`.
//!
//! A rotation goes: a manager makes a new CA, and a cross-signed copy of it
//! under the old CA's key, and proposes [`Command::StartCaRotation`]; from
//! then on every node trusts both CAs and managers sign under the new one;
//! every node renews its certificate and reports it
//! ([`Command::AdoptCa`]); once every node has, the leader proposes
//! [`Command::FinishCaRotation`], and the old CA is trusted no more.
//!
//! [`Command::StartCaRotation`]: crate::Command::StartCaRotation
//! [`Command::AdoptCa`]: crate::Command::AdoptCa
//! [`Command::FinishCaRotation`]: crate::Command::FinishCaRotation

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::apply::{ApplyError, Outcome};
use crate::bounds::OutOfBounds;
use crate::{ClusterState, NodeId};

/// Largest certificate (DER) the store takes.
pub const MAX_CERT: usize = 16 << 10;
/// Largest sealed secret (a CA key, an unlock key) the store takes.
pub const MAX_SEALED: usize = 4 << 10;

/// A CA rotation in progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaRotation {
    /// The new CA's certificate (DER).
    pub ca_cert_der: Vec<u8>,
    /// Its SHA-256 fingerprint, lowercase hex.
    pub ca_fingerprint: String,
    /// Its key, sealed with the managers' key.
    pub sealed_ca_key: Vec<u8>,
    /// The new CA's certificate signed by the old CA's key: sent after a
    /// certificate under the new CA, so that a node that trusts only the
    /// old CA still takes it.
    pub cross_cert_der: Vec<u8>,
    /// Milliseconds since the Unix epoch when it started.
    pub started_at_ms: u64,
    /// The nodes that have reported a certificate under the new CA.
    pub adopted: BTreeSet<NodeId>,
}

impl ClusterState {
    /// The CAs whose certificates nodes take (DER): the cluster's, and
    /// during a rotation the new one too. Empty before `swarm init`.
    pub fn trusted_cas(&self) -> Vec<&[u8]> {
        let mut cas: Vec<&[u8]> = self
            .cluster
            .iter()
            .map(|c| c.ca_cert_der.as_slice())
            .collect();
        if let Some(r) = &self.ca_rotation {
            cas.push(&r.ca_cert_der);
        }
        cas
    }

    /// The nodes a rotation still waits for (none when no rotation runs).
    pub fn ca_rotation_pending(&self) -> Vec<NodeId> {
        match &self.ca_rotation {
            None => Vec::new(),
            Some(r) => self
                .nodes
                .keys()
                .filter(|n| !r.adopted.contains(n))
                .copied()
                .collect(),
        }
    }
}

/// Why a CA rotation command was refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum CaError {
    /// `swarm ca --rotate` while one is running.
    #[error(
        "a CA rotation is already in progress: {pending} node(s) still have no certificate under the new CA (see `shoal swarm ca`); a node that is down holds it up until it is back or removed with `shoal node rm`"
    )]
    InProgress {
        /// How many nodes it waits for.
        pending: usize,
    },
    /// A report or finish for a rotation that is not the one running.
    #[error("no CA rotation to CA {0} is in progress")]
    NotRotating(String),
    /// A finish while nodes have not adopted the new CA.
    #[error("the CA rotation still waits for node(s) {0}")]
    Waiting(String),
}

fn check_bytes(what: &str, bytes: &[u8], max: usize) -> Result<(), OutOfBounds> {
    if bytes.is_empty() || bytes.len() > max {
        return Err(OutOfBounds {
            what: what.into(),
            problem: format!("{} bytes, expected 1 to {max}", bytes.len()),
        });
    }
    Ok(())
}

/// Checks a CA fingerprint's form: 64 lowercase hex digits.
pub fn check_fingerprint(fingerprint: &str) -> Result<(), OutOfBounds> {
    let ok = fingerprint.len() == 64
        && fingerprint
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !ok {
        return Err(OutOfBounds {
            what: "CA fingerprint".into(),
            problem: "expected 64 lowercase hex digits".into(),
        });
    }
    Ok(())
}

/// `swarm ca --rotate`.
pub(crate) fn start_rotation(
    state: &mut ClusterState,
    rotation: &CaRotation,
) -> Result<Outcome, ApplyError> {
    check_bytes("CA certificate", &rotation.ca_cert_der, MAX_CERT)?;
    check_bytes(
        "cross-signed CA certificate",
        &rotation.cross_cert_der,
        MAX_CERT,
    )?;
    check_bytes("sealed CA key", &rotation.sealed_ca_key, MAX_SEALED)?;
    check_fingerprint(&rotation.ca_fingerprint)?;
    if state.ca_rotation.is_some() {
        let pending = state.ca_rotation_pending().len();
        return Err(CaError::InProgress { pending }.into());
    }
    let mut rotation = rotation.clone();
    rotation.adopted.clear();
    state.ca_rotation = Some(rotation);
    Ok(Outcome::Done)
}

/// Node `node` holds a certificate under the rotation's new CA.
pub(crate) fn adopt(
    state: &mut ClusterState,
    node: NodeId,
    fingerprint: &str,
) -> Result<Outcome, ApplyError> {
    check_fingerprint(fingerprint)?;
    if !state.nodes.contains_key(&node) {
        return Err(ApplyError::UnknownNode(node));
    }
    match &mut state.ca_rotation {
        Some(r) if r.ca_fingerprint == fingerprint => {
            r.adopted.insert(node);
            Ok(Outcome::Done)
        }
        _ => Err(CaError::NotRotating(fingerprint.to_owned()).into()),
    }
}

/// Every node has adopted the new CA: it becomes the cluster's, the old
/// one is trusted no more (and join tokens name the new one).
pub(crate) fn finish_rotation(
    state: &mut ClusterState,
    fingerprint: &str,
) -> Result<Outcome, ApplyError> {
    check_fingerprint(fingerprint)?;
    match &state.ca_rotation {
        Some(r) if r.ca_fingerprint == fingerprint => {}
        _ => return Err(CaError::NotRotating(fingerprint.to_owned()).into()),
    }
    let pending = state.ca_rotation_pending();
    if !pending.is_empty() {
        let names: Vec<String> = pending.iter().map(|n| n.to_string()).collect();
        return Err(CaError::Waiting(names.join(", ")).into());
    }
    let (Some(r), Some(cluster)) = (state.ca_rotation.take(), state.cluster.as_mut()) else {
        return Err(ApplyError::NotInitialized);
    };
    cluster.ca_cert_der = r.ca_cert_der;
    cluster.ca_fingerprint = r.ca_fingerprint;
    cluster.sealed_ca_key = r.sealed_ca_key;
    Ok(Outcome::Done)
}

/// The leader's part in a rotation: once every node has adopted the new
/// CA, finish it. Pure.
pub fn finish_when_adopted(state: &ClusterState) -> Option<crate::Command> {
    let r = state.ca_rotation.as_ref()?;
    state
        .ca_rotation_pending()
        .is_empty()
        .then(|| crate::Command::FinishCaRotation {
            fingerprint: r.ca_fingerprint.clone(),
        })
}

/// `swarm update --autolock`: the unlock key, sealed with the managers'
/// key (`None`: autolock off).
pub(crate) fn set_autolock(
    state: &mut ClusterState,
    sealed_unlock_key: &Option<Vec<u8>>,
) -> Result<Outcome, ApplyError> {
    if let Some(sealed) = sealed_unlock_key {
        check_bytes("sealed unlock key", sealed, MAX_SEALED)?;
    }
    state.autolock.clone_from(sealed_unlock_key);
    Ok(Outcome::Done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Command;
    use crate::apply::apply;
    use crate::test_support::swarm;

    fn rotation(tag: u8) -> CaRotation {
        CaRotation {
            ca_cert_der: vec![tag; 300],
            ca_fingerprint: format!("{tag:02x}").repeat(32),
            sealed_ca_key: vec![tag; 60],
            cross_cert_der: vec![tag; 310],
            started_at_ms: 1,
            adopted: [NodeId(99)].into(),
        }
    }

    #[test]
    fn a_rotation_finishes_once_every_node_has_adopted_the_new_ca() {
        let mut s = swarm(2);
        let old = s.cluster.clone().unwrap();
        assert_eq!(s.trusted_cas(), vec![old.ca_cert_der.as_slice()]);
        let r = rotation(0xab);
        apply(&mut s, &Command::StartCaRotation(r.clone())).unwrap();
        // What the proposer says was adopted is ignored.
        assert_eq!(s.ca_rotation_pending(), vec![NodeId(1), NodeId(2)]);
        assert_eq!(s.trusted_cas().len(), 2);
        // A second rotation waits for the first.
        let again = apply(&mut s, &Command::StartCaRotation(rotation(0xcd)));
        assert!(matches!(
            again,
            Err(ApplyError::Ca(CaError::InProgress { pending: 2 }))
        ));
        let adopt = |s: &mut ClusterState, n: u64, fp: &str| {
            apply(
                s,
                &Command::AdoptCa {
                    node: NodeId(n),
                    fingerprint: fp.into(),
                },
            )
        };
        assert!(adopt(&mut s, 1, &"00".repeat(32)).is_err(), "another CA");
        assert!(adopt(&mut s, 7, &r.ca_fingerprint).is_err(), "no such node");
        adopt(&mut s, 1, &r.ca_fingerprint).unwrap();
        assert_eq!(finish_when_adopted(&s), None);
        let finish = Command::FinishCaRotation {
            fingerprint: r.ca_fingerprint.clone(),
        };
        let early = apply(&mut s, &finish).unwrap_err();
        assert!(
            early.to_string().contains(&NodeId(2).to_string()),
            "{early}"
        );
        // A removed node is not waited for.
        apply(&mut s, &Command::RemoveNode(NodeId(2))).unwrap();
        assert_eq!(finish_when_adopted(&s), Some(finish.clone()));
        apply(&mut s, &finish).unwrap();
        assert_eq!(finish_when_adopted(&s), None);
        let now = s.cluster.clone().unwrap();
        assert_eq!(now.ca_cert_der, r.ca_cert_der);
        assert_eq!(now.ca_fingerprint, r.ca_fingerprint);
        assert_eq!(now.sealed_ca_key, r.sealed_ca_key);
        assert_eq!(now.tokens, old.tokens);
        assert_eq!(s.trusted_cas(), vec![r.ca_cert_der.as_slice()]);
        assert!(s.ca_rotation.is_none());
        assert!(apply(&mut s, &finish).is_err(), "finished already");
    }

    #[test]
    fn rotation_values_are_bounded() {
        let mut s = swarm(1);
        let mut big = rotation(1);
        big.cross_cert_der = vec![0; MAX_CERT + 1];
        assert!(matches!(
            apply(&mut s, &Command::StartCaRotation(big)),
            Err(ApplyError::OutOfBounds(_))
        ));
        let mut bad = rotation(1);
        bad.ca_fingerprint = "ZZ".repeat(32);
        assert!(apply(&mut s, &Command::StartCaRotation(bad)).is_err());
        let long = Command::AdoptCa {
            node: NodeId(1),
            fingerprint: "a".repeat(1 << 20),
        };
        assert!(matches!(
            apply(&mut s, &long),
            Err(ApplyError::OutOfBounds(_))
        ));
        let huge = Command::SetAutolock {
            sealed_unlock_key: Some(vec![0; MAX_SEALED + 1]),
        };
        assert!(apply(&mut s, &huge).is_err());
        assert_eq!(s, swarm(1));
    }
}
