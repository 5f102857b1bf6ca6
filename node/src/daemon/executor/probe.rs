//! Health checks of container tasks: one probe per checked task runs the
//! check inside the container (an exec through containerd) every interval
//! and tells the executor when the task turns healthy, or unhealthy after
//! `retries` failures in a row (failures in the start period do not
//! count). The shared [`Health`] is what the data plane reads.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use shoal_mesh::TaskId;
use shoal_mesh::service::{
    ContainerSpec, HEALTH_INTERVAL_MS, HEALTH_RETRIES, HEALTH_TIMEOUT_MS, HealthCheck,
};
use tokio::sync::mpsc;

use crate::daemon::engine::Engine;
use crate::daemon::health::Health;

/// A task's check, resolved: the service's settings over the image's,
/// Docker's defaults for what neither sets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    /// What runs in the container.
    pub command: Vec<String>,
    /// Between checks.
    pub interval: Duration,
    /// One check's limit.
    pub timeout: Duration,
    /// Failures in a row that make it unhealthy.
    pub retries: u64,
    /// When failures do not count yet.
    pub start_period: Duration,
}

/// The check a task of `c` runs, given its image's; `None` for none
/// (`--no-healthcheck`, `NONE`, or no check anywhere). Pure.
pub fn resolve(c: &ContainerSpec, image: Option<&HealthCheck>) -> Option<Check> {
    if c.no_healthcheck {
        return None;
    }
    let image = image.cloned().unwrap_or_default();
    let h = match &c.healthcheck {
        Some(own) => own.over(&image),
        None => image,
    };
    Some(Check {
        command: h.command()?,
        interval: Duration::from_millis(h.interval_ms.unwrap_or(HEALTH_INTERVAL_MS)),
        timeout: Duration::from_millis(h.timeout_ms.unwrap_or(HEALTH_TIMEOUT_MS)),
        retries: h.retries.unwrap_or(HEALTH_RETRIES),
        start_period: Duration::from_millis(h.start_period_ms.unwrap_or(0)),
    })
}

/// What a probe tells the executor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Turned {
    /// The task passed a check (first, or after failing some).
    Healthy(TaskId),
    /// The task failed `retries` checks in a row: the last one's output.
    Unhealthy(TaskId, String),
}

/// Most bytes of a failed check's output kept for the message.
const OUTPUT_KEPT: usize = 200;

/// The end of a check's output, for a message.
fn tail(path: &std::path::Path) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let start = text.len().saturating_sub(OUTPUT_KEPT);
    String::from_utf8_lossy(&text[start..]).trim().to_owned()
}

/// Runs task `id`'s check until it turns unhealthy or is aborted.
pub fn spawn(
    engine: Arc<Engine>,
    health: Arc<Health>,
    id: TaskId,
    check: Check,
    output: PathBuf,
    tell: mpsc::Sender<Turned>,
) -> tokio::task::JoinHandle<()> {
    health.checking(&id);
    tokio::spawn(async move {
        let started = tokio::time::Instant::now();
        let mut failures = 0u64;
        loop {
            tokio::time::sleep(check.interval).await;
            let _ = std::fs::remove_file(&output);
            let ran = engine
                .exec(
                    &id,
                    &check.command,
                    &[],
                    crate::daemon::containers::ExecIo::Files(&output, &output),
                    Some(check.timeout),
                )
                .await;
            let passed = matches!(ran, Ok(Some(0)));
            if passed {
                failures = 0;
                if health.set(&id, true) {
                    let _ = tell.send(Turned::Healthy(id.clone())).await;
                }
                continue;
            }
            let healthy_before = health.allows(&id) == Some(true);
            if !healthy_before && started.elapsed() < check.start_period {
                continue;
            }
            failures += 1;
            if failures >= check.retries {
                let why = match ran {
                    Ok(Some(code)) => format!("exit status {code}: {}", tail(&output)),
                    Ok(None) => format!("timed out after {:?}", check.timeout),
                    Err(e) => e.to_string(),
                };
                health.set(&id, false);
                let _ = tell.send(Turned::Unhealthy(id.clone(), why)).await;
                return;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_service_check_overrides_the_image_one_field_by_field() {
        let image = HealthCheck {
            test: Some(vec!["CMD".into(), "/ok".into()]),
            interval_ms: Some(5_000),
            retries: Some(7),
            ..Default::default()
        };
        let mut c = ContainerSpec::default();
        let r = resolve(&c, Some(&image)).unwrap();
        assert_eq!(r.command, vec!["/ok".to_owned()]);
        assert_eq!(r.interval, Duration::from_secs(5));
        assert_eq!(r.timeout, Duration::from_millis(HEALTH_TIMEOUT_MS));
        assert_eq!(r.retries, 7);
        c.healthcheck = Some(HealthCheck {
            test: Some(vec!["CMD-SHELL".into(), "test -e /x".into()]),
            retries: Some(2),
            ..Default::default()
        });
        let r = resolve(&c, Some(&image)).unwrap();
        assert_eq!(r.command, ["/bin/sh", "-c", "test -e /x"]);
        assert_eq!((r.interval, r.retries), (Duration::from_secs(5), 2));
        c.no_healthcheck = true;
        assert_eq!(resolve(&c, Some(&image)), None);
        let none = HealthCheck {
            test: Some(vec!["NONE".into()]),
            ..Default::default()
        };
        assert_eq!(resolve(&ContainerSpec::default(), Some(&none)), None);
        assert_eq!(resolve(&ContainerSpec::default(), None), None);
    }
}
