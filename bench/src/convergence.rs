//! The convergence benchmark: with H hosts in the lab, new hosts join one at
//! a time; for each, the time from its lease being granted (the
//! controller's log line) until every other host has the route to it in
//! its kernel (a netlink route event in that host's namespace; for vxlan the
//! route is programmed last, after the neighbour and FDB entries).

use crate::stats::summary;
use anyhow::{bail, Context, Result};
use futures::StreamExt;
use netlink_packet_core::NetlinkPayload;
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteProtocol};
use netlink_packet_route::RouteNetlinkMessage;
use rtnetlink::MulticastGroup;
use std::collections::HashMap;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use weft_backends::WEFT_ROUTE_PROTOCOL;
use weft_tests::lab::{Lab, LabConfig};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Hosts in the lab before the joins.
    #[arg(long, default_value_t = 20)]
    hosts: u32,
    /// Hosts that join, one at a time.
    #[arg(long, default_value_t = 10)]
    joins: u32,
    #[arg(long, default_value = "vxlan", value_parser = ["vxlan", "host-gw"])]
    backend: String,
}

/// (host index, destination, when) for every weft route added anywhere.
type Event = (u32, String, SystemTime);

/// Watches weft's routes appear in a host's namespace.
fn listen(ns: String, host: u32, tx: mpsc::Sender<Event>) -> Result<()> {
    let path = std::path::PathBuf::from("/run/netns").join(&ns);
    let file = std::fs::File::open(&path)?;
    let (ready_tx, ready_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let run = || -> Result<()> {
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let (conn, _handle, mut messages) =
                    rtnetlink::new_multicast_connection(&[MulticastGroup::Ipv4Route])?;
                tokio::spawn(conn);
                let _ = ready_tx.send(());
                while let Some((msg, _)) = messages.next().await {
                    let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(r)) =
                        msg.payload
                    else {
                        continue;
                    };
                    if r.header.protocol != RouteProtocol::Other(WEFT_ROUTE_PROTOCOL) {
                        continue;
                    }
                    let dst = r.attributes.iter().find_map(|a| match a {
                        RouteAttribute::Destination(RouteAddress::Inet(ip)) => Some(ip.to_string()),
                        _ => None,
                    });
                    if let Some(dst) = dst {
                        let _ = tx.send((
                            host,
                            format!("{dst}/{}", r.header.destination_prefix_length),
                            SystemTime::now(),
                        ));
                    }
                }
                Ok::<_, anyhow::Error>(())
            })
        };
        if let Err(e) = run() {
            eprintln!("route listener for host {host}: {e:#}");
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .context("route listener did not start")
}

/// Unix time of an RFC 3339 UTC timestamp as tracing writes it
/// (`2026-11-25T16:17:06.653549Z`).
fn parse_utc(ts: &str) -> Option<SystemTime> {
    let (date, time) = ts.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|x| x.parse::<i64>().ok());
    let (h, mi, s) = (t.next()??, t.next()??, t.next()??);
    // Days from civil (Howard Hinnant's algorithm).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + s;
    let nanos: u32 = format!("{frac:0<9}")[..9].parse().ok()?;
    Some(UNIX_EPOCH + Duration::new(u64::try_from(secs).ok()?, nanos))
}

/// When the controller logged granting `node`'s subnet.
fn granted_at(lab: &Lab, node: &str) -> Result<SystemTime> {
    let log = std::fs::read_to_string(lab.dir().join("controller.log"))?;
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("subnet allocated") && l.contains(&format!("node={node} ")))
        .with_context(|| format!("no grant for {node} in the controller log"))?;
    parse_utc(line.split_whitespace().next().unwrap_or_default()).context("timestamp of the grant")
}

pub fn run_bench(args: Args) -> Result<()> {
    weft_tests::netns::require_root();
    let mut cfg = LabConfig::for_test(args.hosts, &args.backend);
    cfg.name = format!("cv{}", std::process::id());
    cfg.pods_per_host = 0;
    let mut lab = Lab::up(cfg)?;
    let (tx, rx) = mpsc::channel::<Event>();
    for h in lab.state.hosts.clone() {
        listen(h.ns.clone(), h.index, tx.clone())?;
    }
    let mut all_have = Vec::new();
    let mut each = Vec::new();
    for _ in 0..args.joins {
        let watching: Vec<u32> = lab.state.hosts.iter().map(|h| h.index).collect();
        let i = lab.start_host()?;
        lab.finish_host(i)?;
        let subnet = lab.host(i)?.subnet.context("subnet")?.to_string();
        let t0 = granted_at(&lab, &format!("host-{i}"))?;
        let mut seen: HashMap<u32, SystemTime> = HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while seen.len() < watching.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            let (host, dst, at) = match rx.recv_timeout(left) {
                Ok(e) => e,
                Err(_) => bail!(
                    "only {} of {} hosts programmed {subnet} within 30 s",
                    seen.len(),
                    watching.len()
                ),
            };
            if dst == subnet && watching.contains(&host) {
                seen.entry(host).or_insert(at);
            }
        }
        let lat: Vec<Duration> = seen
            .values()
            .map(|t| t.duration_since(t0).unwrap_or_default())
            .collect();
        all_have.push(*lat.iter().max().expect("at least one host"));
        each.extend(lat);
        // The new host is watched from now on, too.
        listen(lab.host(i)?.ns.clone(), i, tx.clone())?;
    }
    println!(
        "convergence ({} backend): {} joins into {}..{} hosts",
        args.backend,
        args.joins,
        args.hosts,
        args.hosts + args.joins - 1
    );
    println!(
        "  lease granted -> every other host programmed: {}",
        summary(&mut all_have)
    );
    println!(
        "  lease granted -> one host programmed:         {}",
        summary(&mut each)
    );
    lab.down()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tracing_timestamps() {
        let t = parse_utc("1970-01-02T00:00:01.5Z").unwrap();
        assert_eq!(
            t.duration_since(UNIX_EPOCH).unwrap(),
            Duration::from_millis(86_401_500)
        );
        let t = parse_utc("2026-11-25T16:17:06.653549Z").unwrap();
        assert_eq!(
            t.duration_since(UNIX_EPOCH).unwrap().as_secs(),
            1_795_623_426
        );
        assert!(parse_utc("yesterday").is_none());
    }
}
