//! `shoal exec TASK -- CMD…`: runs a command inside a running task, like
//! `docker exec`, and its exit status becomes ours. In a container task,
//! the daemon runs it through containerd as the container's own process
//! runs (its namespaces, user, capabilities), with no input, and returns
//! its output when it ends. In a host-program task's sandbox (its network
//! namespace and its `/etc/resolv.conf`), the command runs from here
//! through `nsenter`, with this terminal's input and output.

use anyhow::{Context, anyhow};

use super::Client;
use crate::api::Request;

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
pub async fn exec(client: &Client, task: String, command: Vec<String>) -> anyhow::Result<()> {
    let v = client
        .call(&Request::TaskExec { task: task.clone() })
        .await?;
    if v["container"] == true {
        // A container: the daemon runs the command through containerd.
        let ended: crate::daemon::containers::Ended = client
            .call_as(&Request::TaskExecIn { task, command })
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
