//! `secondsite bgp speak`: the BGP speaker on the command line, for network engineers and tests.
//!
//! ```text
//!  stdin: announce P | withdraw P | show ──> Speaker ──> stdout: JSON lines (state changes,
//!  SIGTERM/SIGINT ──> Cease to every peer, exit 0          show replies); stderr: logs
//! ```

use std::net::IpAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use ipnet::IpNet;
use secondsite_bgp::bfd::BfdConfig;
use secondsite_bgp::route::{Announcement, format_community, parse_community};
use secondsite_bgp::session::SessionConfig;
use secondsite_bgp::speaker::{Command, PeerConfig, Speaker};
use tokio::io::AsyncBufReadExt;

use crate::cli::BgpSpeakArgs;

/// The attributes every announcement of this speaker carries.
struct Attributes {
    next_hop4: IpAddr,
    next_hop6: Option<IpAddr>,
    prepend: u8,
    med: Option<u32>,
    communities: Vec<u32>,
}

impl Attributes {
    fn announcement(&self, prefix: IpNet) -> anyhow::Result<Announcement> {
        let prefix = prefix.trunc();
        let multicast = match prefix {
            IpNet::V4(n) => n.network().is_multicast(),
            IpNet::V6(n) => n.network().is_multicast(),
        };
        if multicast {
            bail!("{prefix} is a multicast prefix");
        }
        let next_hop = match prefix {
            IpNet::V4(_) => self.next_hop4,
            IpNet::V6(_) => self
                .next_hop6
                .with_context(|| format!("{prefix} needs --next-hop6"))?,
        };
        Ok(Announcement {
            prefix,
            next_hop,
            prepend: self.prepend,
            med: self.med,
            communities: self.communities.clone(),
        })
    }
}

pub fn speak(args: BgpSpeakArgs) -> anyhow::Result<ExitCode> {
    if args.hold == 1 || args.hold == 2 {
        bail!("--hold must be 0 or at least 3 seconds (RFC 4271)");
    }
    let communities = args
        .communities
        .iter()
        .map(|c| parse_community(c).map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<Vec<u32>>>()?;
    let attributes = Attributes {
        next_hop4: IpAddr::V4(args.next_hop.unwrap_or(match args.local_addr {
            Some(IpAddr::V4(a)) => a,
            _ => args.router_id,
        })),
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
    let peers: Vec<PeerConfig> = args
        .peers
        .iter()
        .map(|address| PeerConfig {
            address: *address,
            local_address: args.local_addr,
            session: SessionConfig {
                local_as: args.local_as,
                router_id: args.router_id,
                peer_as: args.peer_as,
                hold_time: args.hold,
                passive: args.passive,
                connect_retry: Duration::from_secs(1),
            },
            bfd,
        })
        .collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(peers, announcements, attributes))
}

async fn run(
    peers: Vec<PeerConfig>,
    announcements: Vec<Announcement>,
    attributes: Attributes,
) -> anyhow::Result<ExitCode> {
    let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let speaker = Speaker::start(peers, announcements, events_tx)
        .await
        .context("cannot listen on the BGP port (179)")?;
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut stdin_open = true;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            Some(event) = events.recv() => {
                let line = serde_json::to_string(&event)?;
                eprintln!("secondsite bgp: {line}");
                println!("{line}");
            }
            line = stdin.next_line(), if stdin_open => match line {
                Ok(Some(line)) => handle_line(&speaker, &attributes, line.trim()),
                Ok(None) | Err(_) => stdin_open = false,
            },
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    speaker.stop().await;
    Ok(ExitCode::SUCCESS)
}

fn handle_line(speaker: &Speaker, attributes: &Attributes, line: &str) {
    let mut words = line.split_whitespace();
    let reply = match (words.next(), words.next(), words.next()) {
        (None, _, _) => return,
        (Some("show"), None, _) => show(speaker),
        (Some(verb @ ("announce" | "withdraw")), Some(prefix), None) => {
            match prefix.parse::<IpNet>() {
                Err(_) => error(format!("{prefix:?} is not a prefix")),
                Ok(prefix) if verb == "withdraw" => {
                    speaker.command(Command::Withdraw(prefix.trunc()));
                    serde_json::json!({"ok": verb, "prefix": prefix.trunc()})
                }
                Ok(prefix) => match attributes.announcement(prefix) {
                    Ok(a) => {
                        speaker.command(Command::Announce(a));
                        serde_json::json!({"ok": verb, "prefix": prefix.trunc()})
                    }
                    Err(e) => error(e.to_string()),
                },
            }
        }
        _ => error(format!(
            "unknown command {line:?}: announce PREFIX, withdraw PREFIX or show"
        )),
    };
    println!("{reply}");
}

fn error(message: String) -> serde_json::Value {
    serde_json::json!({ "error": message })
}

fn show(speaker: &Speaker) -> serde_json::Value {
    let announced: Vec<serde_json::Value> = speaker
        .announced()
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
        "peers": speaker.status(),
        "announced": announced,
    })
}
