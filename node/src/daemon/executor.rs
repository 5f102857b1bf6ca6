//! The executor: runs the tasks the store assigns to this node as real
//! processes and reports their state through the store.
//!
//! As root, each task runs in a network namespace of its own (loopback
//! only, until the data plane of issue 5 gives it endpoints) and a private
//! mount namespace in which `/etc/resolv.conf` points at the embedded DNS
//! address 127.0.0.11 (`unshare --net --mount`, then `ip link set lo up` and
//! a bind mount, then `exec` of the task's command). Without root, tasks run
//! as plain child processes and the log says so. Output goes to
//! `STATE_DIR/tasks/<task id>.log`.
//!
//! Each task runs under a `shoal task-shim` (see `shim.rs`) in a session of
//! its own, so that stopping or killing the daemon leaves tasks running: a
//! restarted daemon re-adopts them from their pid files, and learns how a
//! task that ended meanwhile exited from its exit record. Tasks stop when
//! the store says so (SIGTERM, SIGKILL after 10 s) or on `swarm leave`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::Weak;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use shoal_mesh::task::{DesiredState, Task, TaskState};
use shoal_mesh::{ClusterState, Command};
use tokio::process::Child;

use super::member::Member;
use super::peer::now_ms;
use super::shim::{self, Pids};

const INTERVAL: Duration = Duration::from_millis(300);

/// Most output returned by one log read.
pub const LOG_CHUNK: u64 = 1 << 20;

/// Reads task `task`'s output on this node from byte `offset` (at most
/// [`LOG_CHUNK`] bytes); returns the bytes and the next offset.
pub fn read_log(
    state_dir: &std::path::Path,
    task: &str,
    offset: u64,
) -> std::io::Result<(Vec<u8>, u64)> {
    use std::io::{Read, Seek, SeekFrom};
    if task.is_empty() || !task.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "bad task id",
        ));
    }
    let mut f = std::fs::File::open(state_dir.join("tasks").join(format!("{task}.log")))?;
    let len = f.metadata()?.len();
    let start = offset.min(len);
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::new();
    f.take(LOG_CHUNK).read_to_end(&mut buf)?;
    let next = start + buf.len() as u64;
    Ok((buf, next))
}

/// Runs inside the task's new namespaces: `$0` is the resolv.conf to bind,
/// the rest is the task's command.
const SANDBOX_INIT: &str =
    "ip link set lo up && mount --bind \"$0\" /etc/resolv.conf && exec \"$@\"";

/// Whether `program` can be started: an executable file at that path, or
/// found on `PATH`. Checked before spawning so that a typo is reported as
/// such rather than as an exit status of the sandbox's shell.
fn find_program(program: &str) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &std::path::Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let found = if program.contains('/') {
        executable(std::path::Path::new(program))
    } else {
        std::env::var_os("PATH").is_some_and(|paths| {
            std::env::split_paths(&paths).any(|d| executable(&d.join(program)))
        })
    };
    if found {
        Ok(())
    } else {
        Err(format!(
            "cannot start `{program}`: no such executable (check the path or the node's PATH)"
        ))
    }
}

pub use shoal_netdriver::privilege::is_root;

/// Time a task gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// A task this executor watches.
struct Supervised {
    /// The shim, when this daemon started it (else it was re-adopted).
    shim: Option<Child>,
    /// Its pids, once known.
    pids: Option<Pids>,
    /// When SIGTERM was sent.
    stopping: Option<Instant>,
}

impl Supervised {
    /// Whether the shim has ended.
    fn ended(&mut self, dir: &Path, id: &str) -> bool {
        if self.pids.is_none() {
            self.pids = shim::read_pids(dir, id);
        }
        match &mut self.shim {
            Some(c) => !matches!(c.try_wait(), Ok(None)),
            None => self.pids.as_ref().is_none_or(|p| !shim::alive(p)),
        }
    }

    fn stop(&mut self) {
        if self.stopping.is_some() {
            return;
        }
        self.stopping = Some(Instant::now());
        match (&self.shim, &self.pids) {
            (Some(c), _) => {
                if let Some(pid) = c.id() {
                    shim::signal(pid, Signal::SIGTERM);
                }
            }
            (None, Some(p)) => shim::signal(p.shim, Signal::SIGTERM),
            (None, None) => {}
        }
    }

    /// A shim that did not end long after SIGTERM is killed with its task.
    fn enforce(&mut self) {
        if self
            .stopping
            .is_some_and(|t| t.elapsed() > STOP_GRACE + Duration::from_secs(5))
        {
            if let Some(p) = &self.pids {
                shim::signal(p.child, Signal::SIGKILL);
                shim::signal(p.shim, Signal::SIGKILL);
            }
            if let Some(c) = &mut self.shim {
                let _ = c.start_kill();
            }
        }
    }
}

/// What a task's exit record says, as a state and message.
fn outcome(dir: &Path, id: &str) -> (TaskState, String, Option<i32>) {
    match shim::read_exit(dir, id) {
        Some(shim::ExitRecord { error: Some(e), .. }) => (TaskState::Failed, e, None),
        Some(shim::ExitRecord { code: Some(0), .. }) => {
            (TaskState::Complete, "finished".into(), Some(0))
        }
        Some(shim::ExitRecord { code: Some(c), .. }) => (
            TaskState::Failed,
            format!("exited with status {c}"),
            Some(c),
        ),
        Some(shim::ExitRecord {
            signal: Some(s), ..
        }) => (TaskState::Failed, format!("killed by signal {s}"), None),
        _ => (
            TaskState::Failed,
            "the task's supervisor ended without recording how the task exited".into(),
            None,
        ),
    }
}

/// `SERVICE.SLOT`, or `SERVICE.NODE` for global services.
pub fn task_name(state: &ClusterState, t: &Task) -> String {
    state.task_name(t)
}

/// Every task process this node's shims run (by task ID), whatever the
/// store says: for re-adoption and for `swarm leave`.
fn shims_on_disk(dir: &Path) -> BTreeMap<String, Pids> {
    let mut found = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(id) = name.strip_suffix(".pid")
            && let Some(p) = shim::read_pids(dir, id)
            && shim::alive(&p)
        {
            found.insert(id.to_owned(), p);
        }
    }
    found
}

/// Stops every task this node runs and waits (up to the grace period and a
/// little) for them to end: `swarm leave`.
pub async fn stop_all(state_dir: &Path) {
    let dir = state_dir.join("tasks");
    let shims = shims_on_disk(&dir);
    for p in shims.values() {
        shim::signal(p.shim, Signal::SIGTERM);
    }
    let deadline = Instant::now() + STOP_GRACE + Duration::from_secs(2);
    while shims.values().any(shim::alive) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for p in shims.values().filter(|p| shim::alive(p)) {
        shim::signal(p.child, Signal::SIGKILL);
        shim::signal(p.shim, Signal::SIGKILL);
    }
}

async fn report(m: &Member, id: &str, state: TaskState, message: String, exit_code: Option<i32>) {
    let cmd = Command::SetTaskState {
        id: id.to_owned(),
        state,
        message,
        exit_code,
        now_ms: now_ms(),
    };
    if let Err(e) = m.propose(cmd).await {
        tracing::debug!(task = %id, error = %e, "task state not recorded");
    }
}

/// How long a task waits for its network sandbox before it fails.
const SANDBOX_WAIT: Duration = Duration::from_secs(30);

/// What became of a start.
enum Start {
    /// It runs.
    Started(Box<Supervised>),
    /// It failed (reported).
    Failed,
    /// Its sandbox is not programmed yet.
    Wait,
}

/// Starts task `t` under a shim; reports failure to start.
async fn start(m: &Member, state: &ClusterState, t: &Task) -> Start {
    let Some(service) = state.services.get(&t.service_id) else {
        return Start::Failed;
    };
    let Some((program, _)) = service.spec.command.split_first() else {
        return Start::Failed;
    };
    if let Err(msg) = find_program(program) {
        report(m, &t.id, TaskState::Failed, msg, None).await;
        return Start::Failed;
    }
    // With the data plane, the task starts inside the sandbox it programmed.
    let netns = if m.sandboxes.enabled {
        match m.sandboxes.ready(&t.id) {
            Some(ns) => Some(ns),
            None => return Start::Wait,
        }
    } else {
        None
    };
    let dir = m.dir.0.join("tasks");
    let hostname = state
        .nodes
        .get(&m.id)
        .map(|n| n.hostname.clone())
        .unwrap_or_default();
    let spawned = std::fs::create_dir_all(&dir).and_then(|()| {
        for ext in ["exit", "pid"] {
            let _ = std::fs::remove_file(shim::file(&dir, &t.id, ext));
        }
        let log = std::fs::File::create(shim::file(&dir, &t.id, "log"))?;
        // This very binary, also when the file was replaced or removed
        // since the daemon started (an upgrade under a running daemon).
        let mut cmd = tokio::process::Command::new("/proc/self/exe");
        if let Ok(exe) = std::env::current_exe() {
            cmd.arg0(exe);
        }
        cmd.arg("task-shim")
            .arg("--dir")
            .arg(&dir)
            .args(["--id", &t.id])
            .arg("--stop-grace-ms")
            .arg(STOP_GRACE.as_millis().to_string())
            .arg("--");
        if is_root() {
            let resolv = shim::file(&dir, &t.id, "resolv.conf");
            std::fs::write(&resolv, "nameserver 127.0.0.11\noptions ndots:0\n")?;
            match &netns {
                Some(ns) => {
                    let path = std::path::Path::new(shoal_netdriver::linux::NETNS_DIR).join(ns);
                    cmd.arg("nsenter")
                        .arg(format!("--net={}", path.display()))
                        .args(["unshare", "--mount", "--propagation", "private"])
                }
                None => cmd.args(["unshare", "--net", "--mount", "--propagation", "private"]),
            };
            cmd.args(["sh", "-c", SANDBOX_INIT]).arg(&resolv);
        } else {
            tracing::warn!(task = %t.id, "not root: the task runs without its own network namespace");
        }
        cmd.args(&service.spec.command)
            .envs(&service.spec.env)
            .env("SHOAL_TASK_ID", &t.id)
            .env("SHOAL_TASK_NAME", task_name(state, t))
            .env("SHOAL_SERVICE_NAME", &service.spec.name)
            .env("SHOAL_SERVICE_ID", &service.id)
            .env(
                "SHOAL_TASK_SLOT",
                t.slot.map(|s| s.to_string()).unwrap_or_default(),
            )
            .env("SHOAL_NODE_ID", m.id.to_string())
            .env("SHOAL_NODE_HOSTNAME", hostname)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
    });
    match spawned {
        Ok(child) => {
            report(m, &t.id, TaskState::Running, String::new(), None).await;
            Start::Started(Box::new(Supervised {
                shim: Some(child),
                pids: None,
                stopping: None,
            }))
        }
        Err(e) => {
            let msg = format!("cannot start the task's supervisor: {e}");
            report(m, &t.id, TaskState::Failed, msg, None).await;
            Start::Failed
        }
    }
}

/// Re-adopts the tasks a previous daemon started on this node: live ones
/// are watched again, ended ones reported with their exit record, and
/// processes the store no longer knows are stopped.
async fn adopt(m: &Member, state: &ClusterState) -> BTreeMap<String, Supervised> {
    let dir = m.dir.0.join("tasks");
    let mut alive = shims_on_disk(&dir);
    let mut running = BTreeMap::new();
    let mine = state
        .tasks
        .values()
        .filter(|t| t.node == Some(m.id) && !t.state.is_terminal());
    for t in mine {
        match alive.remove(&t.id) {
            Some(p) => {
                tracing::info!(task = %t.id, pid = p.child, "re-adopted a running task");
                running.insert(
                    t.id.clone(),
                    Supervised {
                        shim: None,
                        pids: Some(p),
                        stopping: None,
                    },
                );
            }
            None if matches!(t.state, TaskState::Starting | TaskState::Running) => {
                let (st, msg, code) = if shim::read_exit(&dir, &t.id).is_some() {
                    outcome(&dir, &t.id)
                } else {
                    (
                        TaskState::Failed,
                        "its process was gone when the node's daemon restarted".into(),
                        None,
                    )
                };
                let st = if t.desired == DesiredState::Running {
                    st
                } else {
                    TaskState::Shutdown
                };
                report(m, &t.id, st, msg, code).await;
            }
            None => {}
        }
    }
    for (id, p) in alive {
        tracing::info!(task = %id, "stopping a task the store no longer runs here");
        shim::signal(p.shim, Signal::SIGTERM);
    }
    running
}

/// Passes between two sweeps of the tasks directory (about a minute).
const SWEEP_EVERY: u32 = 200;

/// Deletes the files (log, pid, exit record, resolv.conf) of tasks the
/// store has forgotten and that no longer run here.
fn sweep(dir: &Path, state: &ClusterState, running: &BTreeMap<String, Supervised>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some((id, _)) = name.split_once('.') else {
            continue;
        };
        if !state.tasks.contains_key(id) && !running.contains_key(id) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

pub(super) async fn executor_loop(member: Weak<Member>) {
    let (mut changes, mut running) = match member.upgrade() {
        Some(m) => {
            let state = m.state.state();
            (m.state.changes(), adopt(&m, &state).await)
        }
        None => return,
    };
    let mut passes = 0u32;
    let mut waiting: BTreeMap<String, Instant> = BTreeMap::new();
    loop {
        let _ = tokio::time::timeout(INTERVAL, changes.changed()).await;
        // The daemon is shutting down: tasks keep running, to be re-adopted.
        let Some(m) = member.upgrade() else { return };
        let state = m.state.state();
        let dir = m.dir.0.join("tasks");
        waiting.retain(|id, _| state.tasks.contains_key(id));
        passes = passes.wrapping_add(1);
        if passes.is_multiple_of(SWEEP_EVERY) {
            sweep(&dir, &state, &running);
        }
        // Ended tasks.
        let ended: Vec<String> = running
            .iter_mut()
            .filter_map(|(id, s)| s.ended(&dir, id).then(|| id.clone()))
            .collect();
        for id in ended {
            let Some(sup) = running.remove(&id) else {
                continue;
            };
            let Some(t) = state.tasks.get(&id) else {
                continue;
            };
            if t.state.is_terminal() {
                continue;
            }
            let (st, msg, code) = outcome(&dir, &id);
            let (st, msg) = if t.desired == DesiredState::Running && sup.stopping.is_none() {
                (st, msg)
            } else {
                (TaskState::Shutdown, "stopped".to_owned())
            };
            report(&m, &id, st, msg, code).await;
        }
        // A running process whose state did not reach the store (a write
        // lost to a leader change) is reported again.
        let unreported: Vec<String> = running
            .iter()
            .filter(|(id, s)| {
                s.stopping.is_none()
                    && state.tasks.get(*id).is_some_and(|t| {
                        matches!(t.state, TaskState::Assigned | TaskState::Starting)
                    })
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in unreported {
            report(&m, &id, TaskState::Running, String::new(), None).await;
        }
        // Tasks to stop: gone from the store, or desired shutdown.
        for (id, sup) in running.iter_mut() {
            let wanted = state
                .tasks
                .get(id)
                .is_some_and(|t| t.desired == DesiredState::Running);
            if !wanted {
                sup.stop();
            }
            sup.enforce();
        }
        // Tasks to start.
        let mine: Vec<Task> = state
            .tasks
            .values()
            .filter(|t| t.node == Some(m.id) && t.desired == DesiredState::Running)
            .filter(|t| {
                matches!(
                    t.state,
                    TaskState::Assigned | TaskState::Starting | TaskState::Running
                )
            })
            .filter(|t| !running.contains_key(&t.id))
            .cloned()
            .collect();
        for t in mine {
            if t.state != TaskState::Assigned {
                // Its process is gone (not re-adopted at start).
                let msg = "its process was gone when the node's daemon restarted".into();
                report(&m, &t.id, TaskState::Failed, msg, None).await;
                continue;
            }
            match start(&m, &state, &t).await {
                Start::Started(sup) => {
                    waiting.remove(&t.id);
                    running.insert(t.id.clone(), *sup);
                }
                Start::Failed => {
                    waiting.remove(&t.id);
                }
                Start::Wait => {
                    let since = *waiting.entry(t.id.clone()).or_insert_with(Instant::now);
                    if since.elapsed() > SANDBOX_WAIT {
                        waiting.remove(&t.id);
                        let why = m
                            .sandboxes
                            .error()
                            .unwrap_or_else(|| "the data plane has not programmed it".into());
                        let msg = format!("its network sandbox was not ready within 30 s: {why}");
                        report(&m, &t.id, TaskState::Failed, msg, None).await;
                    }
                }
            }
        }
    }
}
