//! A sliding-window limit per client, kept in this process: each API pod counts for
//! itself, so with N pods a client gets up to N times the limit. It takes no lock or
//! query in the control database, so a burst costs the database nothing.
//!
//! Who the client is: the peer's address, or, when the peer is a trusted proxy
//! (`CAPY_TRUSTED_PROXIES`), the right-most `X-Forwarded-For` address that is not one
//! of them ([`client_ip`]). An IPv6 client is counted by its /64, which one host
//! usually holds whole ([`limit_key`]).

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr};
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(60);
/// Clients tracked at most: a bound on memory (about 0.5 KiB each at 30 a minute).
const MAX_CLIENTS: usize = 100_000;
/// When the table is full, idle clients are swept out at most this often: a sweep
/// visits every entry, so it must not run on every request.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// Why a request was refused, with the wait until one may pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limited {
    /// This client made its requests of the last minute.
    Client(Duration),
    /// So many clients are tracked that no new one is until the next sweep; clients
    /// already tracked are unaffected.
    Full(Duration),
}

#[derive(Debug)]
pub struct RateLimiter {
    capacity: usize,
    table: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    hits: HashMap<String, VecDeque<Instant>>,
    last_sweep: Option<Instant>,
}

impl Default for RateLimiter {
    fn default() -> Self {
        Self::with_capacity(MAX_CLIENTS)
    }
}

impl RateLimiter {
    /// A limiter tracking at most `capacity` clients.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            capacity,
            table: Mutex::default(),
        }
    }

    /// Counts a request of `client`; refused when it already made `per_minute` in the
    /// last minute, or when it is new and the table is full.
    pub fn check(&self, client: &str, per_minute: i64) -> Result<(), Limited> {
        self.check_at(client, per_minute, Instant::now())
    }

    fn check_at(&self, client: &str, per_minute: i64, now: Instant) -> Result<(), Limited> {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if !table.hits.contains_key(client) && table.hits.len() >= self.capacity {
            table.sweep(now, self.capacity)?;
        }
        let times = table.hits.entry(client.to_string()).or_default();
        while times.front().is_some_and(|t| now - *t >= WINDOW) {
            times.pop_front();
        }
        if i64::try_from(times.len()).unwrap_or(i64::MAX) >= per_minute {
            let oldest = times.front().copied().unwrap_or(now);
            return Err(Limited::Client(WINDOW.saturating_sub(now - oldest)));
        }
        times.push_back(now);
        Ok(())
    }
}

impl Table {
    /// Forgets the clients idle for a whole window, at most once per [`SWEEP_EVERY`];
    /// `Err` when no sweep is due yet or the table is still full after one.
    fn sweep(&mut self, now: Instant, capacity: usize) -> Result<(), Limited> {
        if let Some(last) = self.last_sweep {
            let due = last + SWEEP_EVERY;
            if now < due {
                return Err(Limited::Full(due - now));
            }
        }
        self.last_sweep = Some(now);
        self.hits
            .retain(|_, times| times.back().is_some_and(|t| now - *t < WINDOW));
        if self.hits.len() >= capacity {
            return Err(Limited::Full(SWEEP_EVERY));
        }
        Ok(())
    }
}

/// The header proxies append the address of their peer to.
pub const FORWARDED_FOR: &str = "x-forwarded-for";

/// An address block such as `10.0.0.0/8` or `fd00::/8`; a bare address is a block of
/// one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn contains(&self, address: IpAddr) -> bool {
        match (self.network, canonical(address)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => prefix_eq(
                u128::from(u32::from(net)) << 96,
                u128::from(u32::from(ip)) << 96,
                self.prefix,
            ),
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_eq(u128::from(net), u128::from(ip), self.prefix)
            }
            _ => false,
        }
    }
}

/// Whether the first `prefix` bits of `a` and `b` (left-aligned) are equal.
fn prefix_eq(a: u128, b: u128, prefix: u8) -> bool {
    let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
    a & mask == b & mask
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let network = canonical(
            address
                .parse::<IpAddr>()
                .map_err(|_| format!("{text:?} is not an address or CIDR block"))?,
        );
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{text:?}: the prefix length must be 0 to {max}"))?,
        };
        Ok(Self { network, prefix })
    }
}

/// An IPv4 address written as IPv6 (`::ffff:1.2.3.4`, as a dual-stack socket reports
/// it) is the IPv4 address.
fn canonical(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(address, IpAddr::V4),
        v4 => v4,
    }
}

/// One `X-Forwarded-For` entry: an address, possibly with a port (`1.2.3.4:5`,
/// `[::1]:5`) as some proxies write it.
fn parse_forwarded(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    entry
        .parse::<IpAddr>()
        .or_else(|_| entry.parse::<std::net::SocketAddr>().map(|s| s.ip()))
        .ok()
        .map(canonical)
}

/// The client's address. From a peer that is not a trusted proxy, the peer itself:
/// `X-Forwarded-For` is whatever the client wrote. From a trusted proxy, the
/// `X-Forwarded-For` entries (all headers, in order) are read right to left, each
/// appended by the hop after it, and the first one that is not a trusted proxy is the
/// client; should none be (or an entry be unreadable), the last trusted hop read.
pub fn client_ip<'a>(
    peer: IpAddr,
    forwarded_for: impl Iterator<Item = &'a str>,
    trusted: &[Cidr],
) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|cidr| cidr.contains(ip));
    let mut client = canonical(peer);
    if !is_trusted(client) {
        return client;
    }
    let entries: Vec<&str> = forwarded_for.flat_map(|h| h.split(',')).collect();
    for entry in entries.iter().rev() {
        let Some(hop) = parse_forwarded(entry) else {
            break;
        };
        client = hop;
        if !is_trusted(hop) {
            break;
        }
    }
    client
}

/// The coarser block the cap of live instant databases also counts `client` under: an
/// IPv4 address whole, an IPv6 address by its /48 (a site's usual allocation: its
/// 65,536 /64s would otherwise each get the per-client cap).
pub fn site_key(client: IpAddr) -> String {
    match canonical(client) {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => {
            let network = Ipv6Addr::from(u128::from(v6) & (u128::MAX << 80));
            format!("{network}/48")
        }
    }
}

/// The key the rate limit counts `client` under: an IPv4 address whole, an IPv6
/// address by its /64 (one host commonly holds a whole /64 and may pick any address in
/// it).
pub fn limit_key(client: IpAddr) -> String {
    match canonical(client) {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => {
            let network = Ipv6Addr::from(u128::from(v6) & (u128::MAX << 64));
            format!("{network}/64")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidrs(list: &[&str]) -> Vec<Cidr> {
        list.iter().map(|c| c.parse().unwrap()).collect()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn cidr_blocks_parse_and_contain() {
        let block: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(block.contains(ip("10.1.200.3")));
        assert!(!block.contains(ip("10.2.0.1")));
        assert!(block.contains(ip("::ffff:10.1.0.9")), "IPv4-mapped");
        let one: Cidr = "192.168.1.1".parse().unwrap();
        assert!(one.contains(ip("192.168.1.1")) && !one.contains(ip("192.168.1.2")));
        let v6: Cidr = "fd00:1::/32".parse().unwrap();
        assert!(v6.contains(ip("fd00:1:ffff::1")) && !v6.contains(ip("fd00:2::1")));
        assert!(!v6.contains(ip("10.1.0.1")));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("8.8.8.8")));
        for bad in [
            "",
            "10.0.0.0/33",
            "::/129",
            "10.0.0/8",
            "x/8",
            "10.0.0.0/-1",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ipv6_clients_are_keyed_by_their_64() {
        let a = limit_key(ip("2001:db8:1:2:aaaa::1"));
        assert_eq!(a, "2001:db8:1:2::/64");
        assert_eq!(limit_key(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")), a);
        assert_ne!(limit_key(ip("2001:db8:1:3::1")), a);
        assert_eq!(limit_key(ip("203.0.113.7")), "203.0.113.7");
        assert_eq!(limit_key(ip("::ffff:203.0.113.7")), "203.0.113.7");
        // So one host rotating through its /64 gets one limit.
        let limiter = RateLimiter::default();
        assert!(limiter.check(&limit_key(ip("2001:db8::1")), 1).is_ok());
        assert!(limiter.check(&limit_key(ip("2001:db8::2")), 1).is_err());
        // The cap's coarser block: a /48.
        assert_eq!(site_key(ip("2001:db8:1:2:aaaa::1")), "2001:db8:1::/48");
        assert_eq!(site_key(ip("2001:db8:1:ffff::9")), "2001:db8:1::/48");
        assert_ne!(site_key(ip("2001:db8:2::1")), "2001:db8:1::/48");
        assert_eq!(site_key(ip("::ffff:203.0.113.7")), "203.0.113.7");
    }

    #[test]
    fn a_full_table_refuses_new_clients_and_sweeps_at_most_once_per_interval() {
        let limiter = RateLimiter::with_capacity(3);
        let start = Instant::now();
        for client in ["a", "b", "c"] {
            assert!(limiter.check_at(client, 5, start).is_ok());
        }
        // Full of live clients: the sweep frees nothing, so the new one is refused...
        let at = start + Duration::from_secs(1);
        assert_eq!(
            limiter.check_at("d", 5, at),
            Err(Limited::Full(SWEEP_EVERY))
        );
        // ... and, until the next sweep is due, refused without another one.
        let soon = at + Duration::from_secs(2);
        assert_eq!(
            limiter.check_at("e", 5, soon),
            Err(Limited::Full(Duration::from_secs(3)))
        );
        assert_eq!(
            limiter.table.lock().unwrap().last_sweep,
            Some(at),
            "swept again before its interval"
        );
        // Clients already tracked keep their limit.
        assert!(limiter.check_at("a", 5, soon).is_ok());
        // Once b has been idle a whole window, the next sweep forgets it for d; the
        // table is full again, and e waits for the sweep after.
        let later = start + WINDOW + Duration::from_secs(1);
        assert!(limiter.check_at("c", 5, start + WINDOW).is_ok());
        assert!(limiter.check_at("d", 5, later).is_ok());
        assert_eq!(
            limiter.check_at("e", 5, later),
            Err(Limited::Full(SWEEP_EVERY))
        );
        let table = limiter.table.lock().unwrap();
        let mut tracked: Vec<&str> = table.hits.keys().map(String::as_str).collect();
        tracked.sort_unstable();
        assert_eq!(tracked, ["a", "c", "d"]);
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let trusted = cidrs(&["10.0.0.0/8", "fd00::/8"]);
        let headers = ["6.6.6.6, 1.2.3.4"];
        // A spoofed header from a client connecting directly: ignored.
        let peer = ip("198.51.100.9");
        assert_eq!(client_ip(peer, headers.into_iter(), &trusted), peer);
        // Without trusted proxies, never read.
        assert_eq!(
            client_ip(ip("10.0.0.1"), headers.into_iter(), &[]),
            ip("10.0.0.1")
        );
        // Through a trusted proxy: the right-most untrusted entry, not the spoofed one
        // the client put in front.
        assert_eq!(
            client_ip(ip("10.0.0.1"), headers.into_iter(), &trusted),
            ip("1.2.3.4")
        );
        // Through two trusted hops, over several headers.
        let chain = ["6.6.6.6", "2001:db8::5, 10.9.9.9", "fd00::7"];
        assert_eq!(
            client_ip(ip("10.0.0.1"), chain.into_iter(), &trusted),
            ip("2001:db8::5")
        );
        // Ports, spaces and IPv4-mapped addresses.
        let ported = ["[2001:db8::9]:443 , 1.2.3.4:5678"];
        assert_eq!(
            client_ip(ip("::ffff:10.0.0.1"), ported.into_iter(), &trusted),
            ip("1.2.3.4")
        );
        // Nothing but trusted hops, or garbage next to them: the last trusted hop.
        assert_eq!(
            client_ip(ip("10.0.0.1"), ["10.0.0.2"].into_iter(), &trusted),
            ip("10.0.0.2")
        );
        assert_eq!(
            client_ip(
                ip("10.0.0.1"),
                ["1.2.3.4, garbage, 10.0.0.3"].into_iter(),
                &trusted
            ),
            ip("10.0.0.3")
        );
        // No header from a trusted proxy: the proxy.
        assert_eq!(
            client_ip(ip("10.0.0.1"), std::iter::empty(), &trusted),
            ip("10.0.0.1")
        );
    }

    #[test]
    fn a_client_gets_its_limit_and_others_theirs() {
        let limiter = RateLimiter::default();
        assert!(limiter.check("a", 2).is_ok());
        assert!(limiter.check("a", 2).is_ok());
        let Err(Limited::Client(wait)) = limiter.check("a", 2) else {
            panic!("a third request passed");
        };
        assert!(wait > Duration::from_secs(59) && wait <= WINDOW, "{wait:?}");
        assert!(limiter.check("b", 2).is_ok());
    }
}
