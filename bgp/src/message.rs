//! BGP messages on the wire, through netgauze-bgp-pkt: framing a TCP byte stream into
//! messages, decoding them (a malformed one becomes the NOTIFICATION RFC 4271 section 6
//! prescribes), and building the OPEN and UPDATE messages this speaker sends.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;
use netgauze_bgp_pkt::BgpMessage;
use netgauze_bgp_pkt::capabilities::{
    BgpCapability, FourOctetAsCapability, MultiProtocolExtensionsCapability,
};
use netgauze_bgp_pkt::community::Community;
use netgauze_bgp_pkt::iana::RouteRefreshSubcode;
use netgauze_bgp_pkt::nlri::{Ipv4Unicast, Ipv4UnicastAddress, Ipv6Unicast, Ipv6UnicastAddress};
use netgauze_bgp_pkt::notification::{BgpNotificationMessage, CeaseError, MessageHeaderError};
use netgauze_bgp_pkt::open::{BgpOpenMessage, BgpOpenMessageParameter};
use netgauze_bgp_pkt::path_attribute::{
    As4PathSegment, AsPath, AsPathSegmentType, Communities, MpReach, MpUnreach,
    MultiExitDiscriminator, NextHop, Origin, PathAttribute, PathAttributeValue,
};
use netgauze_bgp_pkt::route_refresh::BgpRouteRefreshMessage;
use netgauze_bgp_pkt::update::BgpUpdateMessage;
use netgauze_bgp_pkt::wire::deserializer::BgpParsingContext;
use netgauze_iana::address_family::AddressType;
use netgauze_parse_utils::WritablePdu;
use netgauze_parse_utils::reader::SliceReader;
use netgauze_parse_utils::traits::ParseFromWithOneInput;

use crate::route::{Announcement, Route};

/// The header: 16-byte marker, 2-byte length, 1-byte type.
pub const HEADER_LEN: usize = 19;
pub const MAX_MESSAGE_LEN: usize = 4096;
/// `AS_TRANS` (RFC 6793): the 2-byte AS an OPEN carries when ours does not fit.
const AS_TRANS: u16 = 23456;

/// Splits a TCP byte stream into BGP messages.
#[derive(Debug, Default)]
pub struct Framer {
    buffer: Vec<u8>,
}

/// A stream that cannot be framed: the session must end with this NOTIFICATION.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct FramingError {
    pub reason: String,
    pub notification: BgpNotificationMessage,
}

impl Framer {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// The next complete message's bytes, if one has arrived.
    pub fn next_message(&mut self) -> Result<Option<Vec<u8>>, FramingError> {
        if self.buffer.len() < HEADER_LEN {
            return Ok(None);
        }
        if self.buffer[..16].iter().any(|b| *b != 0xff) {
            return Err(FramingError {
                reason: "the message marker is not all ones".into(),
                notification: BgpNotificationMessage::MessageHeaderError(
                    MessageHeaderError::ConnectionNotSynchronized {
                        value: Box::new([]),
                    },
                ),
            });
        }
        let len = usize::from(u16::from_be_bytes([self.buffer[16], self.buffer[17]]));
        if !(HEADER_LEN..=MAX_MESSAGE_LEN).contains(&len) {
            return Err(FramingError {
                reason: format!("message length {len} is outside 19 to 4096"),
                notification: BgpNotificationMessage::MessageHeaderError(
                    MessageHeaderError::BadMessageLength {
                        value: (len as u16).to_be_bytes().into(),
                    },
                ),
            });
        }
        if self.buffer.len() < len {
            return Ok(None);
        }
        Ok(Some(self.buffer.drain(..len).collect()))
    }
}

/// A decoded message, with the path attribute errors that RFC 7606 handles by
/// "treat-as-withdraw" (the UPDATE's prefixes are withdrawn, the session stays up).
#[derive(Debug)]
pub struct Decoded {
    pub message: BgpMessage,
    pub attribute_errors: Vec<String>,
}

/// Decodes one framed message. `asn4`: both sides announced 4-octet AS numbers. A message that
/// cannot be parsed becomes the NOTIFICATION RFC 4271 section 6 prescribes for it.
pub fn decode(bytes: &[u8], asn4: bool) -> Result<Decoded, BgpNotificationMessage> {
    // Lenient on path attributes (RFC 7606), strict on everything else.
    let mut ctx = BgpParsingContext::new(
        asn4,
        Default::default(),
        Default::default(),
        true,
        true,
        false,
        false,
    );
    let mut reader = SliceReader::new(bytes);
    let message = BgpMessage::parse(&mut reader, &mut ctx).map_err(BgpNotificationMessage::from)?;
    let ignored = ctx.reset_parsing_errors();
    Ok(Decoded {
        message,
        attribute_errors: ignored
            .path_attr_errors()
            .iter()
            .map(|e| format!("{e:?}"))
            .collect(),
    })
}

pub fn encode(message: &BgpMessage) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    // Writing to a Vec fails only for a message we built wrong (over 4096 bytes): a bug.
    message
        .write(&mut out)
        .expect("messages this speaker builds are encodable");
    out
}

/// Our OPEN: 4-octet AS (RFC 6793), IPv4 and IPv6 unicast (RFC 4760), route refresh (RFC 2918).
pub fn open(local_as: u32, hold_time: u16, router_id: Ipv4Addr) -> BgpMessage {
    let my_as = u16::try_from(local_as).unwrap_or(AS_TRANS);
    let capabilities = vec![
        BgpCapability::MultiProtocolExtensions(MultiProtocolExtensionsCapability::new(
            AddressType::Ipv4Unicast,
        )),
        BgpCapability::MultiProtocolExtensions(MultiProtocolExtensionsCapability::new(
            AddressType::Ipv6Unicast,
        )),
        BgpCapability::RouteRefresh,
        BgpCapability::FourOctetAs(FourOctetAsCapability::new(local_as)),
    ];
    BgpMessage::Open(BgpOpenMessage::new(
        my_as,
        hold_time,
        router_id,
        vec![BgpOpenMessageParameter::new_capabilities(capabilities)],
    ))
}

/// What a peer's OPEN says, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerOpen {
    pub asn: u32,
    pub hold_time: u16,
    pub router_id: Ipv4Addr,
    pub asn4: bool,
    pub route_refresh: bool,
}

pub fn read_open(open: &BgpOpenMessage) -> PeerOpen {
    let caps = open.capabilities();
    PeerOpen {
        asn: open.my_asn4(),
        hold_time: open.hold_time(),
        router_id: open.bgp_id(),
        asn4: caps
            .iter()
            .any(|c| matches!(c, BgpCapability::FourOctetAs(_))),
        route_refresh: caps
            .iter()
            .any(|c| matches!(c, BgpCapability::RouteRefresh)),
    }
}

/// A path attribute with the flags RFC 4271 and RFC 4760 give it: well-known ones (ORIGIN,
/// AS_PATH, NEXT_HOP) transitive, MED and MP_(UN)REACH_NLRI optional non-transitive,
/// COMMUNITIES optional transitive.
fn attribute(value: PathAttributeValue) -> PathAttribute {
    let (optional, transitive) = match value {
        PathAttributeValue::MultiExitDiscriminator(_)
        | PathAttributeValue::MpReach(_)
        | PathAttributeValue::MpUnreach(_) => (true, false),
        PathAttributeValue::Communities(_) => (true, true),
        _ => (false, true),
    };
    PathAttribute::from(optional, transitive, false, false, value)
        .unwrap_or_else(|(value, e)| unreachable!("flags of {value:?} are RFC 4271's: {e:?}"))
}

/// An UPDATE announcing `route`: IPv4 in the NLRI with NEXT_HOP, IPv6 in MP_REACH_NLRI. `asn4`:
/// the session negotiated 4-octet AS numbers (else AS_PATH holds 2-octet ones, AS_TRANS for
/// ours if it does not fit).
pub fn announce(route: &Announcement, local_as: u32, asn4: bool) -> BgpMessage {
    let path = vec![local_as; 1 + usize::from(route.prepend)];
    let mut attributes = vec![
        attribute(PathAttributeValue::Origin(Origin::IGP)),
        attribute(PathAttributeValue::AsPath(if asn4 {
            AsPath::As4PathSegments(
                vec![As4PathSegment::new(AsPathSegmentType::AsSequence, path)].into(),
            )
        } else {
            as2_path(&path)
        })),
    ];
    if let Some(med) = route.med {
        attributes.push(attribute(PathAttributeValue::MultiExitDiscriminator(
            MultiExitDiscriminator::new(med),
        )));
    }
    if !route.communities.is_empty() {
        let communities: Vec<Community> = route
            .communities
            .iter()
            .map(|c| Community::new(*c))
            .collect();
        attributes.push(attribute(PathAttributeValue::Communities(
            Communities::new(communities),
        )));
    }
    match (route.prefix, route.next_hop) {
        (IpNet::V4(net), IpAddr::V4(next_hop)) => {
            attributes.push(attribute(PathAttributeValue::NextHop(NextHop::new(
                next_hop,
            ))));
            BgpMessage::Update(BgpUpdateMessage::new(
                vec![],
                attributes,
                vec![ipv4_nlri(net)],
            ))
        }
        (IpNet::V4(net), IpAddr::V6(_)) => {
            // Refused when the announcement is made; never sent with a wrong next hop.
            BgpMessage::Update(BgpUpdateMessage::new(vec![ipv4_nlri(net)], vec![], vec![]))
        }
        (IpNet::V6(net), next_hop) => {
            let next_hop_global = match next_hop {
                IpAddr::V6(v6) => v6,
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            };
            attributes.push(attribute(PathAttributeValue::MpReach(
                MpReach::Ipv6Unicast {
                    next_hop_global,
                    next_hop_local: None,
                    nlri: vec![ipv6_nlri(net)].into(),
                },
            )));
            BgpMessage::Update(BgpUpdateMessage::new(vec![], attributes, vec![]))
        }
    }
}

/// An UPDATE withdrawing `prefix`.
pub fn withdraw(prefix: IpNet) -> BgpMessage {
    match prefix {
        IpNet::V4(net) => {
            BgpMessage::Update(BgpUpdateMessage::new(vec![ipv4_nlri(net)], vec![], vec![]))
        }
        IpNet::V6(net) => BgpMessage::Update(BgpUpdateMessage::new(
            vec![],
            vec![attribute(PathAttributeValue::MpUnreach(
                MpUnreach::Ipv6Unicast {
                    nlri: vec![ipv6_nlri(net)].into(),
                },
            ))],
            vec![],
        )),
    }
}

fn as2_path(path: &[u32]) -> AsPath {
    use netgauze_bgp_pkt::path_attribute::As2PathSegment;
    let path: Vec<u16> = path
        .iter()
        .map(|a| u16::try_from(*a).unwrap_or(AS_TRANS))
        .collect();
    AsPath::As2PathSegments(vec![As2PathSegment::new(AsPathSegmentType::AsSequence, path)].into())
}

fn ipv4_nlri(net: ipnet::Ipv4Net) -> Ipv4UnicastAddress {
    Ipv4UnicastAddress::new_no_path_id(
        Ipv4Unicast::from_net(net.trunc()).expect("a unicast prefix (checked when made)"),
    )
}

fn ipv6_nlri(net: ipnet::Ipv6Net) -> Ipv6UnicastAddress {
    Ipv6UnicastAddress::new(
        None,
        Ipv6Unicast::from_net(net.trunc()).expect("a unicast prefix (checked when made)"),
    )
}

/// A Cease NOTIFICATION (RFC 4486 subcodes).
/// A ROUTE-REFRESH (RFC 2918) asking the peer to send its IPv4 or IPv6 unicast routes again.
pub fn route_refresh(ipv6: bool) -> BgpMessage {
    let family = if ipv6 {
        AddressType::Ipv6Unicast
    } else {
        AddressType::Ipv4Unicast
    };
    BgpMessage::RouteRefresh(BgpRouteRefreshMessage::new(
        family,
        RouteRefreshSubcode::NormalRequest,
    ))
}

pub fn cease_shutdown() -> BgpMessage {
    BgpMessage::Notification(BgpNotificationMessage::CeaseError(
        CeaseError::AdministrativeShutdown {
            value: Box::new([]),
        },
    ))
}

/// What an UPDATE does to the Adj-RIB-In: routes announced (with their attributes) and
/// prefixes withdrawn.
#[derive(Debug, Default, PartialEq)]
pub struct UpdateRoutes {
    pub announced: Vec<Route>,
    pub withdrawn: Vec<IpNet>,
}

pub fn read_update(update: &BgpUpdateMessage) -> UpdateRoutes {
    let mut out = UpdateRoutes::default();
    let mut template = Route {
        prefix: IpNet::V4(ipnet::Ipv4Net::default()),
        as_path: Vec::new(),
        next_hop: None,
        med: None,
        communities: Vec::new(),
    };
    let mut v6_announced = Vec::new();
    for attribute in update.path_attributes() {
        match attribute.value() {
            PathAttributeValue::AsPath(AsPath::As4PathSegments(segments)) => {
                template.as_path = segments
                    .iter()
                    .flat_map(|s| s.as_numbers().to_vec())
                    .collect();
            }
            PathAttributeValue::AsPath(AsPath::As2PathSegments(segments)) => {
                template.as_path = segments
                    .iter()
                    .flat_map(|s| s.as_numbers().iter().map(|a| u32::from(*a)))
                    .collect();
            }
            PathAttributeValue::NextHop(nh) => template.next_hop = Some(IpAddr::V4(nh.next_hop())),
            PathAttributeValue::MultiExitDiscriminator(med) => template.med = Some(med.metric()),
            PathAttributeValue::Communities(c) => {
                template.communities = c.communities().iter().map(|c| c.value()).collect();
            }
            PathAttributeValue::MpReach(MpReach::Ipv6Unicast {
                next_hop_global,
                nlri,
                ..
            }) => {
                for n in nlri.iter() {
                    v6_announced.push((IpNet::V6(n.network().address()), *next_hop_global));
                }
            }
            PathAttributeValue::MpUnreach(MpUnreach::Ipv6Unicast { nlri }) => {
                out.withdrawn
                    .extend(nlri.iter().map(|n| IpNet::V6(n.network().address())));
            }
            _ => {}
        }
    }
    out.withdrawn.extend(
        update
            .withdraw_routes()
            .iter()
            .map(|w| IpNet::V4(w.network().address())),
    );
    for n in update.nlri() {
        out.announced.push(Route {
            prefix: IpNet::V4(n.network().address()),
            ..template.clone()
        });
    }
    for (prefix, next_hop) in v6_announced {
        out.announced.push(Route {
            prefix,
            next_hop: Some(IpAddr::V6(next_hop)),
            ..template.clone()
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![0xff; 16];
        m.extend_from_slice(&((19 + body.len()) as u16).to_be_bytes());
        m.push(kind);
        m.extend_from_slice(body);
        m
    }

    /// NOTIFICATION code and subcode of what decoding `bytes` answers.
    fn refusal(bytes: &[u8]) -> (u8, u8) {
        let notification = decode(bytes, true).expect_err("malformed");
        let wire = encode(&BgpMessage::Notification(notification));
        (wire[19], wire[20])
    }

    #[test]
    fn malformed_messages_get_the_notification_rfc_4271_prescribes() {
        // OPEN version 3: OPEN Message Error, Unsupported Version Number.
        assert_eq!(
            refusal(&frame(1, &[3, 0xfd, 0xe8, 0, 9, 10, 0, 0, 1, 0])),
            (2, 1)
        );
        // UPDATE whose attributes claim 100 bytes and have 4: Malformed Attribute List.
        assert_eq!(refusal(&frame(2, &[0, 0, 0, 100, 0x40, 1, 1, 0])), (3, 1));
        // A message type that does not exist: Message Header Error, Bad Message Type.
        assert_eq!(refusal(&frame(9, &[])), (1, 3));
    }

    #[test]
    fn an_attribute_error_is_treat_as_withdraw_not_a_reset() {
        // ORIGIN 7 (undefined) on 203.0.113.0/24: RFC 7606 withdraws the route instead.
        let bad_origin = frame(2, &[0, 0, 0, 4, 0x40, 1, 1, 7, 24, 203, 0, 113]);
        let decoded = decode(&bad_origin, true).expect("parses leniently");
        assert_eq!(decoded.attribute_errors.len(), 1, "{decoded:?}");
        let BgpMessage::Update(update) = decoded.message else {
            panic!("an UPDATE");
        };
        assert_eq!(read_update(&update).announced.len(), 1);
    }

    #[test]
    fn announcements_round_trip_through_the_wire() {
        let v4 = Announcement {
            prefix: "203.0.113.0/24".parse().unwrap(),
            next_hop: "10.0.1.2".parse().unwrap(),
            prepend: 1,
            med: Some(7),
            communities: vec![0xffff_0000, 65001 << 16 | 200],
        };
        for asn4 in [true, false] {
            let wire = encode(&announce(&v4, 4_200_000_001, asn4));
            let BgpMessage::Update(update) = decode(&wire, asn4).expect("decodes").message else {
                panic!("an UPDATE");
            };
            let routes = read_update(&update);
            let expected_as = if asn4 {
                4_200_000_001
            } else {
                u32::from(AS_TRANS)
            };
            assert_eq!(routes.announced[0].as_path, vec![expected_as; 2]);
            assert_eq!(routes.announced[0].communities, v4.communities);
            assert_eq!(routes.announced[0].med, Some(7));
        }
        let wire = encode(&withdraw("2001:db8:113::/48".parse().unwrap()));
        let BgpMessage::Update(update) = decode(&wire, true).expect("decodes").message else {
            panic!("an UPDATE");
        };
        assert_eq!(
            read_update(&update).withdrawn,
            vec!["2001:db8:113::/48".parse::<IpNet>().unwrap()]
        );
    }
}
