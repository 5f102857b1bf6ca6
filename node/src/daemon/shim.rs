//! `shoal task-shim`: the small supervisor between the daemon and a task's
//! process, so that tasks outlive a daemon restart (like containerd's shim).
//!
//! ```text
//!  daemon ──spawn──► task-shim (own session) ──spawn──► task command
//!                      │ writes <id>.pid: "shim_pid shim_start child_pid"
//!                      │ SIGTERM → SIGTERM to the task, SIGKILL after the grace
//!                      └ on exit writes <id>.exit (JSON: code | signal | error)
//! ```
//!
//! The daemon watches the shim (its child, or after a restart a process it
//! re-adopts from the pid file, checked by start time against pid reuse)
//! and reads the exit record once the shim is gone.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Arguments of the hidden `task-shim` subcommand.
#[derive(Debug, clap::Args)]
pub struct ShimArgs {
    /// The tasks directory (`STATE_DIR/tasks`).
    #[arg(long)]
    pub dir: PathBuf,
    /// The task ID (names the files).
    #[arg(long)]
    pub id: String,
    /// How long the task has to exit after SIGTERM before SIGKILL.
    #[arg(long, default_value_t = 10_000)]
    pub stop_grace_ms: u64,
    /// The command, after `--`.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// How a task ended, as its shim recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    /// Exit status, if it exited.
    pub code: Option<i32>,
    /// Signal, if killed by one.
    pub signal: Option<i32>,
    /// Why it could not start, if it did not.
    pub error: Option<String>,
}

/// The shim's and the task's processes, from the pid file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pids {
    /// The shim.
    pub shim: u32,
    /// The shim's start time (clock ticks since boot), against pid reuse.
    pub shim_start: u64,
    /// The task's own process (the one inside the sandbox).
    pub child: u32,
}

/// `<dir>/<id>.<ext>`.
pub fn file(dir: &Path, id: &str, ext: &str) -> PathBuf {
    dir.join(format!("{id}.{ext}"))
}

/// A process's start time (field 22 of `/proc/PID/stat`), if it exists and
/// has not exited.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields
    // are counted after its closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// Reads `<id>.pid`.
pub fn read_pids(dir: &Path, id: &str) -> Option<Pids> {
    let text = std::fs::read_to_string(file(dir, id, "pid")).ok()?;
    let mut it = text.split_whitespace().map(str::parse::<u64>);
    let (Some(Ok(shim)), Some(Ok(shim_start)), Some(Ok(child))) = (it.next(), it.next(), it.next())
    else {
        return None;
    };
    Some(Pids {
        shim: u32::try_from(shim).ok()?,
        shim_start,
        child: u32::try_from(child).ok()?,
    })
}

/// Whether the shim named by `pids` still runs.
pub fn alive(pids: &Pids) -> bool {
    start_time(pids.shim) == Some(pids.shim_start)
}

/// A handle that becomes readable when process `pid` ends (a pidfd), so
/// that the executor learns of an exit without polling; `None` when the
/// process is gone already. An error when the kernel cannot give one
/// (before Linux 5.3): the caller polls instead.
pub fn exit_watch(
    pid: u32,
) -> std::io::Result<Option<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>>> {
    use rustix::process::{Pid, PidfdFlags, pidfd_open};
    let pid = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| std::io::Error::other("not a process ID"))?;
    match pidfd_open(pid, PidfdFlags::empty()) {
        // Deprecated for types whose descriptor can change under the
        // reactor; an `OwnedFd` owned by the `AsyncFd` cannot (its safe
        // successor is `unsafe`, which this workspace forbids).
        #[allow(deprecated)]
        Ok(fd) => {
            tokio::io::unix::AsyncFd::with_interest(fd, tokio::io::Interest::READABLE).map(Some)
        }
        Err(rustix::io::Errno::SRCH) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Reads `<id>.exit`.
pub fn read_exit(dir: &Path, id: &str) -> Option<ExitRecord> {
    let text = std::fs::read(file(dir, id, "exit")).ok()?;
    serde_json::from_slice(&text).ok()
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(tmp, path)
}

/// Sends `sig` to `pid`; errors (already gone) are ignored.
pub fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
    }
}

/// Runs the shim: starts the command, records pids, waits, records the exit.
pub async fn run(args: ShimArgs) -> anyhow::Result<()> {
    use std::os::unix::process::ExitStatusExt;
    // A session of its own: the daemon's end (or a terminal's ^C) does not
    // reach the task.
    let _ = nix::unistd::setsid();
    let exit_path = file(&args.dir, &args.id, "exit");
    let record = |r: &ExitRecord| {
        let bytes = serde_json::to_vec(r).unwrap_or_default();
        write_atomic(&exit_path, &bytes)
    };
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file(&args.dir, &args.id, "log"))?;
    let (program, rest) = args
        .command
        .split_first()
        .ok_or_else(|| anyhow::anyhow!("no command"))?;
    // Taken before the task starts: a stop that arrives while it starts
    // must reach it, not end the shim and orphan the task (a 100-task
    // service removed right after it started left such a task behind).
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let spawned = tokio::process::Command::new(program)
        .args(rest)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            record(&ExitRecord {
                code: None,
                signal: None,
                error: Some(format!("cannot start `{program}`: {e}")),
            })?;
            return Ok(());
        }
    };
    let child_pid = child.id().unwrap_or_default();
    let me = std::process::id();
    let my_start = start_time(me).unwrap_or_default();
    write_atomic(
        &file(&args.dir, &args.id, "pid"),
        format!("{me} {my_start} {child_pid}\n").as_bytes(),
    )?;
    let status = tokio::select! {
        s = child.wait() => s?,
        _ = term.recv() => {
            signal(child_pid, nix::sys::signal::Signal::SIGTERM);
            match tokio::time::timeout(Duration::from_millis(args.stop_grace_ms), child.wait()).await {
                Ok(s) => s?,
                Err(_) => {
                    let _ = child.start_kill();
                    child.wait().await?
                }
            }
        }
    };
    record(&ExitRecord {
        code: status.code(),
        signal: status.signal(),
        error: None,
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_process_end_is_told_without_polling() {
        let mut child = tokio::process::Command::new("sleep")
            .arg("0.3")
            .spawn()
            .unwrap();
        let fd = exit_watch(child.id().unwrap()).unwrap().expect("alive");
        let t0 = std::time::Instant::now();
        let ready = tokio::time::timeout(Duration::from_secs(10), fd.readable()).await;
        assert!(ready.is_ok(), "the pidfd became readable");
        assert!(
            t0.elapsed() >= Duration::from_millis(200),
            "not before the end"
        );
        child.wait().await.unwrap();
        // Gone (reaped): nothing to watch.
        assert!(exit_watch(child_pid_gone()).unwrap().is_none());
    }

    /// A process ID no process has.
    fn child_pid_gone() -> u32 {
        i32::MAX as u32
    }

    #[test]
    fn start_time_reads_this_process_and_not_a_missing_one() {
        assert!(start_time(std::process::id()).is_some());
        assert_eq!(start_time(u32::MAX), None);
    }

    #[test]
    fn pid_files_that_are_garbage_are_ignored() {
        let dir = std::env::temp_dir().join(format!("shoal-shim-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for text in ["", "1 2", "a b c", "1 2 99999999999"] {
            std::fs::write(file(&dir, "t", "pid"), text).unwrap();
            assert_eq!(read_pids(&dir, "t"), None, "{text:?}");
        }
        std::fs::write(file(&dir, "t", "pid"), "5 6 7\n").unwrap();
        assert_eq!(
            read_pids(&dir, "t"),
            Some(Pids {
                shim: 5,
                shim_start: 6,
                child: 7
            })
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
