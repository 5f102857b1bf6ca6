//! `shoal exec [-i] [-t] TASK -- CMD…`: runs a command inside a running
//! task, like `docker exec`, and its exit status becomes ours. In a
//! container task, the daemon runs it through containerd as the
//! container's own process runs (its namespaces, user, capabilities):
//! without `-i`/`-t` with no input, its output returned when it ends; with
//! them, streamed through FIFOs this command makes (`-i`: this input goes
//! to it; `-t`: it runs on a terminal, this one put in raw mode while it
//! runs). In a host-program task's sandbox (its network namespace and its
//! `/etc/resolv.conf`), the command runs from here through `nsenter`, with
//! this terminal's input and output.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};

use super::Client;
use crate::api::{ExecStdio, Request};

/// `-i` and `-t`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Streams {
    /// `-i`: standard input goes to the command.
    pub interactive: bool,
    /// `-t`: the command runs on a terminal.
    pub tty: bool,
}

/// Exit with this status, printing nothing more.
#[derive(Debug)]
pub struct ExitStatus(pub u8);

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit status {}", self.0)
    }
}

impl std::error::Error for ExitStatus {}

/// Runs `command` in `task`'s sandbox.
pub async fn exec(
    client: &Client,
    task: String,
    command: Vec<String>,
    how: Streams,
) -> anyhow::Result<()> {
    let v = client
        .call(&Request::TaskExec { task: task.clone() })
        .await?;
    if v["container"] == true && (how.interactive || how.tty) {
        return streamed(client, task, command, how).await;
    }
    if v["container"] == true {
        // A container: the daemon runs the command through containerd.
        let ended: crate::daemon::containers::Ended = client
            .call_as(&Request::TaskExecIn {
                task,
                command,
                stdio: None,
            })
            .await?;
        print!("{}", ended.stdout);
        eprint!("{}", ended.stderr);
        return match ended.exit_status {
            0 => Ok(()),
            c => Err(ExitStatus(u8::try_from(c).unwrap_or(1)).into()),
        };
    }
    let pid = v["pid"]
        .as_u64()
        .ok_or_else(|| anyhow!("the daemon did not say where the task runs"))?;
    let (program, args) = command
        .split_first()
        .ok_or_else(|| anyhow!("no command: shoal exec TASK -- COMMAND [ARG...]"))?;
    let mut cmd = if v["namespaced"] == true {
        let mut c = std::process::Command::new("nsenter");
        c.args(["--target", &pid.to_string(), "--net", "--mount", "--"])
            .arg(program);
        c
    } else {
        // Not root: tasks run without namespaces of their own.
        std::process::Command::new(program)
    };
    cmd.args(args);
    if let Some(env) = v["env"].as_object() {
        for (k, val) in env {
            cmd.env(k, val.as_str().unwrap_or_default());
        }
    }
    let status = cmd
        .status()
        .with_context(|| format!("cannot run `{program}` in the task's sandbox"))?;
    match status.code() {
        Some(0) => Ok(()),
        Some(c) => Err(ExitStatus(u8::try_from(c).unwrap_or(1)).into()),
        None => Err(ExitStatus(128 + 9).into()),
    }
}

/// `shoal exec -i|-t` into a container: the command's input and output
/// go through FIFOs made here (in a private directory), which the
/// daemon hands to containerd; the daemon answers when it ends.
async fn streamed(
    client: &Client,
    task: String,
    command: Vec<String>,
    how: Streams,
) -> anyhow::Result<()> {
    use nix::sys::stat::Mode;
    use std::os::unix::fs::DirBuilderExt;
    let dir =
        FifoDir(std::env::temp_dir().join(format!("shoal-exec-{:016x}", rand::random::<u64>())));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir.path())
        .with_context(|| {
            format!(
                "cannot make {} for the command's FIFOs",
                dir.path().display()
            )
        })?;
    for name in ["in", "out", "err"] {
        nix::unistd::mkfifo(&dir.path().join(name), Mode::S_IRUSR | Mode::S_IWUSR)
            .with_context(|| format!("cannot make a FIFO in {}", dir.path().display()))?;
    }
    let on_terminal = std::io::stdin().is_terminal();
    let stdio = ExecStdio {
        dir: dir.path().to_owned(),
        stdin: how.interactive,
        terminal: how.tty.then(|| terminal_size().unwrap_or_default()),
    };
    let fifo = |name: &str| dir.path().join(name);
    let out = pump_out(fifo("out"), std::io::stdout());
    let err = (!how.tty).then(|| pump_out(fifo("err"), std::io::stderr()));
    if how.interactive {
        pump_in(fifo("in"), how.tty);
    }
    let raw = (how.tty && how.interactive && on_terminal)
        .then(RawMode::enter)
        .flatten();
    let ended: anyhow::Result<crate::daemon::containers::Ended> = client
        .call_as(&Request::TaskExecIn {
            task,
            command,
            stdio: Some(stdio),
        })
        .await;
    drop(raw);
    // The output ends when containerd closes its side; a FIFO it never
    // opened (the command did not start) is opened and closed here so
    // that its reader ends too.
    for name in ["out", "err"] {
        unblock_reader(&fifo(name));
    }
    let _ = out.join();
    if let Some(err) = err {
        let _ = err.join();
    }
    match ended?.exit_status {
        0 => Ok(()),
        c => Err(ExitStatus(u8::try_from(c).unwrap_or(1)).into()),
    }
}

/// A private directory for FIFOs, removed when dropped.
struct FifoDir(PathBuf);

impl FifoDir {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for FifoDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Copies FIFO `path` to `to` as it comes, until its writer closes it.
fn pump_out(path: PathBuf, mut to: impl Write + Send + 'static) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let Ok(mut from) = std::fs::File::open(&path) else {
            return;
        };
        let mut buf = [0u8; 8192];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 || to.write_all(&buf[..n]).and_then(|()| to.flush()).is_err() {
                break;
            }
        }
    })
}

/// Copies standard input to FIFO `path` until it ends. Without a
/// terminal it then closes the FIFO: the command reads its end. On a
/// terminal (`-t`), closing would hang the terminal up under the command
/// (SIGHUP, which could come before the command read what was typed): the
/// end is sent as a user at a terminal sends it, Ctrl-D (twice after an
/// unfinished line: the first ends the line), and the FIFO stays open until
/// this process ends, after the command. Not joined: it may wait on input
/// after the command has ended.
fn pump_in(path: PathBuf, tty: bool) {
    std::thread::spawn(move || {
        let Ok(mut to) = std::fs::OpenOptions::new().write(true).open(&path) else {
            return;
        };
        let mut from = std::io::stdin().lock();
        let mut buf = [0u8; 8192];
        let mut last = b'\n';
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 || to.write_all(&buf[..n]).is_err() {
                break;
            }
            last = buf[n - 1];
        }
        if tty && to.write_all(end_of_typing(last)).is_ok() {
            loop {
                std::thread::park();
            }
        }
    });
}

/// What ends input typed at a terminal whose last byte was `last`: Ctrl-D,
/// twice after an unfinished line.
fn end_of_typing(last: u8) -> &'static [u8] {
    if last == b'\n' { b"\x04" } else { b"\x04\x04" }
}

/// Opens FIFO `path` for writing without blocking, and closes it: a
/// reader still waiting for a writer then reads its end.
fn unblock_reader(path: &Path) {
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(path);
}

/// This terminal's size (columns, rows), by `stty size`.
fn terminal_size() -> Option<(u16, u16)> {
    let out = std::process::Command::new("stty")
        .arg("size")
        .stdin(std::process::Stdio::inherit())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace();
    let rows = words.next()?.parse().ok()?;
    let cols = words.next()?.parse().ok()?;
    Some((cols, rows))
}

/// This terminal in raw mode (keys go to the command as typed, Ctrl-C
/// included) until dropped, when its settings are restored.
struct RawMode(nix::sys::termios::Termios);

impl RawMode {
    fn enter() -> Option<RawMode> {
        use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
        let stdin = std::io::stdin();
        let saved = tcgetattr(&stdin).ok()?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&stdin, SetArg::TCSANOW, &raw).ok()?;
        Some(RawMode(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        use nix::sys::termios::{SetArg, tcsetattr};
        let _ = tcsetattr(std::io::stdin(), SetArg::TCSANOW, &self.0);
    }
}
