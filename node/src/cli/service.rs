//! `shoal service …`.

use std::time::{Duration, Instant};

use clap::Subcommand;
use shoal_mesh::constraint::Constraint;
use shoal_mesh::service::{
    AttachmentRef, ContainerSpec, EndpointMode, PortSpec, RestartPolicy, ServiceMode, ServiceSpec,
    UpdateConfig,
};
use shoal_mesh::syntax::key_value;

use super::output::{Format, print_table};
use super::{Client, check_failures, kind_of, print_inspected};
use crate::api::{ContainerFlags, ErrorKind, Policies, Request, RuntimeArg, ServiceUpdate};
use crate::views::{Named, ServiceView, TaskLogView, TaskView, text};

/// `--mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeArg {
    /// `--replicas` tasks (1 by default).
    Replicated,
    /// One task per eligible node.
    Global,
}

/// `service create`'s flags, parsed into the domain's types as they are read.
#[derive(Debug, clap::Args)]
pub struct CreateFlags {
    /// Service name.
    #[arg(long)]
    pub name: String,
    /// Number of tasks (replicated mode).
    #[arg(long)]
    pub replicas: Option<u64>,
    /// replicated or global.
    #[arg(long, value_enum, default_value = "replicated")]
    pub mode: ModeArg,
    /// Network to attach: NET or name=NET,alias=A (repeatable).
    #[arg(long)]
    pub network: Vec<AttachmentRef>,
    /// Publish a port: P:T[/udp] or mode=ingress|host,published=P,target=T[,protocol=udp] (repeatable).
    #[arg(short, long)]
    pub publish: Vec<PortSpec>,
    /// Route HTTP requests for a host (and path prefix) through the L7
    /// mesh: host=HOST[,path=/PREFIX][,target=PORT][,sticky=true] (repeatable).
    #[arg(long = "http-route")]
    pub http_route: Vec<shoal_mesh::route::HttpRoute>,
    /// vip or dnsrr.
    #[arg(long, default_value = "vip")]
    pub endpoint_mode: EndpointMode,
    /// Placement constraint, e.g. node.labels.zone==east (repeatable).
    #[arg(long)]
    pub constraint: Vec<Constraint>,
    /// Environment variable K=V (repeatable).
    #[arg(short, long, value_parser = key_value)]
    pub env: Vec<(String, String)>,
    /// Label k=v (repeatable).
    #[arg(long, value_parser = key_value)]
    pub label: Vec<(String, String)>,
    /// Restart and update settings.
    #[command(flatten)]
    pub policies: Policies,
    /// Return at once instead of waiting for the tasks.
    #[arg(short, long)]
    pub detach: bool,
    /// What runs the tasks: `container` (an image's, the default) or
    /// `process` (a host program, the `--` form's default).
    #[arg(long, value_enum)]
    pub runtime: Option<RuntimeArg>,
    /// Container settings.
    #[command(flatten)]
    pub container: ContainerFlags,
    /// IMAGE [COMMAND] [ARG...]: the image and the command replacing its
    /// CMD; or `-- COMMAND [ARG...]`: a host program (`--runtime process`).
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "IMAGE [COMMAND]"
    )]
    pub image: Vec<String>,
    /// Whether the positional part followed `--` (the host-program form);
    /// set from the raw arguments by [`super::Cli::parse_args`].
    #[arg(skip)]
    pub dash_form: bool,
}

/// What runs a new service's tasks, from IMAGE, the `--` part and
/// `--runtime`: the container spec (if any) and the command.
fn runtime(
    runtime: Option<RuntimeArg>,
    container: ContainerFlags,
    positional: Vec<String>,
    dash_form: bool,
) -> anyhow::Result<(Option<ContainerSpec>, Vec<String>)> {
    let (mut image, after_dashes) = if dash_form {
        (Vec::new(), positional)
    } else {
        (positional, Vec::new())
    };
    let process = match runtime {
        Some(r) => r == RuntimeArg::Process,
        None => dash_form,
    };
    if process {
        if !image.is_empty() {
            anyhow::bail!(
                "--runtime process runs a host program: give it after `--` (shoal service create --name NAME -- COMMAND [ARG...]), not an image"
            );
        }
        if container.any() {
            anyhow::bail!(
                "container settings (--entrypoint, --user, --limit-*, --stop-*…) need an image: shoal service create [OPTIONS] IMAGE [COMMAND]"
            );
        }
        if after_dashes.is_empty() {
            anyhow::bail!(
                "a service needs an image or a command: shoal service create [OPTIONS] IMAGE [COMMAND] [ARG...], or -- COMMAND for a host program"
            );
        }
        return Ok((None, after_dashes));
    }
    if image.is_empty() {
        anyhow::bail!(
            "--runtime container needs an image: shoal service create [OPTIONS] IMAGE [COMMAND] [ARG...]"
        );
    }
    let name = image.remove(0);
    // `IMAGE -- COMMAND…`: the `--` only separates.
    if image.first().is_some_and(|a| a == "--") {
        image.remove(0);
    }
    image.extend(after_dashes);
    Ok((Some(container.spec(name)), image))
}

impl CreateFlags {
    /// The request the flags make: the spec (the store's `apply` checks
    /// it) and the networks as typed (the daemon resolves them).
    fn request(self) -> anyhow::Result<Request> {
        let mode = match (self.mode, self.replicas) {
            (ModeArg::Replicated, r) => ServiceMode::Replicated(r.unwrap_or(1)),
            (ModeArg::Global, None) => ServiceMode::Global,
            (ModeArg::Global, Some(_)) => {
                anyhow::bail!("--replicas cannot be used with --mode global")
            }
        };
        let (mut restart, mut update) = (RestartPolicy::default(), UpdateConfig::default());
        self.policies.apply(&mut restart, &mut update);
        let (container, command) =
            runtime(self.runtime, self.container, self.image, self.dash_form)?;
        let spec = ServiceSpec {
            name: self.name,
            mode,
            networks: Vec::new(),
            ports: self.publish,
            endpoint_mode: self.endpoint_mode,
            constraints: self.constraint,
            env: self.env.into_iter().collect(),
            command,
            labels: self.label.into_iter().collect(),
            restart,
            update,
            container,
            ext: shoal_mesh::service::ServiceExt {
                http_routes: self.http_route,
            },
        };
        Ok(Request::ServiceCreate {
            spec: Box::new(spec),
            networks: self.network,
        })
    }
}

// Parsed once per run; boxing clap's variants would only add noise.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum ServiceCmd {
    /// Create a service and wait until its tasks run.
    Create(CreateFlags),
    /// Change a service; tasks are replaced in rolling batches when what
    /// they run changes, and the command waits until the update is done.
    Update {
        /// What changes.
        #[command(flatten)]
        update: ServiceUpdate,
        /// Return at once instead of waiting for the update.
        #[arg(short, long)]
        detach: bool,
    },
    /// List services.
    Ls {
        /// Output format: `table` or `json`.
        #[arg(long, default_value = "table")]
        format: Format,
        /// Only print IDs.
        #[arg(short, long)]
        quiet: bool,
    },
    /// List a service's tasks.
    Ps {
        /// Output format: `table` or `json`.
        #[arg(long, default_value = "table")]
        format: Format,
        /// Name, ID or ID prefix.
        service: String,
    },
    /// Show services in detail.
    Inspect {
        /// Output format: `table` or `json`.
        #[arg(long, default_value = "json")]
        format: Format,
        /// Names, IDs or ID prefixes.
        #[arg(required = true)]
        services: Vec<String>,
    },
    /// Remove services (their tasks stop).
    Rm {
        /// Names, IDs or ID prefixes.
        #[arg(required = true)]
        services: Vec<String>,
    },
    /// Show the output of a service's tasks.
    Logs {
        /// Keep printing new output.
        #[arg(short, long)]
        follow: bool,
        /// Name, ID or ID prefix.
        service: String,
    },
    /// Change replica counts: NAME=N (repeatable); waits until each
    /// service runs that many reachable tasks.
    Scale {
        /// NAME=N.
        #[arg(required = true)]
        scales: Vec<String>,
        /// Return at once instead of waiting for the tasks.
        #[arg(short, long)]
        detach: bool,
    },
}

fn replicas(v: &ServiceView) -> String {
    format!("{}/{}", v.running, v.replicas)
}

/// How long `converge` waits for running tasks to become reachable: a
/// little longer than the daemon holds a task that does not listen.
const READY_WAIT_MAX: Duration = Duration::from_secs(15);

/// Waits until `service` runs all its tasks at its current version, and
/// (where the daemon asked runs a data plane) new connections reach them,
/// printing progress.
async fn converge(client: &Client, service: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = String::new();
    let mut all_running: Option<Instant> = None;
    let mut say = |now: String| {
        if now != last {
            println!("{service}: {now}");
            last = now;
        }
    };
    loop {
        let v: ServiceView = client
            .call_as(&Request::ServiceInspect {
                service: service.to_owned(),
            })
            .await?;
        let mut now = format!("{} tasks running", replicas(&v));
        if let Some(status) = &v.update_status {
            now = format!("{now}, {} up to date ({status})", v.up_to_date);
            if status.starts_with("update paused") {
                println!("{service}: {now}");
                anyhow::bail!(
                    "service {service}: {status}; fix the service and run `shoal service update --force {service}`"
                );
            }
        }
        say(now);
        if v.running == v.replicas && v.up_to_date == v.replicas {
            // Running is not yet reachable: a task with a published port
            // joins the load balancers, the routing mesh and DNS once it
            // listens (the daemon stops waiting for that after 10 s).
            let since = *all_running.get_or_insert_with(Instant::now);
            match v.ready {
                Some(ready) if ready < v.replicas && since.elapsed() < READY_WAIT_MAX => {
                    say(format!("{ready} of {} tasks reachable", v.replicas));
                }
                Some(ready) if ready < v.replicas => {
                    println!(
                        "{service}: converged, but {} of {} tasks are not reachable yet: see `shoal service ps {service}`",
                        v.replicas - ready,
                        v.replicas
                    );
                    return Ok(());
                }
                _ => {
                    println!("{service}: converged");
                    return Ok(());
                }
            }
        } else {
            all_running = None;
        }
        if Instant::now() > deadline {
            let why = why_not_running(client, service).await?;
            anyhow::bail!(
                "service {service} did not converge within 60 s ({} running){}{}; see `shoal service ps {service}`",
                replicas(&v),
                if why.is_empty() { "" } else { ": " },
                why.join("; ")
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Why the service's slots do not run: the newest task of each slot (it
/// comes first) with its message.
async fn why_not_running(client: &Client, service: &str) -> anyhow::Result<Vec<String>> {
    let tasks: Vec<TaskView> = client
        .call_as(&Request::ServicePs {
            service: service.to_owned(),
        })
        .await?;
    let mut seen = std::collections::BTreeSet::new();
    Ok(tasks
        .into_iter()
        .filter(|t| seen.insert(t.name.clone()))
        .filter(|t| !t.message.is_empty())
        .map(|t| format!("{}: {}", t.name, t.message))
        .collect())
}

impl ServiceCmd {
    pub async fn exec(self, client: &Client) -> anyhow::Result<()> {
        match self {
            ServiceCmd::Create(flags) => {
                let detach = flags.detach;
                let v: ServiceView = client.call_as(&flags.request()?).await?;
                println!("{}", v.id);
                if !detach {
                    converge(client, &v.name).await?;
                }
            }
            ServiceCmd::Update { update, detach } => {
                let v: ServiceView = client
                    .call_as(&Request::ServiceUpdate(Box::new(update)))
                    .await?;
                let name = v.name;
                println!("{name}");
                if !detach {
                    converge(client, &name).await?;
                }
            }
            ServiceCmd::Ls { format, quiet } => ls(client, format, quiet).await?,
            ServiceCmd::Ps { format, service } => ps(client, format, service).await?,
            ServiceCmd::Inspect { format, services } => {
                let (found, failed) = client
                    .call_each::<ServiceView>(services, |service| Request::ServiceInspect {
                        service,
                    })
                    .await;
                print_inspected(&found, format)?;
                check_failures(failed, "service(s) not found")?;
            }
            ServiceCmd::Rm { services } => {
                let (removed, failed) = client
                    .call_each::<Named>(services, |service| Request::ServiceRm { service })
                    .await;
                removed.iter().for_each(|v| println!("{}", v.name));
                check_failures(failed, "service(s) not removed")?;
            }
            ServiceCmd::Logs { follow, service } => logs(client, follow, service).await?,
            ServiceCmd::Scale { scales, detach } => scale(client, scales, detach).await?,
        }
        Ok(())
    }
}

/// `service ls`.
async fn ls(client: &Client, format: Format, quiet: bool) -> anyhow::Result<()> {
    let list: Vec<ServiceView> = client.call_as(&Request::ServiceLs).await?;
    if quiet {
        list.iter().for_each(|s| println!("{}", s.id));
        return Ok(());
    }
    if format == Format::Json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|s| {
            let ports: Vec<String> = s
                .ports
                .iter()
                .map(|p| format!("*:{}->{}/{}", p.published, p.target, p.protocol.as_str()))
                .collect();
            let image = s
                .container
                .as_ref()
                .map_or_else(|| "(host process)".to_owned(), |c| c.image.clone());
            vec![
                s.id.clone(),
                s.name.clone(),
                s.mode.clone(),
                replicas(s),
                image,
                ports.join(", "),
            ]
        })
        .collect();
    print_table(&["ID", "NAME", "MODE", "REPLICAS", "IMAGE", "PORTS"], &rows);
    Ok(())
}

/// `service ps`.
async fn ps(client: &Client, format: Format, service: String) -> anyhow::Result<()> {
    let tasks: Vec<TaskView> = client.call_as(&Request::ServicePs { service }).await?;
    if format == Format::Json {
        println!("{}", serde_json::to_string_pretty(&tasks)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = tasks
        .iter()
        .map(|t| {
            vec![
                t.id.clone(),
                t.name.clone(),
                t.node.clone().unwrap_or_default(),
                text(&t.desired_state),
                text(&t.state),
                t.message.clone(),
            ]
        })
        .collect();
    let headers = [
        "ID",
        "NAME",
        "NODE",
        "DESIRED STATE",
        "CURRENT STATE",
        "MESSAGE",
    ];
    print_table(&headers, &rows);
    Ok(())
}

/// `service logs [-f]`.
async fn logs(client: &Client, follow: bool, service: String) -> anyhow::Result<()> {
    let mut offsets = std::collections::BTreeMap::new();
    let mut warned = std::collections::BTreeSet::new();
    loop {
        let reply = crate::api::call(
            &client.0,
            &Request::ServiceLogs {
                service: service.clone(),
                offsets: offsets.clone(),
            },
        )
        .await?;
        if let Some(message) = reply.error {
            return Err(crate::api::ApiError {
                kind: reply.kind.unwrap_or(ErrorKind::Internal),
                message,
            }
            .into());
        }
        for w in reply.warnings {
            if warned.insert(w.clone()) {
                eprintln!("Warning: {w}");
            }
        }
        let read: Vec<TaskLogView> =
            serde_json::from_value(reply.data.unwrap_or_default()).unwrap_or_default();
        for t in read {
            let who = format!("{}@{}", t.name, t.node.unwrap_or_default());
            for line in t.text.lines() {
                println!("{who} | {line}");
            }
            offsets.insert(t.task, t.next);
        }
        if !follow {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// `service scale NAME=N…`.
async fn scale(client: &Client, scales: Vec<String>, detach: bool) -> anyhow::Result<()> {
    let mut failed = Vec::new();
    for s in scales {
        let parsed = s
            .split_once('=')
            .and_then(|(n, r)| r.parse::<u64>().ok().map(|r| (n.to_owned(), r)));
        let Some((service, replicas)) = parsed else {
            eprintln!("Error: invalid scale `{s}`: use NAME=REPLICAS");
            failed.push(ErrorKind::Invalid);
            continue;
        };
        match client
            .call(&Request::ServiceScale {
                service: service.clone(),
                replicas,
            })
            .await
        {
            Ok(_) => println!("{service} scaled to {replicas}"),
            Err(e) => {
                eprintln!("Error: {e:#}");
                failed.push(kind_of(&e));
                continue;
            }
        }
        if !detach && let Err(e) = converge(client, &service).await {
            eprintln!("Error: {e:#}");
            failed.push(kind_of(&e));
        }
    }
    check_failures(failed, "service(s) not scaled")
}
