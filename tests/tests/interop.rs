//! Another libp2p implementation can talk to a Commons node over the standard
//! protocols: here rust-libp2p as a plain client, with no Commons code,
//! identifies it, pings it and queries its Kademlia DHT.
#![allow(clippy::unwrap_used)] // helpers of tests may fail loudly

use std::time::Duration;

use commons_tests::node::{Node, Transports, wait_until};
use futures::StreamExt as _;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, StreamProtocol, identify, kad, noise, ping, tcp, yamux};

#[derive(NetworkBehaviour)]
struct Client {
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    kad: kad::Behaviour<kad::store::MemoryStore>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_rust_libp2p_identifies_pings_and_queries_a_node() {
    let home = tempfile::tempdir().unwrap();
    let a = Node::start(
        home.path(),
        &home.path().join("a"),
        &[],
        Transports::Tcp,
        10,
    );
    let b = Node::start(
        home.path(),
        &home.path().join("b"),
        &[a.addrs[0].clone()],
        Transports::Tcp,
        10,
    );
    // Let a learn b, so that its DHT has something to answer with.
    assert!(
        wait_until(Duration::from_secs(30), || a
            .peer_ids(home.path())
            .contains(&b.peer_id))
        .is_some()
    );

    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|key| {
            let id = key.public().to_peer_id();
            Client {
                identify: identify::Behaviour::new(identify::Config::new(
                    "/plain/1.0.0".into(),
                    key.public(),
                )),
                ping: ping::Behaviour::new(
                    ping::Config::new().with_interval(Duration::from_millis(200)),
                ),
                kad: kad::Behaviour::with_config(
                    id,
                    kad::store::MemoryStore::new(id),
                    kad::Config::new(StreamProtocol::new("/commons/kad/1.0.0")),
                ),
            }
        })
        .unwrap()
        .build();
    let addr: Multiaddr = a.addrs[0].parse().unwrap();
    let a_id: PeerId = a.peer_id.parse().unwrap();
    let b_id: PeerId = b.peer_id.parse().unwrap();
    swarm.behaviour_mut().kad.add_address(&a_id, addr.clone());
    swarm.dial(addr).unwrap();

    let (mut identified, mut pinged, mut found_b, mut queried) = (false, false, false, false);
    let outcome = tokio::time::timeout(Duration::from_secs(30), async {
        while !(identified && pinged && found_b) {
            match swarm.select_next_some().await {
                SwarmEvent::ConnectionEstablished { .. } if !queried => {
                    swarm.behaviour_mut().kad.get_closest_peers(b_id);
                    queried = true;
                }
                SwarmEvent::Behaviour(ClientEvent::Identify(identify::Event::Received {
                    peer_id,
                    info,
                    ..
                })) if peer_id == a_id => {
                    assert!(
                        info.agent_version.starts_with("commons/"),
                        "{}",
                        info.agent_version
                    );
                    for p in [
                        "/ipfs/id/1.0.0",
                        "/ipfs/ping/1.0.0",
                        "/commons/kad/1.0.0",
                        "/libp2p/autonat/1.0.0",
                        "/commons/work/1.0.0",
                    ] {
                        assert!(
                            info.protocols.iter().any(|x| x.as_ref() == p),
                            "{p} not offered: {:?}",
                            info.protocols
                        );
                    }
                    identified = true;
                }
                SwarmEvent::Behaviour(ClientEvent::Ping(ping::Event {
                    peer,
                    result: Ok(_),
                    ..
                })) if peer == a_id => pinged = true,
                SwarmEvent::Behaviour(ClientEvent::Kad(kad::Event::OutboundQueryProgressed {
                    result: kad::QueryResult::GetClosestPeers(Ok(r)),
                    ..
                })) => {
                    found_b = r.peers.iter().any(|p| p.peer_id == b_id);
                    if !found_b {
                        swarm.behaviour_mut().kad.get_closest_peers(b_id);
                    }
                }
                _ => {}
            }
        }
    })
    .await;
    assert!(
        outcome.is_ok(),
        "identify {identified}, ping {pinged}, kademlia found b {found_b}"
    );
}

/// One ping on `stream`: 32 bytes out, the same 32 back.
async fn ping_on(stream: &mut libp2p::Stream, fill: u8) -> std::io::Result<()> {
    use futures::{AsyncReadExt as _, AsyncWriteExt as _};
    let ping = [fill; 32];
    stream.write_all(&ping).await?;
    stream.flush().await?;
    let mut pong = [0u8; 32];
    stream.read_exact(&mut pong).await?;
    assert_eq!(pong, ping, "the pong is not the ping");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_answers_two_concurrent_ping_streams_of_a_peer() {
    let home = tempfile::tempdir().unwrap();
    let a = Node::start(
        home.path(),
        &home.path().join("a"),
        &[],
        Transports::Tcp,
        10,
    );
    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|_| libp2p_stream::Behaviour::new())
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(30)))
        .build();
    let mut control = swarm.behaviour().new_control();
    let addr: Multiaddr = a.addrs[0].parse().unwrap();
    let peer: PeerId = a.peer_id.parse().unwrap();
    swarm.dial(addr).unwrap();
    tokio::spawn(async move {
        loop {
            swarm.select_next_some().await;
        }
    });
    const PING: StreamProtocol = StreamProtocol::new("/ipfs/ping/1.0.0");
    let outcome = tokio::time::timeout(Duration::from_secs(30), async move {
        let mut first = control.open_stream(peer, PING).await.unwrap();
        let mut second = control.open_stream(peer, PING).await.unwrap();
        // Both answered, interleaved, several times each.
        for round in 0..3u8 {
            ping_on(&mut first, round).await.unwrap();
            ping_on(&mut second, 100 + round).await.unwrap();
        }
        // A third at the same time is closed unanswered…
        let mut third = control.open_stream(peer, PING).await.unwrap();
        assert!(
            ping_on(&mut third, 7).await.is_err(),
            "a third stream answered"
        );
        // …while the two go on, and a new one is answered once one closes.
        ping_on(&mut first, 9).await.unwrap();
        drop(first);
        ping_on(&mut second, 10).await.unwrap();
        let mut fourth = None;
        for _ in 0..50 {
            let mut s = control.open_stream(peer, PING).await.unwrap();
            if ping_on(&mut s, 11).await.is_ok() {
                fourth = Some(s);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            fourth.is_some(),
            "no stream answered after the first closed"
        );
        ping_on(&mut second, 12).await.unwrap();
    })
    .await;
    assert!(outcome.is_ok(), "pings did not complete within 30 s");
}
