//! The names benchmark, in a lab of H hosts:
//!
//! - propagation: a container with a new name starts on one host (weft-cni
//!   ADD returns); a client in a pod on every other host asks its own
//!   node's name server every half millisecond until the name answers. The
//!   time from ADD's return to each host's first answer.
//! - serving: the same N names served by weft-node (from its table) and by
//!   Debian's dnsmasq (from a hosts file), asked from a pod on one host by
//!   closed-loop clients for S seconds each, in alternating rounds:
//!   queries per second and latency percentiles of each, in one run.

use crate::stats::{median, ms, percentile, summary};
use anyhow::{bail, Context, Result};
use hickory_proto::op::Message;
use hickory_proto::rr::RecordType;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use weft_tests::dns;
use weft_tests::lab::{Lab, LabConfig};
use weft_tests::process::{spawn_tied, stop};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Hosts in the lab.
    #[arg(long, default_value_t = 20)]
    hosts: u32,
    /// New names, one container each, for the propagation figures.
    #[arg(long, default_value_t = 20)]
    registrations: u32,
    /// Names both servers serve for the throughput figures.
    #[arg(long, default_value_t = 200)]
    names: u32,
    /// Seconds per throughput round.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Throughput rounds per server.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Concurrent clients in the throughput rounds.
    #[arg(long, default_value_t = 4)]
    clients: u32,
}

/// A client in a pod that, told a name, asks `server` until it answers.
struct Poller {
    ask: mpsc::Sender<(String, Instant)>,
    answered: mpsc::Receiver<Result<Duration>>,
}

fn poller(ns: &str, server: IpAddr) -> Result<Poller> {
    let (ask, asks) = mpsc::channel::<(String, Instant)>();
    let (done, answered) = mpsc::channel();
    weft_tests::netns::spawn_in_ns(ns, move || {
        let run = |name: &str, since: Instant| -> Result<Duration> {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.connect(SocketAddr::new(server, 53))?;
            s.set_read_timeout(Some(Duration::from_millis(50)))?;
            let mut buf = vec![0u8; 4096];
            let deadline = since + Duration::from_secs(30);
            for id in 0u16.. {
                s.send(&dns::query(name, RecordType::A, id)?)?;
                if let Ok(n) = s.recv(&mut buf) {
                    let m = Message::from_vec(&buf[..n])?;
                    if m.id() == id && !m.answers().is_empty() {
                        return Ok(since.elapsed());
                    }
                }
                if Instant::now() > deadline {
                    bail!("{name} did not answer within 30 s");
                }
                std::thread::sleep(Duration::from_micros(500));
            }
            bail!("ran out of query IDs")
        };
        while let Ok((name, since)) = asks.recv() {
            if done.send(run(&name, since)).is_err() {
                return;
            }
        }
    })?;
    Ok(Poller { ask, answered })
}

fn propagation(lab: &mut Lab, args: &Args) -> Result<()> {
    let hosts: Vec<u32> = lab.state.hosts.iter().map(|h| h.index).collect();
    let mut pollers = Vec::new();
    for &i in &hosts {
        let ns = lab.host(i)?.pods[0].ns.clone();
        pollers.push((i, poller(&ns, IpAddr::V4(lab.gateway(i)?))?));
    }
    let mut samples = Vec::new();
    let mut slowest = Vec::new();
    let mut adds = Vec::new();
    for r in 0..args.registrations {
        let home = hosts[r as usize % hosts.len()];
        let name = format!("svc{r}");
        let t = Instant::now();
        lab.new_named_pod(home, &[&name])?;
        let since = Instant::now();
        adds.push(since - t);
        let fqdn = format!("{name}.weft.");
        let others: Vec<&Poller> = pollers
            .iter()
            .filter(|(i, _)| *i != home)
            .map(|(_, p)| p)
            .collect();
        for p in &others {
            p.ask.send((fqdn.clone(), since))?;
        }
        let mut round = Duration::ZERO;
        for p in &others {
            let d = p.answered.recv()??;
            round = round.max(d);
            samples.push(d);
        }
        slowest.push(round);
    }
    println!(
        "dns propagation ({} hosts, {} new names, {} answers): from weft-cni ADD's return to the name answering on another host: {}",
        hosts.len(),
        args.registrations,
        samples.len(),
        summary(&mut samples)
    );
    println!(
        "  until every other host answered: {}; weft-cni ADD itself: {}",
        summary(&mut slowest),
        summary(&mut adds)
    );
    Ok(())
}

/// Closed-loop clients asking `server` for the names in turn for
/// `seconds`: (queries per second, latencies).
fn load(
    ns: &str,
    server: SocketAddr,
    names: &[String],
    args: &Args,
) -> Result<(f64, Vec<Duration>)> {
    let until = Instant::now() + Duration::from_secs(args.seconds);
    let mut workers = Vec::new();
    // Queries are made once and answers read from their header: the
    // clients must cost little next to the servers they measure.
    let queries: Vec<Vec<u8>> = names
        .iter()
        .map(|n| dns::query(n, RecordType::A, 0))
        .collect::<Result<_>>()?;
    for c in 0..args.clients {
        let queries = queries.clone();
        workers.push(weft_tests::netns::spawn_in_ns(
            ns,
            move || -> Result<Vec<Duration>> {
                let s = UdpSocket::bind("0.0.0.0:0")?;
                s.connect(server)?;
                s.set_read_timeout(Some(Duration::from_secs(1)))?;
                let mut buf = vec![0u8; 4096];
                let mut lat = Vec::new();
                let mut k = c as usize;
                let mut id: u16 = 0;
                while Instant::now() < until {
                    id = id.wrapping_add(1);
                    let mut q = queries[k % queries.len()].clone();
                    q[..2].copy_from_slice(&id.to_be_bytes());
                    k += 1;
                    let t = Instant::now();
                    s.send(&q)?;
                    loop {
                        let n = s.recv(&mut buf).context("no answer within 1 s")?;
                        if n < 12 || buf[..2] != id.to_be_bytes() {
                            continue;
                        }
                        let rcode = buf[3] & 0x0f;
                        let answers = u16::from_be_bytes([buf[6], buf[7]]);
                        if rcode != 0 || answers == 0 {
                            bail!("{server} answered rcode {rcode} with {answers} addresses");
                        }
                        break;
                    }
                    lat.push(t.elapsed());
                }
                Ok(lat)
            },
        )?);
    }
    let started = Instant::now();
    let mut all = Vec::new();
    for w in workers {
        all.extend(
            w.join()
                .map_err(|_| anyhow::anyhow!("a client panicked"))???,
        );
    }
    let took = started.elapsed().as_secs_f64();
    Ok((all.len() as f64 / took, all))
}

fn serving(lab: &Lab, args: &Args) -> Result<()> {
    weft_tests::bins::system_tool("dnsmasq", "dnsmasq-base")?;
    let names: Vec<String> = (0..args.names).map(|n| format!("name{n}")).collect();
    let addr = |n: u32| Ipv4Addr::new(10, 99, (n / 250) as u8, (n % 250 + 1) as u8);
    let mut hosts_file = String::new();
    for (n, name) in names.iter().enumerate() {
        lab.weftctl(&["names", "add", name, &addr(n as u32).to_string()])?;
        hosts_file.push_str(&format!("{} {name}.weft\n", addr(n as u32)));
    }
    let fqdns: Vec<String> = names.iter().map(|n| format!("{n}.weft.")).collect();
    let pod = lab.host(1)?.pods[0].ns.clone();
    let gw = IpAddr::V4(lab.gateway(1)?);
    let last = fqdns.last().context("no names")?.clone();
    lab.wait_for(Duration::from_secs(30), "the names on host 1", || {
        Ok(dns::addresses(&pod, gw, &last)?.is_ok())
    })?;
    let file = lab.dir().join("dns-bench.hosts");
    std::fs::write(&file, hosts_file)?;
    let host_ns = lab.host(1)?.ns.clone();
    let mut cmd = std::process::Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        &host_ns,
        "dnsmasq",
        "--keep-in-foreground",
        "--conf-file=/dev/null",
    ])
    .args([
        "--no-resolv",
        "--no-hosts",
        "--user=root",
        "--pid-file=",
        "--bind-interfaces",
    ])
    .arg(format!("--addn-hosts={}", file.display()))
    .arg(format!("--listen-address={gw}"))
    .args([
        "--port=5353",
        "--local=/weft/",
        "--cache-size=10000",
        "--log-facility=/dev/null",
    ])
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null());
    let mut dnsmasq = spawn_tied(cmd)?;
    let dm = SocketAddr::new(gw, 5353);
    let weft = SocketAddr::new(gw, 53);
    let probe = dns::query(&fqdns[0], RecordType::A, 1)?;
    lab.wait_for(Duration::from_secs(10), "dnsmasq to answer", || {
        let probe = probe.clone();
        weft_tests::netns::in_ns(&pod, move || -> Result<bool> {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.set_read_timeout(Some(Duration::from_millis(200)))?;
            s.send_to(&probe, dm)?;
            let mut buf = [0u8; 512];
            Ok(s.recv(&mut buf).is_ok())
        })?
    })?;
    let (mut qps_w, mut qps_d, mut lat_w, mut lat_d) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let result = (|| -> Result<()> {
        for _ in 0..args.rounds {
            let (q, l) = load(&pod, weft, &fqdns, args)?;
            qps_w.push(q);
            lat_w.extend(l);
            let (q, l) = load(&pod, dm, &fqdns, args)?;
            qps_d.push(q);
            lat_d.extend(l);
        }
        Ok(())
    })();
    stop(&mut dnsmasq, Duration::from_secs(5));
    result?;
    lat_w.sort();
    lat_d.sort();
    let (w, d) = (median(&qps_w), median(&qps_d));
    println!(
        "dns serving ({} names, {} clients, {} rounds of {} s each, median of rounds):",
        args.names, args.clients, args.rounds, args.seconds
    );
    for (who, q, l) in [("weft-node", w, &mut lat_w), ("dnsmasq  ", d, &mut lat_d)] {
        println!(
            "  {who}: {q:.0} queries/s, latency p50 {} p99 {}",
            ms(percentile(l, 50.0)),
            ms(percentile(l, 99.0))
        );
    }
    println!(
        "  weft/dnsmasq: queries/s {:.2}x, p99 {:.2}x",
        w / d,
        percentile(&lat_w, 99.0).as_secs_f64() / percentile(&lat_d, 99.0).as_secs_f64()
    );
    Ok(())
}

pub fn run_bench(args: Args) -> Result<()> {
    weft_tests::netns::require_root();
    let mut cfg = LabConfig::for_test(args.hosts, "vxlan");
    cfg.name = format!("dns{}", std::process::id());
    let mut lab = Lab::up(cfg)?;
    let result = propagation(&mut lab, &args).and_then(|_| serving(&lab, &args));
    let down = lab.down();
    result?;
    down
}
