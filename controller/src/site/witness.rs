//! The `upstream-bgp` witness: what our BGP sessions show of the other site's announcement of
//! a group's prefixes, read from the routes their Adj-RIB-In keeps (the group's prefixes and
//! more-specifics: see `RibFilter`).
//!
//! A site announces a prefix unprepended while it is active and prepended while it is the
//! backup; the upstream passes the other site's route on to us (BIRD's `export all`). So, for
//! each prefix, a route whose AS path ends in the other site's AS once is that site active,
//! twice or more is that site standing by, and no route is that site gone (or its announcement
//! not exported to us: see `docs/failover.md` for what the upstream must send). BIRD never
//! sends a site its own route back; FRR does, and both sites are in one AS: a route carrying
//! our site's community (`plan::site_tag`) or our own address as its next hop is ours, not
//! the other site's, and is not read.

use std::net::IpAddr;

use ipnet::IpNet;
use secondsite_bgp::route::Route;

use super::failover::{PeerRoute, UpstreamView};

/// GRACEFUL_SHUTDOWN (RFC 8326), 65535:0.
pub const GRACEFUL_SHUTDOWN: u32 = 0xffff_0000;

/// One upstream session, as the witness reads it.
#[derive(Debug, Clone, Default)]
pub struct UpstreamSession {
    pub established: bool,
    /// The routes its Adj-RIB-In keeps.
    pub routes: Vec<Route>,
}

/// What marks a route as our own announcement sent back: our next hops, our site's community.
#[derive(Debug, Clone, Default)]
pub struct Ours {
    pub next_hops: Vec<IpAddr>,
    pub tag: Option<u32>,
}

impl Ours {
    fn is_ours(&self, route: &Route) -> bool {
        route
            .next_hop
            .is_some_and(|hop| self.next_hops.contains(&hop))
            || self.tag.is_some_and(|tag| route.communities.contains(&tag))
    }
}

/// How the route for `prefix` in `routes` shows the site of AS `peer_as` (our own sent back is
/// not read).
fn peer_route(routes: &[Route], prefix: &IpNet, peer_as: u32, ours: &Ours) -> PeerRoute {
    let Some(route) = routes
        .iter()
        .find(|r| r.prefix == *prefix && !ours.is_ours(r))
    else {
        return PeerRoute::None;
    };
    let trailing = route
        .as_path
        .iter()
        .rev()
        .take_while(|asn| **asn == peer_as)
        .count();
    match trailing {
        0 => PeerRoute::None,
        // Tagged GRACEFUL_SHUTDOWN (RFC 8326): the site is handing the group over.
        _ if route.communities.contains(&GRACEFUL_SHUTDOWN) => PeerRoute::Standby,
        1 => PeerRoute::Active,
        _ => PeerRoute::Standby,
    }
}

/// The upstream's view for a group announcing `prefixes`, whose other site is AS `peer_as`:
/// connected if any session is established; the other site's route as the strongest any
/// session shows for any of the prefixes (active over standby over none), our own routes
/// (`ours`) left out.
pub fn upstream_view<'a>(
    sessions: impl Iterator<Item = &'a UpstreamSession> + Clone,
    prefixes: &[IpNet],
    peer_as: u32,
    ours: &Ours,
) -> UpstreamView {
    let rank = |r: PeerRoute| match r {
        PeerRoute::None => 0,
        PeerRoute::Standby => 1,
        PeerRoute::Active => 2,
    };
    let peer_route = sessions
        .clone()
        .filter(|s| s.established)
        .flat_map(|s| {
            prefixes
                .iter()
                .map(|p| peer_route(&s.routes, p, peer_as, ours))
        })
        .max_by_key(|r| rank(*r))
        .unwrap_or(PeerRoute::None);
    UpstreamView {
        connected: sessions.clone().any(|s| s.established),
        peer_route,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEER_AS: u32 = 65001;

    fn route(prefix: &str, as_path: &[u32]) -> Route {
        Route {
            prefix: prefix.parse().expect("a prefix"),
            as_path: as_path.to_vec(),
            next_hop: None,
            med: None,
            communities: Vec::new(),
        }
    }

    fn view(routes: Vec<Route>) -> UpstreamView {
        let prefixes = ["203.0.113.0/24".parse().expect("a prefix")];
        let session = UpstreamSession {
            established: true,
            routes,
        };
        upstream_view([session].iter(), &prefixes, PEER_AS, &Ours::default())
    }

    #[test]
    fn our_own_route_sent_back_is_not_the_other_sites() {
        // FRR sends a site its own announcement back: known by our community, or by our
        // address as next hop (a third-party next hop kept).
        let own: IpAddr = "10.0.2.2".parse().unwrap();
        let tag = (65001 << 16) | 0xfe01;
        let prefixes = ["203.0.113.0/24".parse().unwrap()];
        for (next_hop, communities) in [(Some(own), vec![]), (None, vec![tag])] {
            let mut back = route("203.0.113.0/24", &[65000, 65001, 65001]);
            back.next_hop = next_hop;
            back.communities = communities;
            let session = UpstreamSession {
                established: true,
                routes: vec![back],
            };
            let ours = Ours {
                next_hops: vec![own],
                tag: Some(tag),
            };
            let view = upstream_view([session.clone()].iter(), &prefixes, PEER_AS, &ours);
            assert_eq!(view.peer_route, PeerRoute::None);
            let view = upstream_view([session].iter(), &prefixes, PEER_AS, &Ours::default());
            assert_eq!(
                view.peer_route,
                PeerRoute::Standby,
                "without knowing it is ours"
            );
        }
    }

    #[test]
    fn the_other_sites_route_reads_active_standby_or_gone_by_its_prepends() {
        let active = view(vec![route("203.0.113.0/24", &[65000, 65001])]);
        assert_eq!(active.peer_route, PeerRoute::Active);
        assert!(active.connected);
        let standby = view(vec![route("203.0.113.0/24", &[65000, 65001, 65001, 65001])]);
        assert_eq!(standby.peer_route, PeerRoute::Standby);
        assert_eq!(view(vec![]).peer_route, PeerRoute::None);
        let mut leaving = route("203.0.113.0/24", &[65000, 65001]);
        leaving.communities.push(GRACEFUL_SHUTDOWN);
        assert_eq!(
            view(vec![leaving]).peer_route,
            PeerRoute::Standby,
            "a site handing over is leaving, not holding the upstream"
        );
        // The upstream's own route for the prefix, or a more-specific, is not the peer's.
        assert_eq!(
            view(vec![route("203.0.113.0/24", &[65000])]).peer_route,
            PeerRoute::None
        );
        assert_eq!(
            view(vec![route("203.0.113.128/25", &[65000, 65001])]).peer_route,
            PeerRoute::None
        );
    }

    #[test]
    fn any_established_session_counts_and_the_strongest_view_wins() {
        let prefixes = ["203.0.113.0/24".parse().expect("a prefix")];
        let down = UpstreamSession {
            established: false,
            routes: vec![route("203.0.113.0/24", &[65000, 65001])],
        };
        let standby = UpstreamSession {
            established: true,
            routes: vec![route("203.0.113.0/24", &[65000, 65001, 65001])],
        };
        let view = upstream_view(
            [down.clone(), standby].iter(),
            &prefixes,
            PEER_AS,
            &Ours::default(),
        );
        assert_eq!(
            view.peer_route,
            PeerRoute::Standby,
            "a session down shows nothing"
        );
        let view = upstream_view([down].iter(), &prefixes, PEER_AS, &Ours::default());
        assert!(!view.connected);
        assert_eq!(view.peer_route, PeerRoute::None);
    }
}
