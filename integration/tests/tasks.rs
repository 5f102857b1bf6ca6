//! Tasks as a user meets them: `shoal exec` into a task's sandbox, the
//! built-in `http-echo` workload, tasks that outlive a daemon restart,
//! restart policies and rolling updates (issue 4). The tasks are
//! containers of the tools image, but for the daemon restart: that one
//! runs a host program (`--`, the process runtime, whose shim differs);
//! containers outliving their daemon are in `containers.rs`.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use serde_json::Value;
use shoal_integration::{Cluster, echo_service, root_or_skip, tools_service};

const CONVERGE: Duration = Duration::from_secs(30);

fn tasks(c: &Cluster, i: usize, service: &str) -> Vec<Value> {
    c.shoal_ok(i, &["service", "ps", "--format", "json", service])
        .unwrap()
        .json()
        .unwrap()
        .as_array()
        .cloned()
        .unwrap()
}

fn running(c: &Cluster, i: usize, service: &str) -> Vec<Value> {
    tasks(c, i, service)
        .into_iter()
        .filter(|t| t["desired_state"] == "running" && t["state"] == "running")
        .collect()
}

/// The task's own process (its shim writes the pid file just after the
/// task is reported running: wait for it).
fn task_pid(c: &Cluster, i: usize, task: &str) -> u32 {
    c.wait_until_value(Duration::from_secs(5), || c.task_pid(i, task))
        .unwrap()
        .parse()
        .unwrap()
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[test]
fn exec_runs_commands_inside_a_task_and_http_echo_says_who_served() {
    if !root_or_skip("give tasks network namespaces") {
        return;
    }
    let mut c = Cluster::start(2).unwrap();
    c.load_tools().unwrap();
    c.form(1).unwrap();
    let args = echo_service("web", 2, &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = c.shoal_ok(0, &args).unwrap();
    assert!(r.stdout.contains("converged"), "{}", r.stdout);
    c.wait_until("node2 to see both tasks run", CONVERGE, |c| {
        Ok(running(c, 1, "web").len() == 2)
    })
    .unwrap();
    for t in running(&c, 0, "web") {
        let name = t["name"].as_str().unwrap();
        let host = t["node"].as_str().unwrap();
        let (here, there) = if host == "node1" { (0, 1) } else { (1, 0) };
        // Port 80 inside each task's own namespace: both tasks listen on it.
        let get = c
            .shoal_ok(
                here,
                &[
                    "exec",
                    name,
                    "--",
                    "shoal",
                    "tool",
                    "http-get",
                    "http://127.0.0.1:80/",
                ],
            )
            .unwrap();
        let v: Value = serde_json::from_str(&get.stdout).unwrap();
        assert_eq!(v["task"], name, "{v}");
        assert_eq!(v["node"], host, "{v}");
        assert!(
            v["client"].as_str().unwrap().starts_with("127.0.0.1:"),
            "{v}"
        );
        // The task's resolver, and its exit status passed through.
        let resolv = c
            .shoal_ok(here, &["exec", name, "--", "cat", "/etc/resolv.conf"])
            .unwrap();
        assert!(
            resolv.stdout.contains("nameserver 127.0.0.11"),
            "{resolv:?}"
        );
        let r = c.shoal(here, &["exec", name, "--", "sh", "-c", "exit 3"]);
        assert_eq!(r.code, 3, "{r:?}");
        // -i: input streams to the command, output and errors apart; -t:
        // it runs on a terminal.
        let script = "read x; echo got $x; read y; echo and $y >&2";
        let args = ["exec", "-i", name, "--", "sh", "-c", script];
        let r = c.shoal_input(here, &args, "hello\nworld\n");
        assert_eq!(
            (r.code, r.stdout.as_str(), r.stderr.as_str()),
            (0, "got hello\n", "and world\n")
        );
        let r = c.shoal(here, &["exec", "-t", name, "--", "tty"]);
        assert!(r.ok() && r.stdout.starts_with("/dev/pts/"), "{r:?}");
        // The line read on the terminal sets the exit status. (Not an
        // interactive `sh`: busybox's line editor asks the terminal for the
        // cursor position and may take typed-ahead input as the answer.)
        let r = c.shoal_input(
            here,
            &["exec", "-it", name, "--", "sh", "-c", "read x; exit $x"],
            "4\n",
        );
        assert_eq!(r.code, 4, "{r:?}");
        // Input that ends without a newline ends as at a terminal (Ctrl-D
        // twice), and the command reads the unfinished line.
        let r = c.shoal_input(
            here,
            &["exec", "-it", name, "--", "sh", "-c", "read x; exit $x"],
            "5",
        );
        assert_eq!(r.code, 5, "{r:?}");
        // Asked on the other node: it says where the task runs.
        c.assert_refused(
            there,
            &["exec", name, "--", "true"],
            &format!("runs on node {host}"),
        );
    }
    c.assert_refused(0, &["exec", "nope.1", "--", "true"], "no such task");
    // Nothing listens on port 80 of the host: the tasks are isolated.
    let host_get = c.shoal(
        0,
        &["tool", "http-get", "--timeout", "2", "http://127.0.0.1:80/"],
    );
    assert!(!host_get.ok(), "{host_get:?}");
}

/// Host programs (`--runtime process`) outlive their daemon too.
#[test]
fn tasks_outlive_a_daemon_restart_and_are_readopted() {
    let mut c = Cluster::start(1).unwrap();
    c.init(0).unwrap();
    c.shoal_ok(
        0,
        &[
            "service",
            "create",
            "--name",
            "keep",
            "--restart-delay",
            "200ms",
            "--",
            "sh",
            "-c",
            "echo started; exec sleep 600",
        ],
    )
    .unwrap();
    let first = running(&c, 0, "keep")[0].clone();
    let id = first["id"].as_str().unwrap().to_owned();
    let pid = task_pid(&c, 0, &id);
    assert!(alive(pid));

    // A clean stop and a kill -9 of the daemon: the task keeps running, and
    // the restarted daemon adopts it (same task, same process).
    for how in ["stop", "kill"] {
        if how == "stop" {
            c.stop(0);
        } else {
            c.kill(0);
        }
        c.holds_for(
            &format!("the task alive with its daemon gone ({how})"),
            Duration::from_millis(500),
            |_| Ok(alive(pid)),
        )
        .unwrap();
        let adopted = c.log(0).matches("re-adopted a running task").count();
        c.start_daemon(0).unwrap();
        c.wait_until("the restarted daemon to re-adopt the task", CONVERGE, |c| {
            Ok(c.log(0).matches("re-adopted a running task").count() > adopted)
        })
        .unwrap();
        let now = running(&c, 0, "keep");
        assert_eq!(now.len(), 1, "{now:?}");
        assert_eq!(
            now[0]["id"],
            id.as_str(),
            "the same task, not a replacement"
        );
        assert_eq!(task_pid(&c, 0, &id), pid);
    }
    let logs = c.shoal_ok(0, &["service", "logs", "keep"]).unwrap();
    assert!(logs.stdout.contains("started"), "{logs:?}");

    // The task dies while its daemon is down: the restarted daemon reports
    // how it ended (from the shim's exit record) and it is replaced.
    c.kill(0);
    let _ = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status();
    c.wait_until("the task to be dead", CONVERGE, |_| Ok(!alive(pid)))
        .unwrap();
    c.start_daemon(0).unwrap();
    c.wait_until("the dead task to be reported and replaced", CONVERGE, |c| {
        let all = tasks(c, 0, "keep");
        let old = all.iter().find(|t| t["id"] == id.as_str());
        let replaced = all
            .iter()
            .any(|t| t["id"] != id.as_str() && t["state"] == "running");
        Ok(old.is_some_and(|t| t["state"] == "failed") && replaced)
    })
    .unwrap();
    let all = tasks(&c, 0, "keep");
    let old = all.iter().find(|t| t["id"] == id.as_str()).unwrap();
    assert!(old["error"].as_str().unwrap().contains("signal 9"), "{old}");

    // service rm stops the re-adopted task's process.
    let new_id = running(&c, 0, "keep")[0]["id"].as_str().unwrap().to_owned();
    let new_pid = task_pid(&c, 0, &new_id);
    c.shoal_ok(0, &["service", "rm", "keep"]).unwrap();
    c.wait_until("the task's process to stop", CONVERGE, |_| {
        Ok(!alive(new_pid))
    })
    .unwrap();
}

#[test]
fn restart_policies_decide_whether_ended_tasks_come_back() {
    if !root_or_skip("run containers") {
        return;
    }
    let mut c = Cluster::start(1).unwrap();
    c.load_tools().unwrap();
    c.init(0).unwrap();
    let create = |name: &str, policy: &[&str], script: &str| {
        let mut extra = vec!["--detach"];
        extra.extend_from_slice(policy);
        extra.extend_from_slice(&["--restart-delay", "200ms"]);
        let args = tools_service(name, 1, &extra, &["sh", "-c", script]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        c.shoal_ok(0, &args).unwrap();
    };
    create(
        "flaky",
        &[
            "--restart-condition",
            "on-failure",
            "--restart-max-attempts",
            "2",
        ],
        "exit 3",
    );
    create("once", &["--restart-condition", "none"], "exit 0");
    create("done", &["--restart-condition", "on-failure"], "exit 0");
    c.wait_until("three attempts of flaky", CONVERGE, |c| {
        Ok(tasks(c, 0, "flaky").len() == 3)
    })
    .unwrap();
    // Given time to restart more, none of them does.
    c.holds_for("three attempts of flaky", Duration::from_secs(2), |c| {
        Ok(tasks(c, 0, "flaky").len() == 3)
    })
    .unwrap();
    let flaky = tasks(&c, 0, "flaky");
    assert_eq!(flaky.len(), 3, "1 run + 2 restarts: {flaky:?}");
    for t in &flaky {
        assert_eq!(t["state"], "failed", "{t}");
        assert_eq!(t["error"], "exited with status 3", "{t}");
    }
    for name in ["once", "done"] {
        let t = tasks(&c, 0, name);
        assert_eq!(t.len(), 1, "{name}: {t:?}");
        assert_eq!(t[0]["state"], "complete", "{name}: {t:?}");
    }
    let inspect = c.shoal_ok(0, &["service", "inspect", "flaky"]).unwrap();
    let v = &inspect.json().unwrap()[0];
    assert_eq!(v["restart_policy"]["condition"], "on-failure");
    assert_eq!(v["restart_policy"]["max_attempts"], 2);
    c.assert_refused(
        0,
        &[
            "service",
            "create",
            "--name",
            "x",
            "--restart-condition",
            "sometimes",
            "--",
            "true",
        ],
        "invalid --restart-condition",
    );
    c.assert_refused(
        0,
        &[
            "service",
            "create",
            "--name",
            "x",
            "--restart-delay",
            "5 parsecs",
            "--",
            "true",
        ],
        "invalid duration",
    );
}

#[test]
fn service_update_rolls_out_batch_by_batch_and_pauses_on_failure() {
    if !root_or_skip("run containers") {
        return;
    }
    let mut c = Cluster::start(3).unwrap();
    c.load_tools().unwrap();
    c.form(1).unwrap();
    c.shoal_ok(0, &["network", "create", "web"]).unwrap();
    let args = tools_service(
        "app",
        3,
        // `sleep`, as PID 1, ignores SIGTERM: a stop would wait 10 s.
        &[
            "--network",
            "web",
            "--update-delay",
            "1s",
            "--env",
            "V=1",
            "--stop-grace-period",
            "1s",
        ],
        &["sleep", "600"],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    c.shoal_ok(0, &args).unwrap();
    let before = c
        .shoal_ok(0, &["service", "inspect", "app"])
        .unwrap()
        .json()
        .unwrap()[0]
        .clone();
    // A label: nothing is replaced.
    let r = c
        .shoal_ok(0, &["service", "update", "--label-add", "tier=web", "app"])
        .unwrap();
    assert!(r.stdout.contains("converged"), "{r:?}");
    assert_eq!(tasks(&c, 0, "app").len(), 3);

    // An environment change rolls out one task at a time, 1 s apart.
    let started = Instant::now();
    let r = c
        .shoal_ok(0, &["service", "update", "--env-add", "V=2", "app"])
        .unwrap();
    assert!(r.stdout.contains("converged"), "{r:?}");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "two delays between three batches"
    );
    let all = tasks(&c, 0, "app");
    let new: Vec<&Value> = all.iter().filter(|t| t["spec_version"] == 2).collect();
    assert_eq!(new.len(), 3);
    assert!(new.iter().all(|t| t["state"] == "running"));
    let mut stopped: Vec<u64> = all
        .iter()
        .filter(|t| t["spec_version"] == 1)
        .map(|t| {
            assert_eq!(t["state"], "shutdown", "{t}");
            t["updated_at_ms"].as_u64().unwrap()
        })
        .collect();
    stopped.sort();
    assert_eq!(stopped.len(), 3);
    for w in stopped.windows(2) {
        assert!(w[1] - w[0] >= 1_000, "batches 1 s apart: {stopped:?}");
    }
    let after = c
        .shoal_ok(0, &["service", "inspect", "app"])
        .unwrap()
        .json()
        .unwrap()[0]
        .clone();
    assert_eq!(after["vips"], before["vips"], "an update keeps the VIP");
    assert_eq!(after["update_status"], "completed");
    assert_eq!(after["env"]["V"], "2");

    // A new version that cannot run: the update pauses after the first
    // task, the other two keep running the old version.
    let r = c.shoal(
        0,
        &["service", "update", "app", "--", "/nonexistent/program"],
    );
    assert!(!r.ok(), "{r:?}");
    assert!(r.stderr.contains("update paused"), "{r:?}");
    assert!(r.stderr.contains("no such executable"), "{r:?}");
    let old_running = running(&c, 0, "app")
        .iter()
        .filter(|t| t["spec_version"] == 2)
        .count();
    assert_eq!(old_running, 2);
    // Fixing the command resumes it.
    let r = c
        .shoal_ok(0, &["service", "update", "app", "--", "sleep", "601"])
        .unwrap();
    assert!(r.stdout.contains("converged"), "{r:?}");
    assert!(running(&c, 0, "app").iter().all(|t| t["spec_version"] == 4));
    c.assert_refused(
        0,
        &["service", "update", "--publish-rm", "81", "app"],
        "publishes no such port",
    );
    c.assert_refused(0, &["service", "update", "nope"], "no such service");
}
