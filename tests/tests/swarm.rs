//! `commons node join` end to end: real processes on 127.0.0.1, mDNS off,
//! bootstrap only through a node of the test.
#![allow(clippy::unwrap_used)] // helpers of tests may fail loudly

use std::time::Duration;

use commons_tests::node::{Node, Transports, wait_until};

fn sees_all(nodes: &[&Node], home: &std::path::Path) -> bool {
    nodes.iter().all(|n| {
        let mut seen = n.peer_ids(home);
        seen.sort();
        let mut others: Vec<String> = nodes
            .iter()
            .filter(|m| m.peer_id != n.peer_id)
            .map(|m| m.peer_id.clone())
            .collect();
        others.sort();
        seen == others
    })
}

#[test]
fn five_nodes_find_each_other_and_survive_a_crash_and_restart() {
    let home = tempfile::tempdir().unwrap();
    let ttl = 4;
    let boot = Node::start(
        home.path(),
        &home.path().join("n0"),
        &[],
        Transports::Both,
        ttl,
    );
    let via = vec![boot.addrs[0].clone()];
    let mut others: Vec<Node> = (1..5)
        .map(|i| {
            Node::start(
                home.path(),
                &home.path().join(format!("n{i}")),
                &via,
                Transports::Both,
                ttl,
            )
        })
        .collect();

    let all: Vec<&Node> = std::iter::once(&boot).chain(others.iter()).collect();
    let took = wait_until(Duration::from_secs(30), || sees_all(&all, home.path()));
    assert!(
        took.is_some(),
        "not every node saw the 4 others within 30 s"
    );
    // Capacity travels with the adverts.
    let status = boot.status(home.path()).unwrap();
    for p in status["peers"].as_array().unwrap() {
        assert!(p["cpu_cores"].as_u64().unwrap() >= 1);
        assert!(p["ram_bytes"].as_u64().unwrap() > 0);
        assert!(p["matmul_mflops"].as_u64().unwrap() > 0);
    }

    // A crash: the node leaves every table within twice the advert TTL.
    let victim = others.remove(3);
    let (victim_id, victim_dir) = (victim.peer_id.clone(), victim.data_dir.clone());
    let mut victim = victim;
    victim.kill();
    let gone = wait_until(Duration::from_secs(2 * ttl + 2), || {
        std::iter::once(&boot)
            .chain(others.iter())
            .all(|n| !n.peer_ids(home.path()).contains(&victim_id))
    });
    let gone = gone.expect("the crashed node stayed in a table");
    assert!(
        gone <= Duration::from_secs(2 * ttl),
        "left the tables after {gone:?}, more than 2 x TTL"
    );

    // Restarted on the same data directory: the same PeerId, back in every table.
    let back = Node::start(home.path(), &victim_dir, &via, Transports::Both, ttl);
    assert_eq!(back.peer_id, victim_id);
    let all: Vec<&Node> = std::iter::once(&boot)
        .chain(others.iter())
        .chain(std::iter::once(&back))
        .collect();
    assert!(
        wait_until(Duration::from_secs(30), || sees_all(&all, home.path())).is_some(),
        "the restarted node did not come back"
    );

    // A graceful leave (SIGTERM) removes it at once, well before its advert expires.
    let mut leaving = others.remove(0);
    let leaving_id = leaving.peer_id.clone();
    assert!(leaving.terminate(), "the node did not leave cleanly");
    let gone = wait_until(Duration::from_secs(ttl), || {
        !boot.peer_ids(home.path()).contains(&leaving_id)
    });
    assert!(gone.is_some(), "a node that left was still listed");
}

#[test]
fn tcp_only_and_quic_only_swarms_form() {
    for transports in [Transports::Tcp, Transports::Quic] {
        let home = tempfile::tempdir().unwrap();
        let a = Node::start(home.path(), &home.path().join("a"), &[], transports, 10);
        let b = Node::start(
            home.path(),
            &home.path().join("b"),
            &[a.addrs[0].clone()],
            transports,
            10,
        );
        let c = Node::start(
            home.path(),
            &home.path().join("c"),
            &[a.addrs[0].clone()],
            transports,
            10,
        );
        let expected = if transports == Transports::Quic {
            "/quic-v1/"
        } else {
            "/tcp/"
        };
        assert!(
            a.addrs.iter().all(|x| x.contains(expected)),
            "{:?}",
            a.addrs
        );
        assert!(
            wait_until(Duration::from_secs(30), || sees_all(
                &[&a, &b, &c],
                home.path()
            ))
            .is_some(),
            "{transports:?} swarm did not form"
        );
    }
}

#[test]
fn bad_join_arguments_are_clear_errors() {
    let home = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = commons_tests::output(
            commons_tests::commons(home.path())
                .arg("--data-dir")
                .arg(home.path().join("d"))
                .args(args),
        );
        assert!(!out.status.success(), "{args:?}");
        commons_tests::stderr(&out)
    };
    assert!(
        run(&["node", "join", "--no-mdns", "--listen", "not-a-multiaddr"])
            .contains("invalid value")
    );
    assert!(
        run(&[
            "node",
            "join",
            "--no-mdns",
            "--control",
            "0.0.0.0:0",
            "--listen",
            "/ip4/127.0.0.1/tcp/0"
        ])
        .contains("loopback only")
    );
    // A busy port.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let err = run(&[
        "node",
        "join",
        "--no-mdns",
        "--control",
        "127.0.0.1:0",
        "--listen",
        &format!("/ip4/127.0.0.1/tcp/{port}"),
    ]);
    assert!(err.contains("cannot listen on"), "{err}");
    // No node to ask.
    let err = run(&["node", "status", "--control", "127.0.0.1:9"]);
    assert!(err.contains("no node answers"), "{err}");
}
