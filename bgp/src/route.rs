//! Routes: what this speaker announces, and what a peer announced to it (its Adj-RIB-In).

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;

/// A prefix this speaker originates, with the attributes it sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Announcement {
    pub prefix: IpNet,
    /// NEXT_HOP (IPv4) or the MP_REACH_NLRI next hop (IPv6).
    pub next_hop: IpAddr,
    /// Our AS repeated this many more times in the AS_PATH (makes the route less preferred).
    pub prepend: u8,
    pub med: Option<u32>,
    /// RFC 1997 communities, as `asn << 16 | value` (65535:0 is GRACEFUL_SHUTDOWN, RFC 8326).
    pub communities: Vec<u32>,
}

impl Announcement {
    /// Checks what the wire needs: a unicast prefix (host bits cleared) and, for IPv4, an IPv4
    /// next hop (IPv6 prefixes take either: an IPv4 one travels v4-mapped).
    pub fn new(
        prefix: IpNet,
        next_hop: IpAddr,
        prepend: u8,
        med: Option<u32>,
        communities: Vec<u32>,
    ) -> Result<Announcement, String> {
        let prefix = prefix.trunc();
        let multicast = match prefix {
            IpNet::V4(n) => n.network().is_multicast(),
            IpNet::V6(n) => n.network().is_multicast(),
        };
        if multicast {
            return Err(format!("{prefix} is a multicast prefix"));
        }
        if prefix.addr().is_ipv4() && !next_hop.is_ipv4() {
            return Err(format!("{prefix} needs an IPv4 next hop, not {next_hop}"));
        }
        Ok(Announcement {
            prefix,
            next_hop,
            prepend,
            med,
            communities,
        })
    }
}

/// A route a peer announced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Route {
    pub prefix: IpNet,
    pub as_path: Vec<u32>,
    pub next_hop: Option<IpAddr>,
    pub med: Option<u32>,
    pub communities: Vec<u32>,
}

/// The routes one peer currently announces to us (RFC 4271's Adj-RIB-In), by prefix.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AdjRibIn {
    routes: BTreeMap<IpNet, Route>,
}

impl AdjRibIn {
    pub fn insert(&mut self, route: Route) {
        self.routes.insert(route.prefix, route);
    }

    pub fn remove(&mut self, prefix: &IpNet) -> Option<Route> {
        self.routes.remove(prefix)
    }

    pub fn get(&self, prefix: &IpNet) -> Option<&Route> {
        self.routes.get(prefix)
    }

    pub fn routes(&self) -> impl Iterator<Item = &Route> {
        self.routes.values()
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// A session that goes down takes its routes with it.
    pub fn clear(&mut self) {
        self.routes.clear();
    }
}

/// Which of a peer's routes the Adj-RIB-In keeps. An upstream that sends a full table sends a
/// million routes; a site needs only those of its own prefixes (the failover's witness).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum RibFilter {
    /// Every route (`bgp speak` without `--keep`).
    #[default]
    All,
    /// Routes for these prefixes or more-specifics of them; the rest are counted and dropped.
    Within(Vec<IpNet>),
}

impl RibFilter {
    pub fn keeps(&self, prefix: &IpNet) -> bool {
        match self {
            RibFilter::All => true,
            RibFilter::Within(prefixes) => prefixes.iter().any(|p| p.contains(prefix)),
        }
    }
}

/// Parses `ASN:VALUE` (each 0 to 65535) or the RFC 8326 name `graceful-shutdown`.
pub fn parse_community(text: &str) -> Result<u32, String> {
    if text == "graceful-shutdown" {
        return Ok(0xffff_0000);
    }
    let (asn, value) = text
        .split_once(':')
        .ok_or_else(|| format!("community {text:?} is not ASN:VALUE"))?;
    let part = |p: &str| {
        p.parse::<u16>()
            .map_err(|_| format!("community {text:?}: {p:?} is not 0 to 65535"))
    };
    Ok(u32::from(part(asn)?) << 16 | u32::from(part(value)?))
}

pub fn format_community(c: u32) -> String {
    format!("{}:{}", c >> 16, c & 0xffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn communities_parse_and_print() {
        assert_eq!(parse_community("65535:0"), Ok(0xffff_0000));
        assert_eq!(parse_community("graceful-shutdown"), Ok(0xffff_0000));
        assert_eq!(parse_community("65001:200"), Ok(65001 << 16 | 200));
        assert_eq!(format_community(65001 << 16 | 200), "65001:200");
        assert!(parse_community("65536:1").is_err());
        assert!(parse_community("1").is_err());
    }
}
