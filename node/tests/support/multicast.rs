//! Raw multicast on loopback, for tests that forge, capture or replay
//! beacons: a sender whose datagrams never leave the host (interface
//! 127.0.0.1, TTL 0), and captures of what nodes send to a group.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

/// A UDP socket that sends to a group over loopback only.
pub fn sender() -> UdpSocket {
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind a loopback sender");
    let s2 = socket2::SockRef::from(&sock);
    s2.set_multicast_if_v4(&Ipv4Addr::LOCALHOST)
        .expect("multicast on loopback");
    s2.set_multicast_ttl_v4(0).expect("multicast TTL 0");
    sock
}

/// A socket on `group`'s port, joined to it on loopback (shared with the
/// nodes, as they share it), reading with `timeout`.
pub fn listener(group: SocketAddrV4, timeout: Duration) -> UdpSocket {
    let s = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .expect("udp socket");
    s.set_reuse_address(true).expect("SO_REUSEADDR");
    s.set_reuse_port(true).expect("SO_REUSEPORT");
    s.bind(&SocketAddr::V4(group).into())
        .expect("bind the group port");
    s.join_multicast_v4(group.ip(), &Ipv4Addr::LOCALHOST)
        .expect("join on loopback");
    let sock: UdpSocket = s.into();
    sock.set_read_timeout(Some(timeout)).expect("read timeout");
    sock
}

/// One datagram sent on `group` (within 5 s), and its source.
pub fn capture(group: SocketAddrV4) -> (Vec<u8>, SocketAddr) {
    let sock = listener(group, Duration::from_secs(5));
    let mut buf = [0u8; 2048];
    let (n, src) = sock.recv_from(&mut buf).expect("a beacon within 5 s");
    (buf[..n].to_vec(), src)
}

/// The first datagram on `group` that `wanted` accepts, within `limit`;
/// panics with `what` otherwise.
pub fn capture_where(
    group: SocketAddrV4,
    limit: Duration,
    what: &str,
    mut wanted: impl FnMut(&[u8]) -> bool,
) -> Vec<u8> {
    let sock = listener(group, Duration::from_secs(1));
    let until = Instant::now() + limit;
    let mut buf = [0u8; 2048];
    while Instant::now() < until {
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            if wanted(&buf[..n]) {
                return buf[..n].to_vec();
            }
        }
    }
    panic!("no {what} within {limit:?}");
}
