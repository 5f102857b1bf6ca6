//! Which ports a network namespace listens on, read the way `ss -ltun`
//! does from `/proc/net/{tcp,tcp6,udp,udp6}`, seen from a thread inside the
//! namespace. The data plane holds a new task out of its service's load
//! balancers until it listens on the service's target ports (or a limit
//! passes), so that the first connections to a replacement are not
//! refused.

use std::collections::BTreeSet;
use std::path::PathBuf;

use crate::DpError;

/// The TCP ports in LISTEN and the UDP ports bound (not connected), on a
/// non-loopback (or wildcard) address.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listeners {
    /// TCP ports listened on.
    pub tcp: BTreeSet<u16>,
    /// UDP ports bound.
    pub udp: BTreeSet<u16>,
}

/// TCP state LISTEN and UDP's "unconnected" state in `/proc/net/*`.
const TCP_LISTEN: &str = "0A";
const UDP_UNCONNECTED: &str = "07";

/// Whether a `/proc/net` local address (hex, the kernel's byte order) is a
/// loopback one: 127.0.0.0/8, `::1`, or `::ffff:127.x.y.z`.
fn loopback(hex: &str) -> bool {
    match hex.len() {
        8 => hex.ends_with("7F"),
        32 => {
            hex == "00000000000000000000000001000000"
                || (hex.starts_with("0000000000000000FFFF0000") && hex.ends_with("7F"))
        }
        _ => false,
    }
}

/// The ports of the sockets in `state` in one `/proc/net/{tcp,udp}[6]`
/// text, skipping loopback ones and lines that do not parse.
pub fn parse(text: &str, state: &str) -> BTreeSet<u16> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut cols = line.split_whitespace();
            let local = cols.nth(1)?;
            let st = cols.nth(1)?;
            let (addr, port) = local.split_once(':')?;
            (st == state && !loopback(addr))
                .then(|| u16::from_str_radix(port, 16).ok())
                .flatten()
        })
        .collect()
}

/// What the namespace at `netns` (a `/run/netns` path) listens on.
pub fn in_namespace(netns: PathBuf) -> Result<Listeners, DpError> {
    crate::linux::in_netns(Some(netns), || {
        let read = |f: &str| std::fs::read_to_string(format!("/proc/thread-self/net/{f}"));
        let mut out = Listeners::default();
        for f in ["tcp", "tcp6"] {
            out.tcp
                .extend(parse(&read(f).unwrap_or_default(), TCP_LISTEN));
        }
        for f in ["udp", "udp6"] {
            out.udp
                .extend(parse(&read(f).unwrap_or_default(), UDP_UNCONNECTED));
        }
        Ok(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0B00007F:0035 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0
   2: 0300000A:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 3 1 0 100 0 0 10 0
   3: 0300000A:C350 0200000A:0050 01 00000000:00000000 00:00000000 00000000     0        0 4 1 0 100 0 0 10 0
";

    #[test]
    fn listening_ports_on_non_loopback_addresses_count() {
        // 127.0.0.11:53 (the embedded DNS) and an established connection
        // do not; *:80 and 10.0.0.3:8080 do.
        assert_eq!(parse(TCP, TCP_LISTEN), BTreeSet::from([80, 8080]));
        let tcp6 = "header\n   0: 00000000000000000000000001000000:0016 00000000000000000000000000000000:0000 0A 0\n   1: 00000000000000000000000000000000:01BB 00000000000000000000000000000000:0000 0A 0\n   2: 0000000000000000FFFF00000100007F:0017 00000000000000000000000000000000:0000 0A 0\n";
        assert_eq!(parse(tcp6, TCP_LISTEN), BTreeSet::from([443]));
        let udp = "header\n  1: 00000000:14E9 00000000:0000 07 0\n  2: 0300000A:1000 0200000A:0035 01 0\n";
        assert_eq!(parse(udp, UDP_UNCONNECTED), BTreeSet::from([5353]));
    }

    #[test]
    fn garbage_parses_to_nothing_and_never_panics() {
        for text in [
            "",
            "header only",
            "h\n0: zz:zz 0 0A",
            "h\n0: 00000000:FFFFF 0 0A",
            "h\n0:",
            "h\n 0: 00000000 00000000:0000 0A",
            "h\n\u{0}\u{ff}:: :: ::",
        ] {
            assert!(parse(text, TCP_LISTEN).is_empty(), "{text:?}");
        }
    }
}
