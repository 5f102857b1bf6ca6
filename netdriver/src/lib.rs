//! The data plane: from a node's plan (`shoal_mesh::plan`) to kernel
//! objects, through a backend.
//!
//! ```text
//!  NodePlan ──render──► Kernel (wanted) ─┐
//!                                        ├─ diff ─► [Op] ─► Backend::apply
//!  Backend::observe ──► Kernel (actual) ─┘
//! ```
//!
//! Backends: [`linux::Linux`] (rtnetlink, named network namespaces) and
//! [`recording::Recording`] (in memory, for tests). [`reconcile`] applies
//! the smallest change and is idempotent; since it diffs against what the
//! kernel really holds, it adopts or removes leftovers of a crash and puts
//! back what something else removed.

pub mod conformance;
pub mod ctnl;
pub mod dns;
pub mod linux;
pub mod listeners;
pub mod model;
pub mod nfnl;
pub mod nft;
pub mod privilege;
pub mod recording;
pub mod render;

use model::{Kernel, Op, diff};

/// A data-plane failure, with what failed and the underlying error kept
/// (not flattened into text), so a caller can tell kinds apart and a log
/// shows the whole chain.
#[derive(Debug, thiserror::Error)]
pub enum DpError {
    /// One operation of a reconcile failed; `cause` says why.
    #[error("{op}: {cause}")]
    Op {
        /// The operation.
        op: Box<Op>,
        /// Why it failed.
        #[source]
        cause: Box<DpError>,
    },
    /// A netlink request failed or was refused.
    #[error("{what}: {source}")]
    Netlink {
        /// What was asked.
        what: String,
        /// What netlink said.
        #[source]
        source: rtnetlink::Error,
    },
    /// A file or a process (a namespace file, `nft`, a sysctl) failed.
    #[error("{what}: {source}")]
    Io {
        /// What was tried.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A system call (namespaces, mounts, netfilter sockets) failed.
    #[error("{what}: {source}")]
    Sys {
        /// What was tried.
        what: String,
        /// The error number.
        #[source]
        source: nix::Error,
    },
    /// `nft` refused a script or a listing.
    #[error("nft: {stderr}")]
    Nft {
        /// What it printed.
        stderr: String,
    },
    /// nf_tables refused a netlink batch, or answered what cannot be read.
    #[error("nf_tables netlink: {0}")]
    Nfnl(String),
    /// Something the operation needs is not there (a link, a bridge).
    #[error("{0}")]
    Missing(String),
    /// The kernel, or the recording backend that models it, refuses.
    #[error("{0}")]
    Refused(String),
    /// The thread that entered a namespace died.
    #[error("the thread working in a network namespace panicked")]
    Panicked,
}

/// Where kernel objects are read and changed.
pub trait Backend {
    /// Every Shoal-owned object: namespaces starting with `prefix` and the
    /// host namespace's `shoal…` links.
    fn observe(
        &mut self,
        prefix: &str,
    ) -> impl std::future::Future<Output = Result<Kernel, DpError>> + Send;
    /// Applies one change.
    fn apply(&mut self, op: &Op) -> impl std::future::Future<Output = Result<(), DpError>> + Send;
    /// The MTU of the underlay interface that holds `ip`, when known
    /// (overlays are 50 bytes less); `None` lets the caller assume 1500.
    fn underlay_mtu(
        &mut self,
        ip: std::net::Ipv4Addr,
    ) -> impl std::future::Future<Output = Option<u32>> + Send {
        let _ = ip;
        async { None }
    }
}

/// Brings the kernel to `wanted`: observes, diffs, applies. Returns the
/// operations applied (none when already there). The first failure stops
/// it; the next call starts over from what the kernel then holds.
pub async fn reconcile<B: Backend>(
    backend: &mut B,
    wanted: &Kernel,
    prefix: &str,
) -> Result<Vec<Op>, DpError> {
    let actual = backend.observe(prefix).await?;
    let ops = diff(&actual, wanted, prefix);
    for op in &ops {
        backend.apply(op).await?;
    }
    Ok(ops)
}
