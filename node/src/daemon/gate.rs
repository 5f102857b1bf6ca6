//! What a peer without a certificate may cost a node (docs/security.md):
//! the join protocol is the only one served before authentication, so its
//! connections are counted ([`AnonSlots`]: a cap in all and per source
//! address) and its failed attempts are limited per source
//! ([`JoinFailures`]). Both are pure: the caller passes the time.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Unauthenticated connections served at once, in all.
pub const ANON_TOTAL: usize = 16;
/// Unauthenticated connections served at once from one address.
pub const ANON_PER_SOURCE: usize = 4;
/// Failed join attempts from one address within [`FAILURE_WINDOW`] before
/// its next attempts are refused unread until the window ends.
pub const MAX_FAILURES: u32 = 10;
/// The window failed join attempts are counted in.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Addresses whose failures are remembered at most (the oldest window is
/// forgotten first).
const MAX_SOURCES: usize = 4096;

/// Counts open unauthenticated connections.
#[derive(Debug)]
pub struct AnonSlots {
    total: usize,
    per_source: usize,
    open: HashMap<IpAddr, usize>,
}

impl AnonSlots {
    /// Room for `total` connections, `per_source` from one address.
    pub fn new(total: usize, per_source: usize) -> Self {
        AnonSlots {
            total,
            per_source,
            open: HashMap::new(),
        }
    }

    /// Takes a slot for a connection from `ip`, or says why there is none.
    pub fn enter(&mut self, ip: IpAddr) -> Result<(), &'static str> {
        let in_all: usize = self.open.values().sum();
        let mine = self.open.get(&ip).copied().unwrap_or(0);
        if mine >= self.per_source {
            return Err("too many unauthenticated connections from your address; retry later");
        }
        if in_all >= self.total {
            return Err("too many unauthenticated connections; retry later");
        }
        *self.open.entry(ip).or_default() += 1;
        Ok(())
    }

    /// Gives back a slot taken by [`AnonSlots::enter`].
    pub fn leave(&mut self, ip: IpAddr) {
        if let Some(n) = self.open.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.open.remove(&ip);
            }
        }
    }
}

/// Failed join attempts per source address, in fixed windows.
#[derive(Debug, Default)]
pub struct JoinFailures {
    by_source: HashMap<IpAddr, (Instant, u32)>,
}

impl JoinFailures {
    /// `Err(wait)` when `ip` has failed too often in its current window.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        match self.by_source.get(&ip) {
            Some((start, n)) if *n >= MAX_FAILURES && now < *start + FAILURE_WINDOW => {
                Err(*start + FAILURE_WINDOW - now)
            }
            _ => Ok(()),
        }
    }

    /// Counts a failed attempt from `ip`.
    pub fn failed(&mut self, ip: IpAddr, now: Instant) {
        if self.by_source.len() >= MAX_SOURCES && !self.by_source.contains_key(&ip) {
            self.by_source
                .retain(|_, (start, _)| now < *start + FAILURE_WINDOW);
            if self.by_source.len() >= MAX_SOURCES
                && let Some(oldest) = self
                    .by_source
                    .iter()
                    .min_by_key(|(_, (start, _))| *start)
                    .map(|(ip, _)| *ip)
            {
                self.by_source.remove(&oldest);
            }
        }
        let entry = self.by_source.entry(ip).or_insert((now, 0));
        if now >= entry.0 + FAILURE_WINDOW {
            *entry = (now, 0);
        }
        entry.1 += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    #[test]
    fn slots_are_capped_per_source_and_in_all_and_given_back() {
        let mut s = AnonSlots::new(3, 2);
        assert!(s.enter(ip(1)).is_ok());
        assert!(s.enter(ip(1)).is_ok());
        assert!(s.enter(ip(1)).unwrap_err().contains("from your address"));
        assert!(s.enter(ip(2)).is_ok());
        assert!(s.enter(ip(3)).unwrap_err().contains("too many"));
        s.leave(ip(1));
        assert!(s.enter(ip(3)).is_ok());
        for a in [1, 2, 3] {
            s.leave(ip(a));
        }
        s.leave(ip(9)); // never entered: nothing to give back
        assert!(s.open.is_empty(), "{:?}", s.open);
    }

    #[test]
    fn a_source_that_fails_too_often_waits_for_its_window_to_end() {
        let t0 = Instant::now();
        let mut f = JoinFailures::default();
        for _ in 0..MAX_FAILURES {
            assert!(f.check(ip(1), t0).is_ok());
            f.failed(ip(1), t0);
        }
        let wait = f.check(ip(1), t0 + Duration::from_secs(10)).unwrap_err();
        assert_eq!(wait, FAILURE_WINDOW - Duration::from_secs(10));
        assert!(f.check(ip(2), t0).is_ok(), "other sources are not held");
        assert!(f.check(ip(1), t0 + FAILURE_WINDOW).is_ok());
        // A new window starts from nothing.
        f.failed(ip(1), t0 + FAILURE_WINDOW);
        assert!(f.check(ip(1), t0 + FAILURE_WINDOW).is_ok());
    }

    #[test]
    fn failures_are_remembered_for_a_bounded_number_of_sources() {
        let t0 = Instant::now();
        let mut f = JoinFailures::default();
        for i in 0..(MAX_SOURCES as u32 + 10) {
            let a = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            f.failed(a, t0 + Duration::from_millis(u64::from(i)));
        }
        assert_eq!(f.by_source.len(), MAX_SOURCES);
    }
}
