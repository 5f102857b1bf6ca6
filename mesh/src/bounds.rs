//! Bounds on every value a command carries. `apply` checks them, so a
//! command from the log or a peer is held to them as strictly as one from
//! the CLI: every replica keeps every object, and one oversized value (a
//! typo, or a hostile peer) would otherwise cost every manager its memory.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::network::NetworkSpec;
use crate::service::ServiceSpec;

/// Longest ID (network, service, task), in bytes.
pub const MAX_ID: usize = 64;
/// Longest key (an environment variable's name, a label's key), in bytes.
pub const MAX_KEY: usize = 256;
/// Longest value (an environment variable, a label, an argument), in bytes.
pub const MAX_VALUE: usize = 32 << 10;
/// Most entries in an environment, a label set or a command line.
pub const MAX_ENTRIES: usize = 1024;
/// Most items in a short list (networks, ports, constraints, aliases,
/// options, subnets, auxiliary addresses).
pub const MAX_ITEMS: usize = 64;
/// All the text of one spec (or of a node's labels) together, in bytes:
/// it bounds every command, so that a batch of log entries fits a message.
pub const MAX_SPEC_BYTES: usize = 256 << 10;
/// Longest hostname, in bytes (as DNS allows).
pub const MAX_HOSTNAME: usize = 253;

/// A value over its bound, or a character a value may not hold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{what}: {problem}")]
pub struct OutOfBounds {
    /// Which value.
    pub what: String,
    /// What is wrong with it, and the bound.
    pub problem: String,
}

fn out(what: impl Into<String>, problem: impl Into<String>) -> OutOfBounds {
    OutOfBounds {
        what: what.into(),
        problem: problem.into(),
    }
}

/// Checks that `text` is at most `max` bytes and holds no NUL or other
/// control character (`\t` allowed, and newlines where `lines`); its length.
pub fn check_text(what: &str, text: &str, max: usize, lines: bool) -> Result<usize, OutOfBounds> {
    if text.len() > max {
        return Err(out(
            what,
            format!("{} bytes long, at most {max} allowed", text.len()),
        ));
    }
    let bad = text
        .chars()
        .find(|c| c.is_control() && *c != '\t' && !(lines && (*c == '\n' || *c == '\r')));
    if let Some(c) = bad {
        return Err(out(
            what,
            format!(
                "holds the control character {:?}",
                c.escape_unicode().to_string()
            ),
        ));
    }
    Ok(text.len())
}

/// An ID: 1 to [`MAX_ID`] ASCII letters, digits, `-` or `_` (it names
/// files and kernel objects).
pub fn check_id(what: &str, id: &str) -> Result<(), OutOfBounds> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(out(
            what,
            format!(
                "`{}` is not an ID (1 to {MAX_ID} letters, digits, `-` or `_`)",
                id.escape_debug()
            ),
        ))
    }
}

fn check_count(what: &str, n: usize, max: usize) -> Result<(), OutOfBounds> {
    if n > max {
        return Err(out(what, format!("{n} given, at most {max} allowed")));
    }
    Ok(())
}

/// A map of keys to values (environment, labels, options): its size, in bytes.
pub fn check_map(what: &str, map: &BTreeMap<String, String>) -> Result<usize, OutOfBounds> {
    check_count(what, map.len(), MAX_ENTRIES)?;
    let mut bytes = 0;
    for (k, v) in map {
        if k.is_empty() {
            return Err(out(what, "a key is empty"));
        }
        bytes += check_text(
            &format!("{what} key `{}`", k.escape_debug()),
            k,
            MAX_KEY,
            false,
        )?;
        bytes += check_text(
            &format!("{what} `{}`", k.escape_debug()),
            v,
            MAX_VALUE,
            true,
        )?;
    }
    Ok(bytes)
}

/// A hostname as a node reports it.
pub fn check_hostname(hostname: &str) -> Result<(), OutOfBounds> {
    if hostname.is_empty() || hostname.chars().any(char::is_whitespace) {
        return Err(out("hostname", "empty or holds white space"));
    }
    check_text("hostname", hostname, MAX_HOSTNAME, false).map(drop)
}

/// A node's address, as `IP:PORT`.
pub fn check_addr(addr: &str) -> Result<(), OutOfBounds> {
    addr.parse::<std::net::SocketAddr>().map(drop).map_err(|_| {
        out(
            "address",
            format!("`{}` is not IP:PORT", addr.escape_debug()),
        )
    })
}

/// A service spec's sizes.
pub fn check_service(spec: &ServiceSpec) -> Result<(), OutOfBounds> {
    let mut bytes = 0;
    for k in spec.env.keys() {
        if k.contains('=') {
            return Err(out(
                "--env",
                format!("the name `{}` holds `=`", k.escape_debug()),
            ));
        }
    }
    bytes += check_map("--env", &spec.env)?;
    bytes += check_map("--label", &spec.labels)?;
    check_count("the command's arguments", spec.command.len(), MAX_ENTRIES)?;
    for (i, arg) in spec.command.iter().enumerate() {
        bytes += check_text(
            &format!("argument {i} of the command"),
            arg,
            MAX_VALUE,
            true,
        )?;
    }
    check_count("--network", spec.networks.len(), MAX_ITEMS)?;
    for a in &spec.networks {
        check_count("aliases of one network", a.aliases.len(), MAX_ITEMS)?;
        for alias in &a.aliases {
            bytes += check_text("an alias", alias, MAX_HOSTNAME, false)?;
        }
    }
    check_count("--publish", spec.ports.len(), MAX_ITEMS)?;
    crate::route::check(&spec.ext.http_routes).map_err(|e| out("--http-route", e))?;
    check_count("--constraint", spec.constraints.len(), MAX_ITEMS)?;
    if let Some(c) = &spec.container {
        bytes += check_container(c)?;
    }
    if bytes > MAX_SPEC_BYTES {
        return Err(out(
            "the service's spec",
            format!(
                "{bytes} bytes of environment, labels, command and aliases, at most {MAX_SPEC_BYTES} allowed"
            ),
        ));
    }
    Ok(())
}

/// Longest image reference, in bytes.
pub const MAX_IMAGE: usize = 512;
/// Least memory a container may be limited to (as Docker: 6 MiB).
pub const MIN_MEMORY: u64 = 6 << 20;
/// Most memory a limit or reservation may name (1 TiB).
pub const MAX_MEMORY: u64 = 1 << 40;
/// Least CPU a limit or reservation may name (0.01 CPU).
pub const MIN_NANO_CPUS: u64 = 10_000_000;
/// Most CPUs (1024).
pub const MAX_NANO_CPUS: u64 = 1024 * 1_000_000_000;
/// Most processes a limit may name (the kernel's `pid_max` ceiling).
pub const MAX_PIDS: u64 = 4_194_304;
/// Shortest health-check interval and timeout (as Docker: 1 ms; Shoal
/// asks for 100 ms, so that a hostile spec cannot make a node spin).
pub const MIN_HEALTH_MS: u64 = 100;
/// Longest stop grace period (one hour).
pub const MAX_STOP_GRACE_MS: u64 = 3_600_000;

fn check_range(what: &str, v: Option<u64>, min: u64, max: u64) -> Result<(), OutOfBounds> {
    match v {
        Some(v) if !(min..=max).contains(&v) => {
            Err(out(what, format!("{v} is out of range ({min} to {max})")))
        }
        _ => Ok(()),
    }
}

/// A container spec's values; the bytes of its text.
pub fn check_container(c: &crate::service::ContainerSpec) -> Result<usize, OutOfBounds> {
    let mut bytes = check_text("the image", &c.image, MAX_IMAGE, false)?;
    if c.image.is_empty() {
        return Err(out("the image", "empty"));
    }
    if let Some(d) = &c.digest {
        let hex = d.strip_prefix("sha256:").unwrap_or("");
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(out(
                "the image digest",
                format!("`{}` is not sha256:<64 hex digits>", d.escape_debug()),
            ));
        }
    }
    let entrypoint = c.entrypoint.as_deref().unwrap_or_default();
    check_count("--entrypoint's arguments", entrypoint.len(), MAX_ENTRIES)?;
    for arg in entrypoint {
        bytes += check_text("an --entrypoint argument", arg, MAX_VALUE, true)?;
    }
    for (what, v) in [
        ("--user", &c.user),
        ("--workdir", &c.workdir),
        ("--stop-signal", &c.stop_signal),
    ] {
        if let Some(v) = v {
            bytes += check_text(what, v, MAX_KEY, false)?;
        }
    }
    if let Some(h) = &c.hostname {
        bytes += check_text("--hostname", h, MAX_HOSTNAME, false)?;
    }
    for (kind, r) in [("limit", &c.limits), ("reserve", &c.reservations)] {
        check_range(
            &format!("--{kind}-memory"),
            r.memory_bytes,
            MIN_MEMORY,
            MAX_MEMORY,
        )?;
        check_range(
            &format!("--{kind}-cpu"),
            r.nano_cpus,
            MIN_NANO_CPUS,
            MAX_NANO_CPUS,
        )?;
    }
    check_range("--limit-pids", c.limits.pids, 1, MAX_PIDS)?;
    if c.reservations.pids.is_some() {
        return Err(out(
            "--reserve-pids",
            "processes can be limited, not reserved",
        ));
    }
    check_range("--stop-grace-period", c.stop_grace_ms, 0, MAX_STOP_GRACE_MS)?;
    if let Some(h) = &c.healthcheck {
        let test = h.test.as_deref().unwrap_or_default();
        check_count("--health-cmd's arguments", test.len(), MAX_ENTRIES)?;
        for arg in test {
            bytes += check_text("a --health-cmd argument", arg, MAX_VALUE, true)?;
        }
        for (what, v) in [
            ("--health-interval", h.interval_ms),
            ("--health-timeout", h.timeout_ms),
        ] {
            check_range(what, v, MIN_HEALTH_MS, MAX_STOP_GRACE_MS)?;
        }
        check_range(
            "--health-start-period",
            h.start_period_ms,
            0,
            MAX_STOP_GRACE_MS,
        )?;
        check_range("--health-retries", h.retries, 1, 100)?;
    }
    Ok(bytes)
}

/// A network spec's sizes.
pub fn check_network(spec: &NetworkSpec) -> Result<(), OutOfBounds> {
    check_count("--opt", spec.options.len(), MAX_ITEMS)?;
    let mut bytes = check_map("--opt", &spec.options)?;
    bytes += check_map("--label", &spec.labels)?;
    check_count("--subnet", spec.subnets.len(), MAX_ITEMS)?;
    check_count("--aux-address", spec.aux_addresses.len(), MAX_ITEMS)?;
    for k in spec.aux_addresses.keys() {
        bytes += check_text("an --aux-address name", k, MAX_HOSTNAME, false)?;
    }
    check_total("the network's spec", bytes)
}

/// A node's labels: each as [`check_map`], and all together at most
/// [`MAX_SPEC_BYTES`].
pub fn check_node_labels(labels: &BTreeMap<String, String>) -> Result<(), OutOfBounds> {
    let bytes = check_map("node label", labels)?;
    check_total("the node's labels", bytes)
}

fn check_total(what: &str, bytes: usize) -> Result<(), OutOfBounds> {
    if bytes > MAX_SPEC_BYTES {
        return Err(out(
            what,
            format!("{bytes} bytes in all, at most {MAX_SPEC_BYTES} allowed"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_name_files_safely() {
        for good in [
            "a",
            "r1",
            "0123456789abcdef",
            "web_1-x",
            &"f".repeat(MAX_ID),
        ] {
            assert!(check_id("id", good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "../etc",
            "a/b",
            "a b",
            "é",
            "a\0",
            &"f".repeat(MAX_ID + 1),
        ] {
            let e = check_id("task ID", bad).unwrap_err();
            assert!(e.to_string().starts_with("task ID: "), "{e}");
        }
    }

    #[test]
    fn maps_are_bounded_in_count_key_and_value() {
        let mut m = BTreeMap::new();
        m.insert("K".to_owned(), "line 1\nline 2\tand a tab".to_owned());
        assert_eq!(check_map("--env", &m).unwrap(), 1 + 23);
        m.insert("BIG".into(), "x".repeat(MAX_VALUE + 1));
        let e = check_map("--env", &m).unwrap_err().to_string();
        assert!(
            e.contains("--env `BIG`") && e.contains("at most 32768"),
            "{e}"
        );
        m.remove("BIG");
        m.insert("k".repeat(MAX_KEY + 1), "v".into());
        assert!(check_map("--label", &m).is_err());
        let many: BTreeMap<String, String> = (0..=MAX_ENTRIES)
            .map(|i| (format!("K{i}"), String::new()))
            .collect();
        assert!(
            check_map("--env", &many)
                .unwrap_err()
                .problem
                .contains("1025 given")
        );
        let esc: BTreeMap<String, String> = [("K".to_owned(), "\u{1b}[2J".to_owned())].into();
        assert!(
            check_map("--env", &esc)
                .unwrap_err()
                .problem
                .contains("control character")
        );
    }

    #[test]
    fn hostnames_are_short_and_printable() {
        assert!(check_hostname("node-1.example").is_ok());
        for bad in ["", "a b", "a\u{7}", &"h".repeat(MAX_HOSTNAME + 1)] {
            assert!(check_hostname(bad).is_err(), "{bad:?}");
        }
    }
}
