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
