//! Which hosts may become workers. With no admin key (the default, since slime sends none),
//! anyone who reaches the port can register a worker and then use the router as a proxy to
//! it. So link-local addresses and the cloud metadata endpoints are refused unless
//! `--allow-worker-host` names them; when that flag is given, only the hosts and CIDRs it
//! lists are accepted. A host name is checked by every address it resolves to.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Addresses refused unless allowed by name: IPv4 link-local (the metadata service of
/// AWS, GCP and Azure is 169.254.169.254), IPv6 link-local, and AWS's IPv6 metadata address.
const DENIED: &[(IpAddr, u8)] = &[
    (IpAddr::V4(Ipv4Addr::new(169, 254, 0, 0)), 16),
    (IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0)), 10),
    (
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)),
        128,
    ),
];

#[derive(Debug, Clone, PartialEq, Eq)]
enum Allowed {
    Net(IpAddr, u8),
    Name(String),
}

/// The `--allow-worker-host` list.
#[derive(Debug, Clone, Default)]
pub struct WorkerHosts {
    allowed: Vec<Allowed>,
}

impl WorkerHosts {
    /// Parses host names, addresses and CIDRs (`10.0.0.0/8`, `fd00::/8`).
    pub fn parse(list: &[String]) -> Result<Self, String> {
        let allowed = list
            .iter()
            .map(|item| allowed(item.trim()))
            .collect::<Result<_, _>>()?;
        Ok(Self { allowed })
    }

    /// Whether `host` (as in a worker url, IPv6 without brackets) may be registered, given the
    /// addresses it resolves to; the error says why not and how to allow it.
    pub fn check(&self, host: &str, addresses: &[IpAddr]) -> Result<(), String> {
        let named = self
            .allowed
            .iter()
            .any(|a| matches!(a, Allowed::Name(n) if n.eq_ignore_ascii_case(host)));
        if named {
            return Ok(());
        }
        for &address in addresses {
            let address = canonical(address);
            let listed = self.allowed.iter().any(|a| match a {
                Allowed::Net(net, bits) => contains(*net, *bits, address),
                Allowed::Name(_) => false,
            });
            if !self.allowed.is_empty() && !listed {
                return Err(format!(
                    "worker host {host} ({address}) is not in --allow-worker-host"
                ));
            }
            if !listed
                && DENIED
                    .iter()
                    .any(|(net, bits)| contains(*net, *bits, address))
            {
                return Err(format!(
                    "worker host {host} ({address}) is link-local or a cloud metadata address; \
                     name it in --allow-worker-host to register it"
                ));
            }
        }
        Ok(())
    }
}

fn allowed(item: &str) -> Result<Allowed, String> {
    let bad = || format!("--allow-worker-host: {item:?} is not a host, address or CIDR");
    let (address, bits) = match item.split_once('/') {
        Some((address, bits)) => (address, Some(bits.parse::<u8>().map_err(|_| bad())?)),
        None => (item, None),
    };
    let address = address.trim_start_matches('[').trim_end_matches(']');
    match (address.parse::<IpAddr>(), bits) {
        (Ok(ip), bits) => {
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let bits = bits.unwrap_or(max);
            if bits > max {
                return Err(bad());
            }
            Ok(Allowed::Net(canonical(ip), bits))
        }
        (Err(_), None) if !item.is_empty() => Ok(Allowed::Name(item.to_ascii_lowercase())),
        _ => Err(bad()),
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
fn canonical(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(address, IpAddr::V4),
        v4 => v4,
    }
}

fn contains(net: IpAddr, bits: u8, address: IpAddr) -> bool {
    let (net, address, width) = match (net, address) {
        (IpAddr::V4(n), IpAddr::V4(a)) => (u128::from(n.to_bits()), u128::from(a.to_bits()), 32),
        (IpAddr::V6(n), IpAddr::V6(a)) => (n.to_bits(), a.to_bits(), 128),
        _ => return false,
    };
    let shift = width - u32::from(bits.min(width as u8));
    let mask = if shift >= 128 { 0 } else { u128::MAX << shift };
    (net & mask) == (address & mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn metadata_and_link_local_are_refused_by_default() {
        let open = WorkerHosts::default();
        for bad in [
            "169.254.169.254",
            "169.254.1.2",
            "fe80::1",
            "fd00:ec2::254",
            "::ffff:169.254.169.254",
        ] {
            assert!(open.check(bad, &[ip(bad)]).is_err(), "{bad}");
        }
        for good in ["127.0.0.1", "10.1.2.3", "::1", "fd00:ec2::253"] {
            assert!(open.check(good, &[ip(good)]).is_ok(), "{good}");
        }
    }

    #[test]
    fn the_allow_list_names_hosts_and_cidrs() {
        let list = [
            "10.0.0.0/8",
            "metadata.internal",
            "169.254.169.254",
            "fd00::/8",
        ];
        let hosts = WorkerHosts::parse(&list.map(String::from)).unwrap();
        assert!(hosts.check("10.9.9.9", &[ip("10.9.9.9")]).is_ok());
        assert!(hosts.check("11.0.0.1", &[ip("11.0.0.1")]).is_err());
        assert!(
            hosts
                .check("Metadata.Internal", &[ip("169.254.1.1")])
                .is_ok()
        );
        assert!(
            hosts
                .check("169.254.169.254", &[ip("169.254.169.254")])
                .is_ok()
        );
        assert!(hosts.check("169.254.0.1", &[ip("169.254.0.1")]).is_err());
        assert!(hosts.check("fd00::5", &[ip("fd00::5")]).is_ok());
        let mixed = [ip("10.0.0.1"), ip("192.168.0.1")];
        assert!(
            hosts.check("both", &mixed).is_err(),
            "every address must be allowed"
        );
        for bad in ["10.0.0.0/33", "::/129", "", "a/b"] {
            assert!(WorkerHosts::parse(&[bad.to_owned()]).is_err(), "{bad}");
        }
    }
}
