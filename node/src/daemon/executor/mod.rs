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

pub mod container;
pub mod decide;
pub mod probe;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use shoal_mesh::task::{DesiredState, Task, TaskReport, TaskState};
use shoal_mesh::{ClusterState, Command, NodeId, TaskId};
use shoal_raft::StateHandle;
use tokio::process::Child;

use super::clock::now_ms;
use super::engine::Engine;
use super::health::Health;
use super::sandboxes::Sandboxes;
use super::shim::{self, Pids};
use super::writer::Propose;
use decide::{Decider, ExecAction, Exit, STOP_GRACE, Supervision};
use tokio::sync::{Notify, mpsc};

/// How often it looks while it must poll: a task's end it cannot be told
/// of (a kernel without pidfds), or a report that did not reach the store.
const POLL_INTERVAL: Duration = Duration::from_millis(300);
/// How often it looks when nothing wakes it: the store's changes, a
/// task's end (containerd's wait, a pidfd), a health probe, a sandbox and
/// the next delay running out do.
const AUDIT_INTERVAL: Duration = Duration::from_secs(10);

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

/// What runs a supervised task.
enum Runner {
    /// A host program under a `shoal task-shim`.
    Shim {
        /// The shim, when this daemon started it (else it was re-adopted).
        shim: Option<Child>,
        /// Its pids, once known.
        pids: Option<Pids>,
    },
    /// A container, watched through containerd.
    Container(container::Watched),
}

/// A task this executor watches.
struct Supervised {
    runner: Runner,
    /// When it was asked to stop.
    stopping: Option<Instant>,
    /// Wakes the executor when a shim ends (none for a container, whose
    /// watcher does, or where the kernel gives no pidfd).
    exit_watch: Option<tokio::task::JoinHandle<()>>,
    /// Whether its end is only seen by looking (no pidfd).
    polled: bool,
}

impl Supervised {
    /// A shim this daemon started (`shim`) or re-adopted (`pids`); its end
    /// wakes `exits`.
    fn shim(shim: Option<Child>, pids: Option<Pids>, exits: &Arc<Notify>) -> Self {
        let pid = match (&shim, &pids) {
            (Some(c), _) => c.id(),
            (None, Some(p)) => Some(p.shim),
            (None, None) => None,
        };
        let exit_watch = match pid.map(shim::exit_watch) {
            Some(Ok(fd)) => {
                // A re-adopted pid may be another process's by now: checked
                // by start time once the pidfd holds it.
                let same = shim.is_some() || pids.as_ref().is_some_and(shim::alive);
                let fd = fd.filter(|_| same);
                let exits = exits.clone();
                Some(tokio::spawn(async move {
                    if let Some(fd) = fd {
                        let _ = fd.readable().await;
                    }
                    exits.notify_one();
                }))
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "no pidfd: the task's end is polled");
                None
            }
            None => None,
        };
        Supervised {
            polled: exit_watch.is_none(),
            runner: Runner::Shim { shim, pids },
            stopping: None,
            exit_watch,
        }
    }

    fn container(watched: container::Watched) -> Self {
        Supervised {
            runner: Runner::Container(watched),
            stopping: None,
            exit_watch: None,
            polled: false,
        }
    }

    /// How the task ended, once it has.
    fn ended(&mut self, dir: &Path, id: &str) -> Option<Exit> {
        match &mut self.runner {
            Runner::Shim { shim, pids } => {
                if pids.is_none() {
                    *pids = shim::read_pids(dir, id);
                }
                let ended = match shim {
                    Some(c) => !matches!(c.try_wait(), Ok(None)),
                    None => pids.as_ref().is_none_or(|p| !shim::alive(p)),
                };
                ended.then(|| outcome(dir, id))
            }
            Runner::Container(w) => w.ended(),
        }
    }

    /// The stop signal: for a host program, SIGTERM to the shim, which
    /// passes it on and gives the task its grace; for a container, the
    /// service's stop signal.
    async fn stop(&mut self, engine: &Engine, id: &str, signal: Option<&str>, now: Instant) {
        self.stopping.get_or_insert(now);
        match &self.runner {
            Runner::Shim { shim: Some(c), .. } => {
                if let Some(pid) = c.id() {
                    shim::signal(pid, Signal::SIGTERM);
                }
            }
            Runner::Shim {
                shim: None,
                pids: Some(p),
            } => shim::signal(p.shim, Signal::SIGTERM),
            Runner::Shim { .. } => {}
            Runner::Container(_) => container::stop(engine, id, signal).await,
        }
    }

    /// SIGKILL to the task (and its shim).
    async fn kill(&mut self, engine: &Engine, id: &str) {
        match &mut self.runner {
            Runner::Shim { shim, pids } => {
                if let Some(p) = pids {
                    shim::signal(p.child, Signal::SIGKILL);
                    shim::signal(p.shim, Signal::SIGKILL);
                }
                if let Some(c) = shim {
                    let _ = c.start_kill();
                }
            }
            Runner::Container(_) => container::kill(engine, id).await,
        }
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        if let Some(w) = &self.exit_watch {
            w.abort();
        }
    }
}

/// What a task's exit record says.
fn outcome(dir: &Path, id: &str) -> Exit {
    let (state, message, code) = match shim::read_exit(dir, id) {
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
    };
    Exit {
        state,
        message,
        code,
    }
}

/// `SERVICE.SLOT`, or `SERVICE.NODE` for global services.
pub fn task_name(state: &ClusterState, t: &Task) -> String {
    state.task_name(t)
}

/// Every task process this node's shims run (by task ID), whatever the
/// store says: for re-adoption and for `swarm leave`.
fn shims_on_disk(dir: &Path) -> BTreeMap<TaskId, Pids> {
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
            found.insert(id.into(), p);
        }
    }
    found
}

/// Stops every task this node runs, host programs and containers, and
/// waits (up to the grace period and a little) for them to end: `swarm
/// leave`.
pub async fn stop_all(state_dir: &Path, engine: &Engine) {
    let none = std::collections::BTreeSet::new();
    let containers = container::remove_others(engine, &none, STOP_GRACE);
    tokio::join!(stop_all_shims(state_dir), containers);
}

async fn stop_all_shims(state_dir: &Path) {
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

/// What the executor uses.
pub struct ExecutorCtx<W> {
    /// This node.
    pub id: NodeId,
    /// The store.
    pub state: StateHandle,
    /// Where task states are written.
    pub writer: W,
    /// Which sandboxes the data plane has ready.
    pub sandboxes: Arc<Sandboxes>,
    /// The node's state dir (task files go under `tasks/`).
    pub state_dir: PathBuf,
    /// containerd, for container tasks.
    pub engine: Arc<Engine>,
    /// The health of checked tasks (set here, read by the data plane).
    pub health: Arc<Health>,
    /// What wakes the executor besides the store.
    pub wake: Wake,
}

/// What wakes the executor besides the store's changes.
#[derive(Default)]
pub struct Wake {
    /// Woken when a task ends.
    exits: Arc<Notify>,
    /// A report did not reach the store (it is made again soon).
    unsettled: std::sync::atomic::AtomicBool,
}

impl<W: Propose> ExecutorCtx<W> {
    fn tasks_dir(&self) -> PathBuf {
        self.state_dir.join("tasks")
    }

    async fn report(&self, id: &TaskId, state: TaskState, message: String, exit_code: Option<i32>) {
        let cmd = Command::ReportTask {
            node: self.id,
            report: TaskReport::new(id.clone(), state, message, exit_code, now_ms()),
        };
        if let Err(e) = self.writer.propose(cmd).await {
            tracing::debug!(task = %id, error = %e, "task state not recorded");
            self.wake
                .unsettled
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// How a start went.
enum Started {
    /// It runs (reported).
    Running(Box<Supervised>),
    /// It could not start (reported failed), or its service is gone.
    Failed,
    /// It could not start for a reason that may pass (not reported yet).
    Retry(String),
}

/// Starts task `t` (its sandbox, if any, is ready): its container, or a
/// host program under a shim; reports how that went, except a failure
/// that may pass, which the caller retries.
async fn start<W: Propose>(
    ctx: &ExecutorCtx<W>,
    state: &ClusterState,
    t: &Task,
    tell: &mpsc::Sender<probe::Turned>,
) -> Started {
    let Some(service) = state.services.get(&t.service_id) else {
        return Started::Failed;
    };
    // With the data plane, the task starts inside the sandbox it programmed.
    let netns = ctx.sandboxes.ready(&t.id);
    if service.spec.container.is_some() {
        let dir = ctx.tasks_dir();
        let started = container::start(
            &ctx.engine,
            container::Start {
                id: &t.id,
                service,
                name: task_name(state, t),
                env: task_env(ctx, state, t)
                    .into_iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect(),
                netns: netns.map(|ns| Path::new(shoal_netdriver::linux::NETNS_DIR).join(ns)),
                address: own_address(service, t),
                dir: &dir,
            },
        )
        .await;
        return match started {
            Ok(image_check) => {
                ctx.report(&t.id, TaskState::Running, String::new(), None)
                    .await;
                let mut watched =
                    container::watch(ctx.engine.clone(), t.id.clone(), ctx.wake.exits.clone());
                watched.probe = start_probe(ctx, service, &t.id, image_check.as_ref(), tell);
                Started::Running(Box::new(Supervised::container(watched)))
            }
            Err(e) if e.retryable() => Started::Retry(e.to_string()),
            Err(e) => {
                let msg = format!("cannot start the task's container: {e}");
                ctx.report(&t.id, TaskState::Failed, msg, None).await;
                Started::Failed
            }
        };
    }
    let Some((program, _)) = service.spec.command.split_first() else {
        return Started::Failed;
    };
    if let Err(msg) = find_program(program) {
        ctx.report(&t.id, TaskState::Failed, msg, None).await;
        return Started::Failed;
    }
    match spawn(ctx, state, t, netns.as_deref()) {
        Ok(child) => {
            ctx.report(&t.id, TaskState::Running, String::new(), None)
                .await;
            Started::Running(Box::new(Supervised::shim(
                Some(child),
                None,
                &ctx.wake.exits,
            )))
        }
        Err(e) => {
            let msg = format!("cannot start the task's supervisor: {e}");
            ctx.report(&t.id, TaskState::Failed, msg, None).await;
            Started::Failed
        }
    }
}

/// Starts the health probe of container task `id` when its service or
/// image has a check.
fn start_probe<W: Propose>(
    ctx: &ExecutorCtx<W>,
    service: &shoal_mesh::service::Service,
    id: &TaskId,
    image_check: Option<&shoal_mesh::service::HealthCheck>,
    tell: &mpsc::Sender<probe::Turned>,
) -> Option<tokio::task::JoinHandle<()>> {
    let check = probe::resolve(service.spec.container.as_ref()?, image_check)?;
    Some(probe::spawn(
        ctx.engine.clone(),
        ctx.health.clone(),
        id.clone(),
        check,
        ctx.tasks_dir().join(format!("{id}.health")),
        tell.clone(),
    ))
}

/// The address a task's name maps to in its own `/etc/hosts`: on the
/// first of its service's networks it has one on (as the other tasks
/// resolve it there), else on any. Pure.
fn own_address(service: &shoal_mesh::service::Service, t: &Task) -> Option<std::net::Ipv4Addr> {
    service
        .spec
        .networks
        .iter()
        .find_map(|a| t.addresses.get(&a.network))
        .or_else(|| t.addresses.values().next())
        .copied()
}

/// A task's environment: its service's, then Shoal's `SHOAL_*` variables.
fn task_env<W>(ctx: &ExecutorCtx<W>, state: &ClusterState, t: &Task) -> Vec<(String, String)> {
    let Some(service) = state.services.get(&t.service_id) else {
        return Vec::new();
    };
    let hostname = state
        .nodes
        .get(&ctx.id)
        .map(|n| n.hostname.clone())
        .unwrap_or_default();
    let mut env: Vec<(String, String)> = service
        .spec
        .env
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    env.extend([
        ("SHOAL_TASK_ID".into(), t.id.to_string()),
        ("SHOAL_TASK_NAME".into(), task_name(state, t)),
        ("SHOAL_SERVICE_NAME".into(), service.spec.name.clone()),
        ("SHOAL_SERVICE_ID".into(), service.id.to_string()),
        (
            "SHOAL_TASK_SLOT".into(),
            t.slot.map(|s| s.to_string()).unwrap_or_default(),
        ),
        ("SHOAL_NODE_ID".into(), ctx.id.to_string()),
        ("SHOAL_NODE_HOSTNAME".into(), hostname),
    ]);
    env
}

/// Spawns `shoal task-shim` for task `t`, inside network namespace `netns`
/// (a `/run/netns` name) when given.
fn spawn<W>(
    ctx: &ExecutorCtx<W>,
    state: &ClusterState,
    t: &Task,
    netns: Option<&str>,
) -> std::io::Result<Child> {
    let dir = ctx.state_dir.join("tasks");
    let service = state
        .services
        .get(&t.service_id)
        .ok_or_else(|| std::io::Error::other("the task's service is gone"))?;
    std::fs::create_dir_all(&dir)?;
    for ext in ["exit", "pid"] {
        let _ = std::fs::remove_file(shim::file(&dir, &t.id, ext));
    }
    let log = std::fs::File::create(shim::file(&dir, &t.id, "log"))?;
    // This very binary, also when the file was replaced or removed since
    // the daemon started (an upgrade under a running daemon).
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
        match netns {
            Some(ns) => {
                let path = Path::new(shoal_netdriver::linux::NETNS_DIR).join(ns);
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
        .envs(task_env(ctx, state, t))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
}

/// Re-adopts the tasks a previous daemon started on this node: live ones
/// are watched again, ended ones reported with their exit record, and
/// processes the store no longer knows are stopped.
async fn adopt<W: Propose>(
    ctx: &ExecutorCtx<W>,
    state: &ClusterState,
    tell: &mpsc::Sender<probe::Turned>,
) -> BTreeMap<TaskId, Supervised> {
    let dir = ctx.tasks_dir();
    let mut alive = shims_on_disk(&dir);
    let mut running = BTreeMap::new();
    let mine: Vec<&Task> = state
        .tasks
        .values()
        .filter(|t| t.node == Some(ctx.id) && !t.state.is_terminal())
        .collect();
    // Containers of tasks the store no longer runs here are stopped (in
    // the background: they get their grace).
    let keep = mine.iter().map(|t| t.id.clone()).collect();
    let engine = ctx.engine.clone();
    tokio::spawn(async move { container::remove_others(&engine, &keep, STOP_GRACE).await });
    for t in mine {
        let service = state.services.get(&t.service_id);
        let image = service.and_then(|s| s.spec.container.as_ref());
        if let (Some(service), Some(c)) = (service, image)
            && matches!(t.state, TaskState::Starting | TaskState::Running)
        {
            // Its container runs on under its shim, or ended meanwhile:
            // waiting on it again tells which.
            tracing::info!(task = %t.id, "watching a container task again");
            let mut watched =
                container::watch(ctx.engine.clone(), t.id.clone(), ctx.wake.exits.clone());
            let image_check = ctx.engine.image_health(&c.image).await.ok().flatten();
            watched.probe = start_probe(ctx, service, &t.id, image_check.as_ref(), tell);
            running.insert(t.id.clone(), Supervised::container(watched));
            continue;
        }
        match alive.remove(&t.id) {
            Some(p) => {
                tracing::info!(task = %t.id, pid = p.child, "re-adopted a running task");
                let s = Supervised::shim(None, Some(p), &ctx.wake.exits);
                running.insert(t.id.clone(), s);
            }
            None if matches!(t.state, TaskState::Starting | TaskState::Running) => {
                let exit = if shim::read_exit(&dir, &t.id).is_some() {
                    outcome(&dir, &t.id)
                } else {
                    Exit {
                        state: TaskState::Failed,
                        message: "its process was gone when the node's daemon restarted".into(),
                        code: None,
                    }
                };
                let st = if t.desired == DesiredState::Running {
                    exit.state
                } else {
                    TaskState::Shutdown
                };
                ctx.report(&t.id, st, exit.message, exit.code).await;
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

/// How often the tasks directory is swept.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Deletes the files (log, pid, exit record, resolv.conf) of tasks the
/// store has forgotten and that no longer run here.
fn sweep(dir: &Path, state: &ClusterState, running: &BTreeMap<TaskId, Supervised>) {
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

/// What each supervised task looks like now (its shim polled, the exit
/// record of an ended one read).
fn observe(
    dir: &Path,
    running: &mut BTreeMap<TaskId, Supervised>,
    health: &Health,
) -> BTreeMap<TaskId, Supervision> {
    running
        .iter_mut()
        .map(|(id, s)| {
            let ended = s.ended(dir, id).map(|mut exit| {
                // Stopped for failing its health check: it failed.
                if health.unhealthy(id) {
                    exit.state = TaskState::Failed;
                    exit.message = format!("unhealthy: {}", exit.message);
                }
                exit
            });
            let view = Supervision {
                ended,
                stopping: s.stopping,
            };
            (id.clone(), view)
        })
        .collect()
}

/// A probe's news: recorded as the running task's message; an unhealthy
/// task is stopped (its service's stop signal, SIGKILL after its grace),
/// and its end is then reported as a failure, which the restart policy
/// answers.
async fn on_health<W: Propose>(ctx: &ExecutorCtx<W>, turned: probe::Turned) {
    match turned {
        probe::Turned::Healthy(id) => {
            tracing::info!(task = %id, "healthy");
            ctx.report(&id, TaskState::Running, "healthy".into(), None)
                .await;
        }
        probe::Turned::Unhealthy(id, why) => {
            tracing::warn!(task = %id, %why, "unhealthy: stopping it");
            let (signal, grace) = ctx.state.read(|d| {
                let signal = stop_signal(&d.state, &id).map(str::to_owned);
                (signal, decide::kill_after(&d.state, &id))
            });
            ctx.report(&id, TaskState::Running, format!("unhealthy: {why}"), None)
                .await;
            let engine = ctx.engine.clone();
            tokio::spawn(async move {
                container::stop(&engine, &id, signal.as_deref()).await;
                tokio::time::sleep(grace).await;
                container::kill(&engine, &id).await;
            });
        }
    }
}

/// The stop signal of task `id`'s service (`--stop-signal`), if set.
fn stop_signal<'a>(state: &'a ClusterState, id: &TaskId) -> Option<&'a str> {
    let t = state.tasks.get(id)?;
    let c = state.services.get(&t.service_id)?.spec.container.as_ref()?;
    c.stop_signal.as_deref()
}

/// Runs until the task is aborted (the daemon stopping): tasks keep
/// running, to be re-adopted by the next daemon.
pub async fn run<W: Propose>(ctx: ExecutorCtx<W>) {
    let mut changes = ctx.state.changes();
    let (tell, mut turned) = mpsc::channel(64);
    let mut running = adopt(&ctx, &ctx.state.state(), &tell).await;
    let mut reported = std::pin::pin!(report_resources(&ctx));
    let mut reporting = true;
    let mut decider = Decider::default();
    let mut swept = Instant::now();
    let mut wait = Duration::ZERO;
    loop {
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = changes.changed() => {}
            () = ctx.sandboxes.changed.notified() => {}
            () = ctx.wake.exits.notified() => {}
            Some(t) = turned.recv() => on_health(&ctx, t).await,
            () = &mut reported, if reporting => reporting = false,
        }
        ctx.wake
            .unsettled
            .store(false, std::sync::atomic::Ordering::Relaxed);
        // What this node runs, not a copy of the whole store.
        let state = ctx.state.read(|d| d.state.node_view(ctx.id));
        let dir = ctx.tasks_dir();
        if swept.elapsed() >= SWEEP_EVERY {
            swept = Instant::now();
            sweep(&dir, &state, &running);
        }
        let seen = observe(&dir, &mut running, &ctx.health);
        let now = Instant::now();
        let actions = decider.decide(&state, ctx.id, &seen, &ctx.sandboxes.view(), now);
        let mut starts = Vec::new();
        for action in actions {
            match action {
                ExecAction::Report {
                    task,
                    state: st,
                    message,
                    exit_code,
                } => ctx.report(&task, st, message, exit_code).await,
                ExecAction::Forget(task) => {
                    running.remove(&task);
                    ctx.health.forget(&task);
                }
                ExecAction::Start(task) => starts.extend(state.tasks.get(&task)),
                ExecAction::Stop(task) => {
                    if let Some(s) = running.get_mut(&task) {
                        let signal = stop_signal(&state, &task);
                        s.stop(&ctx.engine, &task, signal, now).await;
                    }
                }
                ExecAction::Kill(task) => {
                    if let Some(s) = running.get_mut(&task) {
                        s.kill(&ctx.engine, &task).await;
                    }
                }
            }
        }
        for (id, started) in start_all(&ctx, &state, starts, &tell).await {
            match started {
                Started::Running(sup) => {
                    running.insert(id, *sup);
                }
                Started::Failed => {}
                Started::Retry(why) => {
                    let wait = decider.retry_later(&id, Instant::now());
                    let msg = format!("waiting to start: {why}; next try in {} s", wait.as_secs());
                    tracing::info!(task = %id, "{msg}");
                    ctx.report(&id, TaskState::Assigned, msg, None).await;
                }
            }
        }
        let polled = running.values().any(|s| s.polled)
            || ctx
                .wake
                .unsettled
                .load(std::sync::atomic::Ordering::Relaxed);
        let stopping = running
            .iter()
            .filter_map(|(id, s)| s.stopping.map(|t| (id, t)));
        let due = decider.next_deadline(&state, stopping);
        wait = next_look(Instant::now(), due, polled);
    }
}

/// How long the executor sleeps when nothing wakes it: until the
/// decider's next delay runs out (a stop's grace, a sandbox wait, a retry),
/// at most [`AUDIT_INTERVAL`]; [`POLL_INTERVAL`] while something is only
/// seen by looking. Pure.
fn next_look(now: Instant, due: Option<Instant>, polled: bool) -> Duration {
    if polled {
        return POLL_INTERVAL;
    }
    // A little past the deadline: the decider acts once it has passed.
    due.map_or(AUDIT_INTERVAL, |d| {
        d.saturating_duration_since(now) + Duration::from_millis(5)
    })
    .min(AUDIT_INTERVAL)
}

/// Starts `tasks`, several at once: a container's start is mostly waiting
/// on containerd and runc, and each report on a Raft commit.
async fn start_all<W: Propose>(
    ctx: &ExecutorCtx<W>,
    state: &ClusterState,
    tasks: Vec<&Task>,
    tell: &mpsc::Sender<probe::Turned>,
) -> Vec<(TaskId, Started)> {
    use futures_util::StreamExt;
    let mut started = Vec::new();
    let mut waiting = tasks.into_iter();
    let mut pending = futures_util::stream::FuturesUnordered::new();
    for t in waiting.by_ref().take(PARALLEL_STARTS) {
        pending.push(start_one(ctx, state, t, tell));
    }
    while let Some(one) = pending.next().await {
        started.push(one);
        if let Some(t) = waiting.next() {
            pending.push(start_one(ctx, state, t, tell));
        }
    }
    started
}

async fn start_one<W: Propose>(
    ctx: &ExecutorCtx<W>,
    state: &ClusterState,
    t: &Task,
    tell: &mpsc::Sender<probe::Turned>,
) -> (TaskId, Started) {
    (t.id.clone(), start(ctx, state, t, tell).await)
}

/// Tasks an executor starts at once.
const PARALLEL_STARTS: usize = 8;

/// This machine's CPUs and memory (`/proc/meminfo`'s `MemTotal`).
pub fn node_resources() -> shoal_mesh::NodeResources {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    let memory_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0);
    shoal_mesh::NodeResources {
        nano_cpus: cpus * 1_000_000_000,
        memory_bytes: memory_kib * 1024,
    }
}

/// Records this node's resources in the store (for the scheduler's
/// reservations) when the store does not have them yet, or has others;
/// retried until it does.
async fn report_resources<W: Propose>(ctx: &ExecutorCtx<W>) {
    let mine = node_resources();
    loop {
        let stored = ctx
            .state
            .read(|d| d.state.ext.node_resources.get(&ctx.id).copied());
        if stored == Some(mine) {
            return;
        }
        let cmd = Command::SetNodeResources {
            node: ctx.id,
            resources: mine,
        };
        if let Err(e) = ctx.writer.propose(cmd).await {
            tracing::debug!(error = %e, "resources not recorded yet");
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

#[cfg(test)]
mod look_tests {
    use super::*;

    #[test]
    fn the_executor_sleeps_until_its_next_deadline_or_the_audit() {
        let now = Instant::now();
        assert_eq!(next_look(now, None, false), AUDIT_INTERVAL);
        let soon = now + Duration::from_secs(2);
        assert_eq!(
            next_look(now, Some(soon), false),
            Duration::from_millis(2005)
        );
        let late = now + Duration::from_secs(60);
        assert_eq!(next_look(now, Some(late), false), AUDIT_INTERVAL);
        // Overdue: at once (the decider acts on it).
        assert_eq!(next_look(now, Some(now), false), Duration::from_millis(5));
        // Something only seen by looking: polled.
        assert_eq!(next_look(now, None, true), POLL_INTERVAL);
    }
}
