//! Where the gateway may connect on a seller's behalf. A seller chooses the base URL of their key, so
//! without a check they could point the gateway (and its verification and balance probes) at the
//! platform's own network: loopback services, the cloud metadata endpoint, private subnets.
//!
//! Hosts are resolved first and every resolved address is checked, so spellings such as `127.1`,
//! `2130706433`, `0x7f.1` or `[::ffff:127.0.0.1]` are judged by the address they reach, not by their text.
//! The gateway then connects to the checked address it resolved (the pool pins it), so a DNS answer that
//! changes after the check (rebinding) is judged again at the next resolution instead of being followed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

/// Networks an operator allows although they are internal (e.g. a provider proxy on the private network,
/// or the loopback mock upstream in tests). Empty by default.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UpstreamPolicy {
    allow: Vec<Cidr>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SsrfError {
    #[error(
        "the base URL's host {host} resolves to {addr}, a {kind} address; seller keys may only reach public addresses"
    )]
    Forbidden { host: String, addr: IpAddr, kind: &'static str },
    #[error("the base URL's host {0} does not resolve")]
    Unresolvable(String),
}

/// An IPv4 or IPv6 network in CIDR notation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let net: IpAddr = addr.trim().parse().map_err(|_| format!("{s:?} is not an IP address or network"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.trim().parse::<u8>().ok().filter(|p| *p <= max).ok_or(format!("{s:?} has a bad prefix"))?,
            None => max,
        };
        Ok(Self { net, prefix })
    }
}

impl Cidr {
    fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => prefix_eq(&net.octets(), &ip.octets(), self.prefix),
            (IpAddr::V6(net), IpAddr::V6(ip)) => prefix_eq(&net.octets(), &ip.octets(), self.prefix),
            _ => false,
        }
    }
}

fn prefix_eq(a: &[u8], b: &[u8], prefix: u8) -> bool {
    let (whole, rest) = (usize::from(prefix / 8), prefix % 8);
    if a[..whole] != b[..whole] {
        return false;
    }
    rest == 0 || {
        let mask = 0xffu8 << (8 - rest);
        a[whole] & mask == b[whole] & mask
    }
}

impl UpstreamPolicy {
    /// Parses a comma-separated list of addresses and CIDR networks (`127.0.0.0/8, ::1`).
    pub fn parse(list: &str) -> Result<Self, String> {
        let allow =
            list.split(',').map(str::trim).filter(|s| !s.is_empty()).map(Cidr::from_str).collect::<Result<_, _>>()?;
        Ok(Self { allow })
    }

    /// Checks one address the gateway would connect to.
    pub fn check(&self, host: &str, addr: IpAddr) -> Result<(), SsrfError> {
        let addr = canonical(addr);
        match forbidden_kind(addr) {
            Some(kind) if !self.allow.iter().any(|c| c.contains(addr)) => {
                Err(SsrfError::Forbidden { host: host.to_string(), addr, kind })
            }
            _ => Ok(()),
        }
    }

    /// Resolves `host` and checks every address it resolves to; returns the first.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<SocketAddr, SsrfError> {
        let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => {
                let lookup = tokio::net::lookup_host((host, port));
                match tokio::time::timeout(std::time::Duration::from_secs(5), lookup).await {
                    Ok(Ok(addrs)) => addrs.collect(),
                    _ => Vec::new(),
                }
            }
        };
        // Every answer must pass: a name that resolves to one public and one internal address is refused,
        // whichever the connection would have used.
        for addr in &addrs {
            self.check(host, addr.ip())?;
        }
        addrs.first().copied().ok_or_else(|| SsrfError::Unresolvable(host.to_string()))
    }
}

/// IPv4 addresses written as IPv6 (mapped or compatible) are judged as the IPv4 address they are.
fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                // ::a.b.c.d (deprecated IPv4-compatible) and NAT64 64:ff9b::a.b.c.d reach an IPv4 address too.
                let compatible = s[..6] == [0; 6] && (s[6] != 0 || s[7] > 1);
                let nat64 = s[..6] == [0x64, 0xff9b, 0, 0, 0, 0];
                if compatible || nat64 {
                    let [a, b] = s[6].to_be_bytes();
                    let [c, d] = s[7].to_be_bytes();
                    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
                } else {
                    IpAddr::V6(v6)
                }
            }
        },
        v4 => v4,
    }
}

/// Why an address is internal, or None for a public address.
fn forbidden_kind(addr: IpAddr) -> Option<&'static str> {
    match addr {
        IpAddr::V4(ip) => forbidden_v4(ip),
        IpAddr::V6(ip) => forbidden_v6(ip),
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    Some(match (a, b) {
        _ if ip.is_loopback() => "loopback",
        _ if ip.is_unspecified() || a == 0 => "unspecified (\"this network\")",
        (169, 254) => "link-local (cloud metadata)",
        _ if ip.is_private() => "private",
        (100, 64..=127) => "carrier-grade NAT (also cloud metadata)",
        (192, 0) if c == 0 => "IETF protocol assignment",
        (198, 18..=19) => "benchmarking",
        _ if ip.is_multicast() => "multicast",
        _ if ip.is_broadcast() || a >= 240 => "reserved",
        _ if ip.is_documentation() => "documentation",
        _ => return None,
    })
}

fn forbidden_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let first = ip.segments()[0];
    Some(match first {
        _ if ip.is_loopback() => "loopback",
        _ if ip.is_unspecified() => "unspecified",
        0xfe80..=0xfebf => "link-local",
        0xfec0..=0xfeff => "site-local",
        0xfc00..=0xfdff => "unique local (private, also cloud metadata)",
        0xff00..=0xffff => "multicast",
        0x2001 if ip.segments()[1] == 0x0db8 => "documentation",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(policy: &UpstreamPolicy, addr: &str) -> bool {
        policy.check("h", addr.parse().unwrap()).is_err()
    }

    #[test]
    fn internal_addresses_are_refused_by_default() {
        let p = UpstreamPolicy::default();
        for addr in [
            "127.0.0.1",
            "127.9.9.9",
            "0.0.0.0",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.100.100.200",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "fd00:ec2::254",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
        ] {
            assert!(refused(&p, addr), "{addr} was allowed");
        }
        for addr in ["8.8.8.8", "104.18.6.192", "172.32.0.1", "2606:4700::6810:84e5", "::ffff:8.8.8.8"] {
            assert!(!refused(&p, addr), "{addr} was refused");
        }
    }

    #[test]
    fn the_allow_list_admits_networks() {
        let p = UpstreamPolicy::parse("127.0.0.0/8, ::1, 10.0.0.0/9").unwrap();
        assert!(!refused(&p, "127.0.0.1"));
        assert!(!refused(&p, "::1"));
        assert!(!refused(&p, "::ffff:127.0.0.1"));
        assert!(!refused(&p, "10.127.0.1"));
        assert!(refused(&p, "10.128.0.1"));
        assert!(refused(&p, "169.254.169.254"));
        assert!(UpstreamPolicy::parse("10.0.0.0/33").is_err());
        assert!(UpstreamPolicy::parse("localhost").is_err());
        assert_eq!(UpstreamPolicy::parse(" ").unwrap(), UpstreamPolicy::default());
    }

    #[tokio::test]
    async fn odd_spellings_are_judged_by_what_they_resolve_to() {
        let p = UpstreamPolicy::default();
        // getaddrinfo reads these the way inet_aton does.
        for host in ["127.1", "2130706433", "0x7f.1", "0177.0.0.1", "localhost"] {
            match p.resolve(host, 80).await {
                Err(SsrfError::Forbidden { .. }) | Err(SsrfError::Unresolvable(_)) => {}
                Ok(addr) => panic!("{host} resolved to {addr} and was allowed"),
            }
        }
        assert!(matches!(p.resolve("127.1", 80).await, Err(SsrfError::Forbidden { kind: "loopback", .. })));
        let loopback = UpstreamPolicy::parse("127.0.0.0/8").unwrap();
        assert_eq!(loopback.resolve("127.1", 81).await.unwrap(), "127.0.0.1:81".parse().unwrap());
    }
}
