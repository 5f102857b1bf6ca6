//! Tasks as containers: the thin driver between the executor and
//! containerd (`containers.rs`). A task's container is named by the task's
//! ID and labelled with it; its output is appended to the task's log file,
//! as a host program's is. One watcher per task waits on containerd for its
//! end (no polling); containerd's shims keep containers running while the
//! daemon is stopped, so a restarted daemon adopts a task by waiting on it
//! again.

use std::collections::{BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shoal_mesh::TaskId;
use shoal_mesh::service::{ContainerSpec, HealthCheck, Service};
use shoal_mesh::task::TaskState;

use super::decide::Exit;
use crate::daemon::containers::{NewContainer, write_etc_files};
use crate::daemon::engine::{Engine, EngineError};
use crate::daemon::oci::{EtcFiles, Limits, TaskRun};

/// The label that names a container's task.
pub const TASK_LABEL: &str = "shoal.task.id";

/// SIGKILL's number.
const SIGKILL: u32 = 9;

/// A container task the executor watches: how it ended, once it has, and
/// its health probe, if it has a check.
pub struct Watched {
    exit: Arc<Mutex<Option<Exit>>>,
    waiter: tokio::task::JoinHandle<()>,
    /// The health probe.
    pub probe: Option<tokio::task::JoinHandle<()>>,
}

impl Watched {
    /// How the task ended, if it has.
    pub fn ended(&self) -> Option<Exit> {
        self.exit.lock().ok().and_then(|e| e.clone())
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.waiter.abort();
        if let Some(p) = &self.probe {
            p.abort();
        }
    }
}

/// The cgroup (under each controller's root) a task's container runs in.
pub fn cgroup(id: &str) -> String {
    format!("/shoal/{id}")
}

/// What a task's container is made of: the service's settings and the
/// node's. Pure.
pub fn task_run(
    c: &ContainerSpec,
    command: &[String],
    env: Vec<String>,
    hostname: String,
    netns: Option<PathBuf>,
    etc: EtcFiles,
    id: &str,
) -> TaskRun {
    TaskRun {
        hostname,
        entrypoint: c.entrypoint.clone(),
        args: command.to_vec(),
        env,
        user: c.user.clone(),
        // Read from the image's layers when its container is made.
        accounts: Default::default(),
        workdir: c.workdir.clone(),
        netns,
        etc,
        cgroup: cgroup(id),
        limits: Limits {
            memory: c.limits.memory_bytes,
            nano_cpus: c.limits.nano_cpus,
            pids: c.limits.pids.and_then(|p| i64::try_from(p).ok()),
        },
    }
}

/// What a task needs from the executor to start its container.
pub struct Start<'a> {
    /// The task's ID.
    pub id: &'a TaskId,
    /// Its service.
    pub service: &'a Service,
    /// `SERVICE.SLOT` (its hostname unless `--hostname`).
    pub name: String,
    /// Its environment: the service's and Shoal's `SHOAL_*`.
    pub env: Vec<String>,
    /// Its network namespace (a path), when the data plane made one.
    pub netns: Option<PathBuf>,
    /// The address its hostname maps to in its `/etc/hosts`.
    pub address: Option<Ipv4Addr>,
    /// The tasks directory (log and `/etc` files).
    pub dir: &'a Path,
}

/// Creates and starts the task's container; the image's own health
/// check, if any.
pub async fn start(engine: &Engine, s: Start<'_>) -> Result<Option<HealthCheck>, EngineError> {
    let Some(c) = &s.service.spec.container else {
        return Err(EngineError::Call {
            what: "start a container".into(),
            code: "InvalidArgument".into(),
            message: "the service runs host programs".into(),
        });
    };
    let io = |e: std::io::Error| EngineError::Call {
        what: format!("write the task's files in {}", s.dir.display()),
        code: "Io".into(),
        message: e.to_string(),
    };
    let file = |ext: &str| s.dir.join(format!("{}.{ext}", s.id));
    std::fs::create_dir_all(s.dir).map_err(io)?;
    let hostname = c.hostname.clone().unwrap_or(s.name);
    let etc = EtcFiles {
        resolv_conf: file("resolv.conf"),
        hosts: file("hosts"),
        hostname: file("hostname"),
    };
    let etc = write_etc_files(etc, &hostname, s.address).map_err(io)?;
    let log = file("log");
    std::fs::File::create(&log).map_err(io)?;
    let run = task_run(
        c,
        &s.service.spec.command,
        s.env,
        hostname,
        s.netns,
        etc,
        s.id,
    );
    let new = |run: TaskRun| NewContainer {
        id: s.id,
        image: &c.image,
        digest: c.digest.as_deref(),
        run,
        stdout: log.clone(),
        stderr: log.clone(),
        labels: HashMap::from([(TASK_LABEL.to_owned(), s.id.to_string())]),
    };
    let started = match engine.start(new(run.clone())).await {
        // Not here, or not the version the service runs: pulled, then
        // started.
        Err(EngineError::NoImage(_) | EngineError::OtherImage { .. }) => {
            tracing::info!(task = %s.id, image = %c.image, "pulling the task's image");
            engine.pull_missing(&c.image, c.digest.as_deref()).await?;
            engine.start(new(run)).await
        }
        other => other,
    };
    started.map(|image| image.healthcheck.map(|h| h.check()))
}

/// How a container that exited with `status` ended; `oom` when the kernel
/// killed it for its memory limit. Pure.
pub fn exit_of(status: u32, oom: bool) -> Exit {
    let code = i32::try_from(status).ok();
    let (state, message) = match status {
        0 => (TaskState::Complete, "finished".to_owned()),
        _ if oom => (
            TaskState::Failed,
            format!("killed: out of memory (over its --limit-memory), exit status {status}"),
        ),
        129..=192 => (
            TaskState::Failed,
            format!("killed by signal {} (exit status {status})", status - 128),
        ),
        _ => (TaskState::Failed, format!("exited with status {status}")),
    };
    Exit {
        state,
        message,
        code,
    }
}

/// Whether the kernel's OOM killer acted in task `id`'s memory cgroup
/// (cgroup v1's `memory.oom_control`, v2's `memory.events`).
fn oom_killed(id: &str) -> bool {
    let group = cgroup(id);
    let files = [
        format!("/sys/fs/cgroup/memory{group}/memory.oom_control"),
        format!("/sys/fs/cgroup{group}/memory.events"),
    ];
    files.iter().any(|f| {
        std::fs::read_to_string(f).is_ok_and(|text| {
            text.lines().any(|l| {
                l.strip_prefix("oom_kill ")
                    .and_then(|n| n.trim().parse::<u64>().ok())
                    .is_some_and(|n| n > 0)
            })
        })
    })
}

/// Watches task `id`'s container until it ends (also one started by an
/// earlier daemon); then removes it. While containerd does not answer, it
/// waits for it to come back.
/// `exits` is woken once it has ended.
pub fn watch(engine: Arc<Engine>, id: TaskId, exits: Arc<tokio::sync::Notify>) -> Watched {
    let exit = Arc::new(Mutex::new(None));
    let slot = exit.clone();
    let waiter = tokio::spawn(async move {
        let ended = loop {
            match engine.wait(&id).await {
                Ok(status) => break exit_of(status, oom_killed(&id)),
                Err(EngineError::Call { code, .. }) if code == "NotFound" => {
                    break Exit {
                        state: TaskState::Failed,
                        message: "its container is gone from containerd".into(),
                        code: None,
                    };
                }
                Err(e) => {
                    tracing::debug!(task = %id, error = %e, "waiting for containerd");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        engine.remove_container(&id).await;
        if let Ok(mut e) = slot.lock() {
            *e = Some(ended);
        }
        exits.notify_one();
    });
    Watched {
        exit,
        waiter,
        probe: None,
    }
}

/// A signal's number from its name (`SIGTERM` when unknown).
pub fn signal_number(name: Option<&str>) -> u32 {
    name.and_then(|n| {
        crate::api::SIGNALS
            .iter()
            .find(|(s, _)| *s == n)
            .map(|(_, num)| *num as u32)
    })
    .unwrap_or(15)
}

/// Asks the task's container to stop with the service's stop signal.
pub async fn stop(engine: &Engine, id: &str, signal: Option<&str>) {
    if let Err(e) = engine.kill(id, signal_number(signal), false).await {
        tracing::debug!(task = %id, error = %e, "stop signal not delivered");
    }
}

/// Kills every process of the task's container.
pub async fn kill(engine: &Engine, id: &str) {
    if let Err(e) = engine.kill(id, SIGKILL, true).await {
        tracing::debug!(task = %id, error = %e, "SIGKILL not delivered");
    }
}

/// Stops and removes Shoal's containers whose task is not in `keep`
/// (tasks the store no longer runs here); best effort.
pub async fn remove_others(engine: &Engine, keep: &BTreeSet<TaskId>, grace: Duration) {
    let Ok(found) = engine.containers().await else {
        return;
    };
    let others: Vec<_> = found
        .into_iter()
        .filter(|c| {
            c.labels
                .get(TASK_LABEL)
                .is_some_and(|t| !keep.contains(t.as_str()))
        })
        .collect();
    for c in others.iter().filter(|c| c.running) {
        tracing::info!(task = %c.id, "stopping a container the store no longer runs here");
        stop(engine, &c.id, None).await;
    }
    let deadline = tokio::time::Instant::now() + grace;
    for c in &others {
        if c.running {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if tokio::time::timeout(left, engine.wait(&c.id))
                .await
                .is_err()
            {
                kill(engine, &c.id).await;
                let _ = engine.wait(&c.id).await;
            }
        }
        engine.remove_container(&c.id).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_read_as_a_user_would_say_them() {
        assert_eq!(exit_of(0, false).state, TaskState::Complete);
        let e = exit_of(3, false);
        assert_eq!((e.state, e.code), (TaskState::Failed, Some(3)));
        assert_eq!(e.message, "exited with status 3");
        assert_eq!(
            exit_of(137, false).message,
            "killed by signal 9 (exit status 137)"
        );
        assert!(exit_of(137, true).message.contains("out of memory"));
        assert_eq!(signal_number(Some("SIGQUIT")), 3);
        assert_eq!(signal_number(None), 15);
    }
}
