//! `secondsite bgp speak`: the BGP speaker on the command line, for network engineers and tests.
//!
//! ```text
//!  options, or --policy FILE --site NAME ──> peers + announcements ──> Speaker
//!  stdin: announce P | withdraw P | show ──> Speaker ──> stdout: JSON lines (state changes,
//!  SIGTERM/SIGINT ──> Cease to every peer, exit 0          show replies); stderr: logs
//! ```

use std::net::IpAddr;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use ipnet::IpNet;
use secondsite_bgp::bfd::BfdConfig;
use secondsite_bgp::route::{Announcement, RibFilter, format_community, parse_community};
use secondsite_bgp::session::SessionConfig;
use secondsite_bgp::speaker::{Command, Event, PeerConfig, Speaker};
use secondsite_policy::Policy;
use tokio::io::AsyncBufReadExt;

use super::{EXIT_INVALID_INPUT, print_diagnostics};
use crate::cli::BgpSpeakArgs;
use secondsite::site::plan;

/// How `announce PREFIX` on stdin builds an announcement.
struct Attributes {
    next_hop4: Option<IpAddr>,
    next_hop6: Option<IpAddr>,
    prepend: u8,
    med: Option<u32>,
    communities: Vec<u32>,
}

impl Attributes {
    fn announcement(&self, prefix: IpNet) -> anyhow::Result<Announcement> {
        let next_hop = match prefix {
            IpNet::V4(_) => self
                .next_hop4
                .with_context(|| format!("no IPv4 next hop for {prefix}"))?,
            IpNet::V6(_) => self
                .next_hop6
                .with_context(|| format!("{prefix} needs --next-hop6"))?,
        };
        Announcement::new(
            prefix,
            next_hop,
            self.prepend,
            self.med,
            self.communities.clone(),
        )
        .map_err(anyhow::Error::msg)
    }
}

pub fn speak(args: BgpSpeakArgs) -> anyhow::Result<ExitCode> {
    let mut keep: Vec<IpNet> = args.keep.clone();
    let (mut peers, announcements, attributes) = match (&args.policy, &args.site) {
        (Some(file), Some(site)) => {
            let report = secondsite_policy::check_file(file);
            print_diagnostics(file, &report);
            let Some(policy) = report.policy else {
                return Ok(ExitCode::from(EXIT_INVALID_INPUT));
            };
            if keep.is_empty() {
                keep = policy.prefixes.iter().map(|p| p.prefix.0).collect();
            }
            from_policy(&policy, site, file)?
        }
        _ => from_options(&args)?,
    };
    let keep = if keep.is_empty() {
        RibFilter::All
    } else {
        RibFilter::Within(keep)
    };
    for peer in &mut peers {
        peer.session.keep = keep.clone();
    }
    // Route changes are printed only when they are few: those of the prefixes kept.
    let print_routes = keep != RibFilter::All;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(run(peers, announcements, attributes, print_routes));
    // The stdin reader blocks on a thread of its own: do not wait for it.
    runtime.shutdown_background();
    result
}

type Setup = (Vec<PeerConfig>, Vec<Announcement>, Attributes);

fn from_options(args: &BgpSpeakArgs) -> anyhow::Result<Setup> {
    let (Some(local_as), Some(router_id), Some(peer_as)) =
        (args.local_as, args.router_id, args.peer_as)
    else {
        bail!("give --local-as, --router-id, --peer and --peer-as, or --policy and --site");
    };
    if args.hold == 1 || args.hold == 2 {
        bail!("--hold must be 0 or at least 3 seconds (RFC 4271)");
    }
    let communities = args
        .communities
        .iter()
        .map(|c| parse_community(c).map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<Vec<u32>>>()?;
    let attributes = Attributes {
        next_hop4: Some(IpAddr::V4(args.next_hop.unwrap_or(match args.local_addr {
            Some(IpAddr::V4(a)) => a,
            _ => router_id,
        }))),
        next_hop6: args.next_hop6.map(IpAddr::V6),
        prepend: args.prepend,
        med: args.med,
        communities,
    };
    let announcements = args
        .announce
        .iter()
        .map(|p| attributes.announcement(*p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let bfd = args
        .bfd
        .as_deref()
        .map(BfdConfig::parse)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let md5_key = args
        .md5_password_file
        .as_deref()
        .map(plan::read_secret)
        .transpose()?;
    let peers = args
        .peers
        .iter()
        .map(|address| PeerConfig {
            address: *address,
            local_address: args.local_addr,
            session: SessionConfig {
                local_as,
                router_id,
                peer_as,
                hold_time: args.hold,
                passive: args.passive,
                connect_retry: Duration::from_secs(1),
                keep: Default::default(),
            },
            bfd,
            gtsm: args.gtsm,
            md5_key: md5_key.clone(),
        })
        .collect();
    Ok((peers, announcements, attributes))
}

/// The site's sessions and announcements as the policy gives them.
fn from_policy(policy: &Policy, site_name: &str, file: &Path) -> anyhow::Result<Setup> {
    let site = policy
        .sites
        .iter()
        .find(|s| s.name.as_str() == site_name)
        .with_context(|| format!("{} has no site {site_name:?}", file.display()))?;
    let base_dir = file.parent().unwrap_or(Path::new("."));
    let peers = plan::bgp_peers(site, base_dir, RibFilter::All)?;
    let announcements = plan::policy_announcements(policy, site)
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    // `announce PREFIX` on stdin: the policy's attributes for that prefix if it has some.
    let attributes = Attributes {
        next_hop4: plan::uplink_address(site, true),
        next_hop6: plan::uplink_address(site, false),
        prepend: 0,
        med: None,
        communities: Vec::new(),
    };
    Ok((peers, announcements, attributes))
}

async fn run(
    peers: Vec<PeerConfig>,
    announcements: Vec<Announcement>,
    attributes: Attributes,
    print_routes: bool,
) -> anyhow::Result<ExitCode> {
    let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let configured = announcements.clone();
    let speaker = Speaker::start(peers, announcements, events_tx)
        .await
        .context("cannot listen on the BGP port (179)")?;
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut stdin_open = true;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            Some(event) = events.recv() => {
                if matches!(event, Event::Routes { .. }) && !print_routes {
                    continue;
                }
                let line = serde_json::to_string(&event)?;
                eprintln!("secondsite bgp: {line}");
                outln!("{line}");
            }
            line = stdin.next_line(), if stdin_open => match line {
                Ok(Some(line)) => handle_line(&speaker, &attributes, &configured, line.trim()).await,
                Ok(None) | Err(_) => stdin_open = false,
            },
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    speaker.stop().await;
    Ok(ExitCode::SUCCESS)
}

async fn handle_line(
    speaker: &Speaker,
    attributes: &Attributes,
    configured: &[Announcement],
    line: &str,
) {
    let mut words = line.split_whitespace();
    let reply = match (words.next(), words.next(), words.next()) {
        (None, _, _) => return,
        (Some("show"), None, _) => show(speaker).await,
        (Some(verb @ ("announce" | "withdraw")), Some(prefix), None) => {
            match prefix.parse::<IpNet>() {
                Err(_) => error(format!("{prefix:?} is not a prefix")),
                Ok(prefix) if verb == "withdraw" => {
                    speaker.command(Command::Withdraw(prefix.trunc()));
                    serde_json::json!({"ok": verb, "prefix": prefix.trunc()})
                }
                Ok(prefix) => {
                    // A prefix the configuration announces keeps its attributes.
                    let known = configured.iter().find(|a| a.prefix == prefix.trunc());
                    match known
                        .cloned()
                        .map_or_else(|| attributes.announcement(prefix), Ok)
                    {
                        Ok(a) => {
                            speaker.command(Command::Announce(a));
                            serde_json::json!({"ok": verb, "prefix": prefix.trunc()})
                        }
                        Err(e) => error(e.to_string()),
                    }
                }
            }
        }
        _ => error(format!(
            "unknown command {line:?}: announce PREFIX, withdraw PREFIX or show"
        )),
    };
    outln!("{reply}");
}

fn error(message: String) -> serde_json::Value {
    serde_json::json!({ "error": message })
}

async fn show(speaker: &Speaker) -> serde_json::Value {
    let status = speaker.status().await;
    let announced: Vec<serde_json::Value> = status
        .announced
        .iter()
        .map(|a| {
            serde_json::json!({
                "prefix": a.prefix,
                "next_hop": a.next_hop,
                "prepend": a.prepend,
                "med": a.med,
                "communities": a.communities.iter().map(|c| format_community(*c)).collect::<Vec<_>>(),
            })
        })
        .collect();
    serde_json::json!({
        "peers": status.peers,
        "announced": announced,
    })
}
