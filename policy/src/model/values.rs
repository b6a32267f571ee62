//! Value types of the policy that are strings in YAML: names, prefixes, MAC addresses,
//! communities, socket addresses. Each parses with `FromStr` (serde goes through it) and describes
//! itself in the JSON Schema with a `format` or `pattern` that the structural check enforces.

use std::borrow::Cow;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use ipnet::IpNet;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// Implements serde through `FromStr`/`Display`, and `JsonSchema` as a string with `format`.
macro_rules! string_value {
    ($ty:ident, $format:literal, $what:literal) => {
        impl Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = Cow::<str>::deserialize(d)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
        impl JsonSchema for $ty {
            fn schema_name() -> Cow<'static, str> {
                stringify!($ty).into()
            }
            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                json_schema!({ "type": "string", "format": $format, "description": $what })
            }
        }
    };
}

/// The error of parsing one of these values: says what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{text}` is not {expected}")]
pub struct ValueError {
    text: String,
    expected: &'static str,
}

impl ValueError {
    fn new(text: &str, expected: &'static str) -> Self {
        ValueError {
            text: text.to_owned(),
            expected,
        }
    }
}

/// A name of a site, group or VM: lower-case letters, digits and `-`, 1 to 63 characters, not
/// starting or ending with `-` (a DNS label, so it can name files, metrics and hosts).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name(String);

impl Name {
    pub const PATTERN: &'static str = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$";
    pub const EXPECTED: &'static str = "a valid name (lower-case letters, digits and '-', 1 to 63 characters, not starting or \
         ending with '-')";

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Name {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, ValueError> {
        let b = s.as_bytes();
        let ok = (1..=63).contains(&b.len())
            && b.iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
            && b[0] != b'-'
            && b[b.len() - 1] != b'-';
        if ok {
            Ok(Name(s.to_owned()))
        } else {
            Err(ValueError::new(s, Self::EXPECTED))
        }
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for Name {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = Cow::<str>::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Name {
    fn schema_name() -> Cow<'static, str> {
        "Name".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": Self::PATTERN,
            "description": "lower-case letters, digits and '-', 1 to 63 characters"
        })
    }
}

/// An IP prefix (network), IPv4 or IPv6: `203.0.113.0/24`, `2001:db8:113::/48`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix(pub IpNet);

impl Prefix {
    pub const FORMAT: &'static str = "ip-prefix";
    pub const EXPECTED: &'static str = "an IP prefix (like 203.0.113.0/24 or 2001:db8:113::/48)";

    /// Whether bits are set past the prefix length (`203.0.113.5/24`).
    pub fn has_host_bits(&self) -> bool {
        self.0.addr() != self.0.network()
    }

    pub fn contains(&self, addr: &IpAddr) -> bool {
        self.0.contains(addr)
    }

    pub fn is_ipv4(&self) -> bool {
        matches!(self.0, IpNet::V4(_))
    }

    pub fn prefix_len(&self) -> u8 {
        self.0.prefix_len()
    }

    /// The prefix's first address (host bits clear).
    pub fn network(&self) -> IpAddr {
        self.0.network()
    }
}

impl FromStr for Prefix {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, ValueError> {
        s.parse::<IpNet>()
            .map(Prefix)
            .map_err(|_| ValueError::new(s, Self::EXPECTED))
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

string_value!(
    Prefix,
    "ip-prefix",
    "an IPv4 or IPv6 prefix, address/length"
);

/// An interface address with its prefix length: `10.0.1.2/30`, `fd00:1::2/64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct InterfaceAddress(pub IpNet);

impl InterfaceAddress {
    pub const FORMAT: &'static str = "ip-interface";
    pub const EXPECTED: &'static str =
        "an interface address with prefix length (like 10.0.1.2/30 or fd00:1::2/64)";

    pub fn addr(&self) -> IpAddr {
        self.0.addr()
    }

    /// Whether `peer` is on this interface's subnet (directly connected).
    pub fn is_on_link(&self, peer: &IpAddr) -> bool {
        self.0.contains(peer)
    }
}

impl FromStr for InterfaceAddress {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, ValueError> {
        s.parse::<IpNet>()
            .map(InterfaceAddress)
            .map_err(|_| ValueError::new(s, Self::EXPECTED))
    }
}

impl fmt::Display for InterfaceAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

string_value!(
    InterfaceAddress,
    "ip-interface",
    "an interface address with prefix length"
);

/// An Ethernet MAC address, `52:54:00:12:34:56`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MacAddress(pub [u8; 6]);

impl MacAddress {
    pub const FORMAT: &'static str = "mac-address";
    pub const EXPECTED: &'static str = "a MAC address (six hex pairs like 52:54:00:12:34:56)";

    /// Multicast (group) bit: such an address cannot be a NIC's own.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }
}

impl FromStr for MacAddress {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, ValueError> {
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut mac {
            let part = parts
                .next()
                .ok_or_else(|| ValueError::new(s, Self::EXPECTED))?;
            if part.len() != 2 {
                return Err(ValueError::new(s, Self::EXPECTED));
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| ValueError::new(s, Self::EXPECTED))?;
        }
        if parts.next().is_some() {
            return Err(ValueError::new(s, Self::EXPECTED));
        }
        Ok(MacAddress(mac))
    }
}

impl fmt::Display for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

string_value!(MacAddress, "mac-address", "an Ethernet MAC address");

/// A BGP community (RFC 1997): `ASN:VALUE`, or a well-known name such as `graceful-shutdown`
/// (65535:0, RFC 8326) or `no-export` (65535:65281).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Community(pub u32);

impl Community {
    pub const FORMAT: &'static str = "bgp-community";
    pub const EXPECTED: &'static str = "a BGP community (ASN:VALUE with each part 0-65535, or \
         graceful-shutdown, no-export, no-advertise, no-export-subconfed, blackhole)";
    const WELL_KNOWN: [(&'static str, u32); 5] = [
        ("graceful-shutdown", 0xFFFF_0000),
        ("blackhole", 0xFFFF_029A),
        ("no-export", 0xFFFF_FF01),
        ("no-advertise", 0xFFFF_FF02),
        ("no-export-subconfed", 0xFFFF_FF03),
    ];

    pub fn asn(&self) -> u16 {
        (self.0 >> 16) as u16
    }

    pub fn value(&self) -> u16 {
        self.0 as u16
    }
}

impl FromStr for Community {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, ValueError> {
        if let Some((_, v)) = Self::WELL_KNOWN.iter().find(|(n, _)| *n == s) {
            return Ok(Community(*v));
        }
        let (asn, value) = s
            .split_once(':')
            .ok_or_else(|| ValueError::new(s, Self::EXPECTED))?;
        let asn: u16 = asn
            .parse()
            .map_err(|_| ValueError::new(s, Self::EXPECTED))?;
        let value: u16 = value
            .parse()
            .map_err(|_| ValueError::new(s, Self::EXPECTED))?;
        Ok(Community((u32::from(asn) << 16) | u32::from(value)))
    }
}

impl fmt::Display for Community {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match Self::WELL_KNOWN.iter().find(|(_, v)| *v == self.0) {
            Some((name, _)) => f.write_str(name),
            None => write!(f, "{}:{}", self.asn(), self.value()),
        }
    }
}

string_value!(Community, "bgp-community", "a BGP community");

/// An IP address and port: `192.0.2.1:7800`, `[2001:db8::1]:7800`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Endpoint(pub SocketAddr);

impl Endpoint {
    pub const FORMAT: &'static str = "socket-address";
    pub const EXPECTED: &'static str =
        "an address and port (like 192.0.2.1:7800 or [2001:db8::1]:7800)";
}

impl FromStr for Endpoint {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, ValueError> {
        s.parse()
            .map(Endpoint)
            .map_err(|_| ValueError::new(s, Self::EXPECTED))
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

string_value!(Endpoint, "socket-address", "an IP address and port");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_through_text() {
        for text in ["52:54:00:12:34:56", "02:00:00:00:00:01"] {
            assert_eq!(text.parse::<MacAddress>().unwrap().to_string(), text);
        }
        for text in ["65001:100", "graceful-shutdown", "no-export"] {
            assert_eq!(text.parse::<Community>().unwrap().to_string(), text);
        }
        assert_eq!(
            "65535:0".parse::<Community>().unwrap().to_string(),
            "graceful-shutdown"
        );
        assert_eq!(
            "203.0.113.0/24".parse::<Prefix>().unwrap().to_string(),
            "203.0.113.0/24"
        );
        assert!("203.0.113.5/24".parse::<Prefix>().unwrap().has_host_bits());
    }

    #[test]
    fn bad_values_are_refused() {
        assert!("52:54:00:12:34".parse::<MacAddress>().is_err());
        assert!("52:54:00:12:34:5g".parse::<MacAddress>().is_err());
        assert!("52:54:00:12:34:56:78".parse::<MacAddress>().is_err());
        assert!("65536:1".parse::<Community>().is_err());
        assert!("203.0.113.0/33".parse::<Prefix>().is_err());
        assert!("Site_A".parse::<Name>().is_err());
        assert!("-a".parse::<Name>().is_err());
        assert!("a".repeat(64).parse::<Name>().is_err());
        assert!("site-a".parse::<Name>().is_ok());
    }
}
