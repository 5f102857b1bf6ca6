//! The container engine: containerd, driven through its gRPC API on its
//! Unix socket (`--containerd-socket`). Shoal never starts containerd: when
//! it does not answer, `shoal info` says so (and tasks wait, with that
//! message).

use std::path::{Path, PathBuf};
use std::time::Duration;

use containerd_client::services::v1::version_client::VersionClient;
use containerd_client::tonic::transport::Channel;
use serde::Serialize;

/// Where containerd listens unless configured.
pub const DEFAULT_SOCKET: &str = "/run/containerd/containerd.sock";

/// How long a call to containerd may take before it counts as not
/// answering.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// Why containerd could not be used.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Nothing listens on the socket, or it does not speak containerd's API.
    #[error(
        "containerd does not answer at {socket}: {reason} (start containerd, or point `shoal daemon --containerd-socket` at its socket)"
    )]
    Unreachable {
        /// The socket.
        socket: PathBuf,
        /// What failed.
        reason: String,
    },
    /// No image of that name on this node.
    #[error("no such image on this node: {0} (load it with `shoal image load`)")]
    NoImage(String),
    /// The image of that name here is not the one the service was
    /// created with.
    #[error(
        "image {name} on this node is {have}, not {want} as the service was created with (load that image, or `shoal service update --image`)"
    )]
    OtherImage {
        /// The image's name.
        name: String,
        /// The digest the service runs.
        want: String,
        /// The digest here.
        have: String,
    },
    /// The image could not be pulled.
    #[error(transparent)]
    Pull(#[from] super::registry::PullError),
    /// The spec cannot be made.
    #[error(transparent)]
    Spec(super::oci::SpecError),
    /// The container's process cannot be started (runc's words, made
    /// plain by [`command_error`]).
    #[error("cannot start `{program}`: {reason}")]
    Command {
        /// The program, as the command or entrypoint names it.
        program: String,
        /// Why.
        reason: String,
    },
    /// containerd answered with an error.
    #[error("containerd could not {what}: {code}: {message}")]
    Call {
        /// What Shoal asked.
        what: String,
        /// The gRPC code.
        code: String,
        /// containerd's words.
        message: String,
    },
}

/// containerd as `shoal info` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EngineStatus {
    /// The socket Shoal uses.
    pub socket: PathBuf,
    /// containerd's version, when it answers.
    pub version: Option<String>,
    /// Why it cannot be used, when it does not.
    pub error: Option<String>,
}

/// The handle to containerd: its socket and a connection, made when first
/// needed and made again after a failure.
pub struct Engine {
    socket: PathBuf,
    channel: tokio::sync::Mutex<Option<Channel>>,
    /// Where images are pulled from.
    pub(crate) registries: super::registry::Registries,
    /// Held while an image is pulled.
    pub(super) pulling: tokio::sync::Mutex<()>,
}

impl EngineError {
    /// Whether a task that could not start for this reason should wait and
    /// try again (containerd or the registry away, an image not there yet)
    /// rather than fail.
    pub fn retryable(&self) -> bool {
        use super::registry::PullError as P;
        matches!(
            self,
            EngineError::Unreachable { .. }
                | EngineError::Pull(P::Unreachable { .. } | P::NotFound(_) | P::Denied { .. })
        )
    }
}

impl Engine {
    /// containerd at `socket`; nothing is dialled yet.
    pub fn new(socket: &Path) -> Self {
        Engine {
            socket: socket.to_owned(),
            channel: tokio::sync::Mutex::new(None),
            registries: Default::default(),
            pulling: tokio::sync::Mutex::new(()),
        }
    }

    /// The same, pulling from `registries`.
    pub fn with_registries(mut self, registries: super::registry::Registries) -> Self {
        self.registries = registries;
        self
    }

    fn unreachable(&self, reason: impl ToString) -> EngineError {
        EngineError::Unreachable {
            socket: self.socket.clone(),
            reason: reason.to_string(),
        }
    }

    /// A connection to containerd (the cached one, or a new one).
    pub(crate) async fn channel(&self) -> Result<Channel, EngineError> {
        let mut slot = self.channel.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let connect = containerd_client::connect(&self.socket);
        let channel = tokio::time::timeout(CALL_TIMEOUT, connect)
            .await
            .map_err(|_| self.unreachable("timed out connecting"))?
            .map_err(|e| self.unreachable(source_chain(&e)))?;
        *slot = Some(channel.clone());
        Ok(channel)
    }

    /// Forgets the connection after a failed call, so the next call dials
    /// again (containerd may have restarted).
    async fn reset(&self) {
        *self.channel.lock().await = None;
    }

    /// containerd's version, asked now.
    pub async fn version(&self) -> Result<String, EngineError> {
        let mut client = VersionClient::new(self.channel().await?);
        let reply = match tokio::time::timeout(CALL_TIMEOUT, client.version(())).await {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(status)) => {
                self.reset().await;
                return Err(self.unreachable(format!("{}: {}", status.code(), status.message())));
            }
            Err(_) => {
                self.reset().await;
                return Err(self.unreachable("timed out"));
            }
        };
        Ok(reply.version)
    }

    /// What `shoal info` shows.
    pub async fn status(&self) -> EngineStatus {
        let (version, error) = match self.version().await {
            Ok(v) => (Some(v), None),
            Err(e) => (None, Some(e.to_string())),
        };
        EngineStatus {
            socket: self.socket.clone(),
            version,
            error,
        }
    }
}

/// An error and its causes, on one line (tonic's transport errors say
/// little at the top).
fn source_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        out.push_str(": ");
        out.push_str(&s.to_string());
        next = s.source();
    }
    out
}

/// What runc means when it cannot run a container's program: its message
/// ends `exec: "PROGRAM": WHY: unknown`, deep in containerd's, as
/// [`EngineError::Command`] saying what to fix. `None` for any other
/// error. Pure.
pub fn command_error(message: &str) -> Option<EngineError> {
    let (_, rest) = message.rsplit_once("exec: \"")?;
    let (program, why) = rest.split_once('"')?;
    let reason = if why.contains("executable file not found") || why.contains("no such file") {
        "no such executable in the image (check the command, the entrypoint and the image's PATH)"
    } else if why.contains("permission denied") {
        "not executable (permission denied; check the file's mode in the image)"
    } else {
        return None;
    };
    Some(EngineError::Command {
        program: program.to_owned(),
        reason: reason.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_waits_out_what_may_pass_and_fails_on_what_will_not() {
        use super::super::registry::PullError as P;
        let s = |x: &str| x.to_owned();
        for e in [
            EngineError::Unreachable {
                socket: "/run/x.sock".into(),
                reason: s("refused"),
            },
            EngineError::Pull(P::NotFound(s("lab/x:1"))),
            EngineError::Pull(P::Unreachable {
                registry: s("r:5000"),
                reason: s("timeout"),
            }),
            EngineError::Pull(P::Denied {
                name: s("lab/x:1"),
                reason: s("401"),
            }),
        ] {
            assert!(e.retryable(), "{e}");
        }
        for e in [
            EngineError::NoImage(s("lab/x:1")),
            EngineError::Pull(P::Bad {
                name: s("lab/x:1"),
                reason: s("not an image"),
            }),
        ] {
            assert!(!e.retryable(), "{e}");
        }
    }

    #[tokio::test]
    async fn a_socket_nobody_serves_is_reported_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("containerd.sock");
        let engine = Engine::new(&socket);
        let status = engine.status().await;
        assert_eq!(status.version, None);
        let error = status.error.unwrap();
        assert!(error.contains(&socket.display().to_string()), "{error}");
        assert!(error.contains("--containerd-socket"), "{error}");
        // A socket that is not containerd's: refused as well, and named.
        let _listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let status = engine.status().await;
        assert!(status.error.is_some());
    }
}
