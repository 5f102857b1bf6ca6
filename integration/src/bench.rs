//! What the benchmarks share: a call on a daemon's API socket, a request
//! that creates a host-program service, a one-line summary of timings, and
//! a process's memory.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use shoal_mesh::service::{
    AttachmentRef, EndpointMode, RestartPolicy, ServiceMode, ServiceSpec, UpdateConfig,
};

/// One request on the API socket at `socket`: its `data`, or its error.
pub fn call(socket: &Path, req: &Value) -> anyhow::Result<Value> {
    let mut s = UnixStream::connect(socket)?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    s.write_all(&line)?;
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply)?;
    let v: Value = serde_json::from_str(&reply)?;
    if let Some(e) = v["error"].as_str() {
        anyhow::bail!("{e}");
    }
    Ok(v["data"].clone())
}

/// `service create` of `replicas` host-program tasks running `command`,
/// attached to `networks`, as the API takes it.
pub fn create_process_service(
    name: &str,
    replicas: u64,
    networks: &[&str],
    command: &[&str],
) -> Value {
    let spec = ServiceSpec {
        name: name.to_owned(),
        mode: ServiceMode::Replicated(replicas),
        networks: Vec::new(),
        ports: Vec::new(),
        endpoint_mode: EndpointMode::Vip,
        constraints: Vec::new(),
        env: Default::default(),
        command: command.iter().map(|s| (*s).to_owned()).collect(),
        labels: Default::default(),
        restart: RestartPolicy::default(),
        update: UpdateConfig::default(),
        container: None,
        ext: Default::default(),
    };
    let networks: Vec<AttachmentRef> = networks
        .iter()
        .map(|n| AttachmentRef {
            network: (*n).to_owned(),
            aliases: Vec::new(),
        })
        .collect();
    json!({"op": "service_create", "spec": spec, "networks": networks})
}

/// Prints `name: n=… min=… p50=… max=…` of `v`.
pub fn summary(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{name}: n={} min={:.0}ms p50={:.0}ms max={:.0}ms",
        v.len(),
        ms(v[0]),
        ms(v[v.len() / 2]),
        ms(v[v.len() - 1])
    );
}

/// Field `field` (e.g. `VmRSS:` of `status`, `Pss:` of `smaps_rollup`) of
/// `/proc/PID/FILE`, in KiB; 0 when the process or the field is gone.
pub fn proc_kib(pid: u32, file: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}
