//! The executor: runs the tasks the store assigns to this node as real
//! processes and reports their state through the store.
//!
//! As root, each task runs in a network namespace of its own (loopback
//! only, until the data plane of issue 5 gives it endpoints) and a private
//! mount namespace in which `/etc/resolv.conf` points at the embedded DNS
//! address 127.0.0.11 (`unshare --net --mount`, then `ip link set lo up` and
//! a bind mount, then `exec` of the task's command). Without root, tasks run
//! as plain child processes and the log says so. Output goes to
//! `STATE_DIR/tasks/<task id>.log`. A daemon restart does not re-adopt
//! running tasks (they are marked failed and replaced).

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::Weak;
use std::time::Duration;

use shoal_mesh::Command;
use shoal_mesh::task::{DesiredState, TaskState};
use tokio::process::Child;

use super::member::Member;
use super::peer::now_ms;

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

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
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

pub(super) async fn executor_loop(member: Weak<Member>) {
    let mut running: BTreeMap<String, Child> = BTreeMap::new();
    let mut changes = match member.upgrade() {
        Some(m) => m.state.changes(),
        None => return,
    };
    loop {
        let _ = tokio::time::timeout(INTERVAL, changes.changed()).await;
        let Some(m) = member.upgrade() else {
            for (_, mut c) in running {
                let _ = c.kill().await;
            }
            return;
        };
        let state = m.state.state();
        // Exited processes.
        let ids: Vec<String> = running.keys().cloned().collect();
        for id in ids {
            let exited = running
                .get_mut(&id)
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                running.remove(&id);
                let code = status.code();
                let (st, msg) = if status.success() {
                    (TaskState::Complete, "finished".to_owned())
                } else {
                    (TaskState::Failed, format!("exited with {status}"))
                };
                let wanted = state
                    .tasks
                    .get(&id)
                    .is_some_and(|t| t.desired == DesiredState::Running);
                let st = if wanted { st } else { TaskState::Shutdown };
                report(&m, &id, st, msg, code).await;
            }
        }
        // A running process whose state did not reach the store (a write
        // lost to a leader change) is reported again.
        let unreported: Vec<String> = running
            .keys()
            .filter(|id| {
                state
                    .tasks
                    .get(*id)
                    .is_some_and(|t| matches!(t.state, TaskState::Assigned | TaskState::Starting))
            })
            .cloned()
            .collect();
        for id in unreported {
            report(&m, &id, TaskState::Running, String::new(), None).await;
        }
        // Tasks to stop: gone from the store, or desired shutdown.
        let stop: Vec<String> = running
            .keys()
            .filter(|id| {
                state
                    .tasks
                    .get(*id)
                    .is_none_or(|t| t.desired == DesiredState::Shutdown)
            })
            .cloned()
            .collect();
        for id in stop {
            if let Some(mut c) = running.remove(&id) {
                let _ = c.kill().await;
                let _ = c.wait().await;
                if state.tasks.contains_key(&id) {
                    report(&m, &id, TaskState::Shutdown, "stopped".into(), None).await;
                }
            }
        }
        // Tasks to start.
        let mine: Vec<_> = state
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
                // It was running under an earlier daemon: not re-adopted.
                report(
                    &m,
                    &t.id,
                    TaskState::Failed,
                    "the node's daemon restarted".into(),
                    None,
                )
                .await;
                continue;
            }
            let Some(service) = state.services.get(&t.service_id) else {
                continue;
            };
            let Some((program, args)) = service.spec.command.split_first() else {
                continue;
            };
            if let Err(msg) = find_program(program) {
                report(&m, &t.id, TaskState::Failed, msg, None).await;
                continue;
            }
            let dir = m.dir.0.join("tasks");
            let log = std::fs::create_dir_all(&dir)
                .and_then(|()| std::fs::File::create(dir.join(format!("{}.log", t.id))));
            let resolv = dir.join(format!("{}.resolv.conf", t.id));
            let spawned = log.and_then(|log| {
                let err = log.try_clone()?;
                let mut cmd = if is_root() {
                    std::fs::write(&resolv, "nameserver 127.0.0.11\noptions ndots:0\n")?;
                    let mut c = tokio::process::Command::new("unshare");
                    c.args(["--net", "--mount", "--propagation", "private", "sh", "-c", SANDBOX_INIT])
                        .arg(&resolv)
                        .arg(program);
                    c
                } else {
                    tracing::warn!(task = %t.id, "not root: the task runs without its own network namespace");
                    tokio::process::Command::new(program)
                };
                cmd.args(args)
                    .envs(&service.spec.env)
                    .env("SHOAL_TASK_ID", &t.id)
                    .env("SHOAL_SERVICE_NAME", &service.spec.name)
                    .env(
                        "SHOAL_TASK_SLOT",
                        t.slot.map(|s| s.to_string()).unwrap_or_default(),
                    )
                    .stdin(Stdio::null())
                    .stdout(log)
                    .stderr(err)
                    .kill_on_drop(true)
                    .spawn()
            });
            match spawned {
                Ok(child) => {
                    running.insert(t.id.clone(), child);
                    report(&m, &t.id, TaskState::Running, String::new(), None).await;
                }
                Err(e) => {
                    report(
                        &m,
                        &t.id,
                        TaskState::Failed,
                        format!("cannot start `{program}`: {e}"),
                        None,
                    )
                    .await;
                }
            }
        }
    }
}
