//! Which [`ErrorKind`] a failed request is, from the error's chain: the
//! handlers' own [`ApiError`]s, the store's refusals and the write path's.

use shoal_mesh::network::NetworkError;
use shoal_mesh::service::ServiceError;
use shoal_mesh::{ApplyError, ResolveError};

use super::writer::WriteError;
use crate::api::{ApiError, ErrorKind};

/// The kind of the first error in `e`'s chain that has one; `Internal`
/// when none does.
pub fn kind_of(e: &anyhow::Error) -> ErrorKind {
    e.chain()
        .find_map(|cause| {
            if let Some(a) = cause.downcast_ref::<ApiError>() {
                Some(a.kind)
            } else if let Some(w) = cause.downcast_ref::<WriteError>() {
                Some(match w {
                    WriteError::Refused(a) => applied(a),
                    WriteError::NoQuorum { .. } | WriteError::NotConfirmed { .. } => {
                        ErrorKind::Unavailable
                    }
                    WriteError::QuotaExceeded { .. } => ErrorKind::Conflict,
                    WriteError::Other(_) => ErrorKind::Internal,
                })
            } else if let Some(a) = cause.downcast_ref::<ApplyError>() {
                Some(applied(a))
            } else if let Some(r) = cause.downcast_ref::<ResolveError>() {
                Some(match r {
                    ResolveError::NotFound(_) => ErrorKind::NotFound,
                    ResolveError::Ambiguous { .. } => ErrorKind::Invalid,
                })
            } else {
                cause.downcast_ref::<NetworkError>().map(network)
            }
        })
        .unwrap_or(ErrorKind::Internal)
}

fn applied(e: &ApplyError) -> ErrorKind {
    match e {
        ApplyError::NotInitialized => ErrorKind::NotInSwarm,
        ApplyError::UnknownNode(_)
        | ApplyError::NoSuchNetwork(_)
        | ApplyError::NoSuchService(_)
        | ApplyError::NoSuchTask(_)
        | ApplyError::NoSuchLabel { .. } => ErrorKind::NotFound,
        ApplyError::EmptyLabelKey | ApplyError::OutOfBounds(_) => ErrorKind::Invalid,
        ApplyError::Network(n) => network(n),
        ApplyError::Service(s) => match s {
            ServiceError::BadName(_) | ServiceError::Invalid(_) => ErrorKind::Invalid,
            ServiceError::NoSuchNetwork(_) => ErrorKind::NotFound,
            ServiceError::Exists(_) | ServiceError::Alloc(_) => ErrorKind::Conflict,
        },
        _ => ErrorKind::Conflict,
    }
}

fn network(e: &NetworkError) -> ErrorKind {
    match e {
        NetworkError::BadName(_)
        | NetworkError::BadAddress(_)
        | NetworkError::BadOption(_)
        | NetworkError::Unsupported(_) => ErrorKind::Invalid,
        NetworkError::Exists(_)
        | NetworkError::Overlap { .. }
        | NetworkError::VniInUse { .. }
        | NetworkError::Exhausted(_) => ErrorKind::Conflict,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_mesh::NodeId;

    #[test]
    fn failures_get_the_kind_of_their_cause() {
        let e = anyhow::Error::from(WriteError::NoQuorum {
            reachable: 1,
            total: 3,
        });
        assert_eq!(kind_of(&e), ErrorKind::Unavailable);
        let e = anyhow::Error::from(WriteError::Refused(ApplyError::LastManager(NodeId(1))));
        assert_eq!(kind_of(&e), ErrorKind::Conflict);
        let e = anyhow::Error::from(WriteError::Refused(ApplyError::NoSuchService("x".into())));
        assert_eq!(kind_of(&e), ErrorKind::NotFound);
        let e = anyhow::Error::from(NetworkError::Unsupported("ipvlan".into()));
        assert_eq!(kind_of(&e), ErrorKind::Invalid);
        // A handler's own kind survives context added on the way out.
        let e = ApiError::not_in_swarm("not in a swarm").context("swarm leave");
        assert_eq!(kind_of(&e), ErrorKind::NotInSwarm);
        assert_eq!(kind_of(&anyhow::anyhow!("disk full")), ErrorKind::Internal);
    }
}
