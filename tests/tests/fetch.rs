//! Model files between peers: a node started with only a model id fetches the
//! file from the peers that hold it, checks every block against the id,
//! rejects a peer whose copy is corrupt and takes the blocks from another,
//! keeps the good blocks of an interrupted fetch, then serves its layers.
#![allow(clippy::unwrap_used)] // helpers of tests may fail loudly

use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::time::Duration;

use commons_tests::node::{Node, Transports};

const BLOCK: u64 = 1 << 20;

fn model_id(path: &std::path::Path) -> String {
    commons_node::executor::model_id(path).unwrap().to_string()
}

#[test]
fn a_node_fetches_its_model_from_peers_past_a_corrupt_copy_and_resumes() {
    let home = tempfile::tempdir().unwrap();
    let bundled = commons_node::run_local::bundled_model().unwrap();
    let id = model_id(&bundled);
    let len = std::fs::metadata(&bundled).unwrap().len();
    // Two holders, each with its own copy of the file.
    let (good, bad) = (home.path().join("good.gguf"), home.path().join("bad.gguf"));
    std::fs::copy(&bundled, &good).unwrap();
    std::fs::copy(&bundled, &bad).unwrap();
    let holder = |name: &str, file: &std::path::Path, layers: &str, boot: &[String]| {
        Node::start_with(
            home.path(),
            &home.path().join(name),
            boot,
            Transports::Tcp,
            30,
            &["--model", file.to_str().unwrap(), "--layers", layers],
        )
    };
    let honest = holder("honest", &good, "0..30", &[]);
    let liar = holder("liar", &bad, "0..30", &[honest.addrs[0].clone()]);
    for n in [&honest, &liar] {
        assert!(n.wait_event("sharing", Duration::from_secs(60)).is_some());
    }
    // The liar's disk rots after it hashed the file: every block it sends is wrong.
    {
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&bad)
            .unwrap();
        for i in 0..len.div_ceil(BLOCK) {
            let at = i * BLOCK + (len - i * BLOCK).min(BLOCK) / 2;
            let mut b = [0u8; 1];
            f.seek(SeekFrom::Start(at)).unwrap();
            f.read_exact(&mut b).unwrap();
            f.seek(SeekFrom::Start(at)).unwrap();
            f.write_all(&[b[0] ^ 0x5a]).unwrap();
        }
    }
    // An interrupted earlier fetch left the first 10 blocks, one of them damaged.
    let data_dir = home.path().join("newcomer");
    let models = data_dir.join("models");
    std::fs::create_dir_all(&models).unwrap();
    {
        let mut src = std::fs::File::open(&bundled).unwrap();
        let mut head = vec![0u8; (10 * BLOCK) as usize];
        src.read_exact(&mut head).unwrap();
        head[(3 * BLOCK + 7) as usize] ^= 1;
        std::fs::write(models.join(format!("{id}.part")), &head).unwrap();
    }
    let newcomer = Node::start_with(
        home.path(),
        &data_dir,
        &[honest.addrs[0].clone(), liar.addrs[0].clone()],
        Transports::Tcp,
        30,
        &["--model", &id, "--layers", "10..20"],
    );
    let fetched = newcomer
        .wait_event("fetched", Duration::from_secs(120))
        .expect("the fetch did not finish");
    assert_eq!(fetched["bytes"], len);
    assert_eq!(fetched["resumed_blocks"], 9, "{fetched}");
    assert!(
        fetched["rejected_blocks"].as_u64().unwrap() >= 1,
        "{fetched}"
    );
    let serving = newcomer
        .wait_event("serving", Duration::from_secs(60))
        .expect("the fetched model was not served");
    assert_eq!(serving["layers"], "10..20");
    // The blocks it fetched gave it a bandwidth estimate, which it reports.
    let status = newcomer.status(home.path()).unwrap();
    assert!(
        status["bandwidth_bytes_per_sec"].as_u64().unwrap() > 0,
        "{status}"
    );
    // The file in place is the model, bit for bit.
    let placed = models.join(format!("{id}.gguf"));
    assert_eq!(
        std::fs::read(&placed).unwrap(),
        std::fs::read(&bundled).unwrap()
    );
    // Started again with the id, the node uses the file it has.
    drop(newcomer);
    let again = Node::start_with(
        home.path(),
        &data_dir,
        &[honest.addrs[0].clone()],
        Transports::Tcp,
        30,
        &["--model", &id, "--layers", "10..20"],
    );
    assert!(
        again
            .wait_event("fetching", Duration::from_secs(2))
            .is_none()
    );
}
