//! What crosses a wire: an AF_PACKET socket in a namespace (all its
//! interfaces) counting IPv4 (and IPv6) packets by kind for a while. The oracle for
//! "only ESP (or WireGuard) between the hosts": no tcpdump needed.

use anyhow::{Context, Result};
use nix::sys::socket::{self, AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType};
use nix::sys::time::TimeVal;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// IPv4 packets seen, by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Seen {
    /// ESP (protocol 50), as (source, destination).
    pub esp: Vec<(Ipv4Addr, Ipv4Addr)>,
    /// VXLAN (UDP to port 8472).
    pub vxlan: usize,
    /// WireGuard (UDP to port 51820), as (source, destination).
    pub wireguard: Vec<(Ipv4Addr, Ipv4Addr)>,
    /// Packets whose own source or destination is in `inner`: pod traffic
    /// in the clear.
    pub plaintext: Vec<(Ipv4Addr, Ipv4Addr, u8)>,
    /// Everything IPv4.
    pub total: usize,
    /// WireGuard over IPv6 (UDP to 51820 or 51821), as (source, destination).
    pub wireguard6: Vec<(Ipv6Addr, Ipv6Addr)>,
    /// IPv6 packets whose own source or destination is in the IPv6 pod
    /// network: pod traffic in the clear.
    pub plaintext6: Vec<(Ipv6Addr, Ipv6Addr, u8)>,
    /// Everything IPv6.
    pub total6: usize,
}

/// Counts IPv4 frames on every interface of namespace `ns` for `dur`;
/// `inner` is the pod network (e.g. 10.244.0.0/16).
pub fn capture(ns: &str, dur: Duration, inner: ipnet::Ipv4Net) -> Result<Seen> {
    capture_both(ns, dur, inner, None)
}

/// [`capture`], counting IPv6 frames too; `inner6` is the IPv6 pod
/// network.
pub fn capture_both(
    ns: &str,
    dur: Duration,
    inner: ipnet::Ipv4Net,
    inner6: Option<ipnet::Ipv6Net>,
) -> Result<Seen> {
    crate::netns::spawn_in_ns(ns, move || -> Result<Seen> {
        let fd = socket::socket(
            AddressFamily::Packet,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::EthAll,
        )
        .context("AF_PACKET socket (needs root)")?;
        socket::setsockopt(
            &fd,
            socket::sockopt::ReceiveTimeout,
            &TimeVal::new(0, 100_000),
        )?;
        let mut seen = Seen::default();
        let mut buf = vec![0u8; 65536];
        let end = Instant::now() + dur;
        while Instant::now() < end {
            let n = match socket::recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                Ok(n) => n,
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            };
            classify_both(&buf[..n], inner, inner6, &mut seen);
        }
        Ok(seen)
    })?
    .join()
    .map_err(|_| anyhow::anyhow!("capture thread panicked"))??
}

/// Adds one Ethernet frame to `seen` (IPv4 only).
pub fn classify(frame: &[u8], inner: ipnet::Ipv4Net, seen: &mut Seen) {
    classify_both(frame, inner, None, seen)
}

/// Adds one Ethernet frame to `seen`; IPv6 frames too with `inner6`.
pub fn classify_both(
    frame: &[u8],
    inner: ipnet::Ipv4Net,
    inner6: Option<ipnet::Ipv6Net>,
    seen: &mut Seen,
) {
    if let Some(inner6) = inner6 {
        if frame.len() >= 14 + 40 && frame[12..14] == [0x86, 0xdd] {
            let ip = &frame[14..];
            let next = ip[6];
            let addr = |at: usize| {
                let mut b = [0u8; 16];
                b.copy_from_slice(&ip[at..at + 16]);
                Ipv6Addr::from(b)
            };
            let (src, dst) = (addr(8), addr(24));
            seen.total6 += 1;
            let udp_to =
                |port: u16| next == 17 && ip.len() >= 44 && ip[42..44] == port.to_be_bytes();
            if udp_to(51820) || udp_to(51821) {
                seen.wireguard6.push((src, dst));
            }
            if inner6.contains(&src) || inner6.contains(&dst) {
                seen.plaintext6.push((src, dst, next));
            }
            return;
        }
    }
    if frame.len() < 14 + 20 || frame[12..14] != [0x08, 0x00] {
        return;
    }
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let proto = ip[9];
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    seen.total += 1;
    if proto == 50 {
        seen.esp.push((src, dst));
    }
    let udp_to = |port: u16| {
        proto == 17 && ip.len() >= ihl + 4 && ip[ihl + 2..ihl + 4] == port.to_be_bytes()
    };
    if udp_to(8472) {
        seen.vxlan += 1;
    }
    if udp_to(51820) {
        seen.wireguard.push((src, dst));
    }
    if inner.contains(&src) || inner.contains(&dst) {
        seen.plaintext.push((src, dst, proto));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(proto: u8, src: [u8; 4], dst: [u8; 4], dport: u16) -> Vec<u8> {
        let mut f = vec![0u8; 14];
        f[12] = 0x08;
        let mut ip = vec![0x45, 0, 0, 48, 0, 0, 0, 0, 64, proto, 0, 0];
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&dst);
        ip.extend_from_slice(&[0, 0]);
        ip.extend_from_slice(&dport.to_be_bytes());
        ip.extend_from_slice(&[0; 24]);
        f.extend(ip);
        f
    }

    fn frame6(next: u8, src: &str, dst: &str, dport: u16) -> Vec<u8> {
        let mut f = vec![0u8; 14];
        f[12..14].copy_from_slice(&[0x86, 0xdd]);
        let mut ip = vec![0x60, 0, 0, 0, 0, 8, next, 64];
        ip.extend_from_slice(&src.parse::<Ipv6Addr>().unwrap().octets());
        ip.extend_from_slice(&dst.parse::<Ipv6Addr>().unwrap().octets());
        ip.extend_from_slice(&[0, 0]);
        ip.extend_from_slice(&dport.to_be_bytes());
        ip.extend_from_slice(&[0; 4]);
        f.extend(ip);
        f
    }

    #[test]
    fn ipv6_frames_are_told_apart_when_asked_for() {
        let inner: ipnet::Ipv4Net = "10.244.0.0/16".parse().unwrap();
        let inner6: ipnet::Ipv6Net = "fdc6:7765:6675::/48".parse().unwrap();
        let wg = frame6(17, "fdc6:7765:6674:18::b", "fdc6:7765:6674:18::c", 51821);
        let clear = frame6(58, "fdc6:7765:6675:1::2", "fdc6:7765:6675:2::2", 0);
        let mut s = Seen::default();
        for f in [&wg, &clear] {
            classify(f, inner, &mut s);
        }
        assert_eq!(s, Seen::default(), "IPv4 only unless asked");
        for f in [&wg, &clear] {
            classify_both(f, inner, Some(inner6), &mut s);
        }
        assert_eq!(s.total6, 2);
        assert_eq!(
            s.wireguard6,
            [(
                "fdc6:7765:6674:18::b".parse().unwrap(),
                "fdc6:7765:6674:18::c".parse().unwrap()
            )]
        );
        assert_eq!(s.plaintext6.len(), 1);
        assert_eq!(s.plaintext6[0].2, 58);
        assert_eq!(s.total, 0);
    }

    #[test]
    fn frames_are_told_apart() {
        let inner: ipnet::Ipv4Net = "10.244.0.0/16".parse().unwrap();
        let mut s = Seen::default();
        classify(
            &frame(50, [198, 18, 0, 11], [198, 18, 0, 12], 0),
            inner,
            &mut s,
        );
        classify(
            &frame(17, [198, 18, 0, 11], [198, 18, 0, 12], 8472),
            inner,
            &mut s,
        );
        classify(
            &frame(17, [198, 18, 0, 12], [198, 18, 0, 11], 51820),
            inner,
            &mut s,
        );
        classify(
            &frame(1, [10, 244, 1, 2], [10, 244, 2, 2], 0),
            inner,
            &mut s,
        );
        classify(&[0u8; 20], inner, &mut s);
        assert_eq!(
            s.esp,
            vec![(
                "198.18.0.11".parse().unwrap(),
                "198.18.0.12".parse().unwrap()
            )]
        );
        assert_eq!(s.vxlan, 1);
        assert_eq!(
            s.wireguard,
            vec![(
                "198.18.0.12".parse().unwrap(),
                "198.18.0.11".parse().unwrap()
            )]
        );
        assert_eq!(s.plaintext.len(), 1);
        assert_eq!(s.total, 4);
    }
}
