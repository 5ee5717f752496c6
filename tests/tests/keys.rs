//! `commons keys` end to end, through the real binary.
#![allow(clippy::unwrap_used)] // helpers of tests may fail loudly

use commons_tests::{commons, output, stderr, stdout};

fn json(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_str(stdout(out).trim())
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(out)))
}

#[test]
fn generate_then_show_gives_a_stable_peer_id() {
    let home = tempfile::tempdir().unwrap();
    let key = home.path().join("k");
    let gen_out = output(
        commons(home.path())
            .args(["keys", "generate", "--json", "--out"])
            .arg(&key),
    );
    assert!(gen_out.status.success(), "{}", stderr(&gen_out));
    let generated = json(&gen_out);
    let peer_id = generated["peer_id"].as_str().unwrap().to_owned();
    assert!(peer_id.starts_with("12D3KooW"), "{peer_id}");
    assert_eq!(generated["public_key"].as_str().unwrap().len(), 64);

    for _ in 0..2 {
        let show = output(
            commons(home.path())
                .args(["keys", "show", "--key"])
                .arg(&key),
        );
        assert!(show.status.success(), "{}", stderr(&show));
        let text = stdout(&show);
        assert!(text.contains(&format!("peer id:    {peer_id}")), "{text}");
        assert!(
            text.contains(generated["public_key"].as_str().unwrap()),
            "{text}"
        );
    }

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    // A second generate does not overwrite the identity unless forced.
    let again = output(
        commons(home.path())
            .args(["keys", "generate", "--out"])
            .arg(&key),
    );
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("already exists"),
        "{}",
        stderr(&again)
    );
    let shown = json(&output(
        commons(home.path())
            .args(["keys", "show", "--json", "--key"])
            .arg(&key),
    ));
    assert_eq!(shown["peer_id"].as_str().unwrap(), peer_id);
}

#[test]
fn default_key_lives_in_the_data_dir() {
    let home = tempfile::tempdir().unwrap();
    let data = home.path().join("data-dir");
    let out = output(
        commons(home.path())
            .args(["keys", "generate", "--json", "--data-dir"])
            .arg(&data),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(data.join("node.key").is_file());
    let shown = output(
        commons(home.path())
            .env("COMMONS_DATA_DIR", &data)
            .args(["keys", "show", "--json"]),
    );
    assert!(shown.status.success(), "{}", stderr(&shown));
    assert_eq!(json(&shown)["peer_id"], json(&out)["peer_id"]);
}

#[cfg(unix)]
#[test]
fn bad_key_files_are_clear_errors() {
    use std::os::unix::fs::PermissionsExt;
    let home = tempfile::tempdir().unwrap();
    let key = home.path().join("k");
    assert!(
        output(
            commons(home.path())
                .args(["keys", "generate", "--out"])
                .arg(&key)
        )
        .status
        .success()
    );

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = output(
        commons(home.path())
            .args(["keys", "show", "--key"])
            .arg(&key),
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("permissions 0644"),
        "{}",
        stderr(&out)
    );

    for (contents, expected) in [
        (&b"garbage"[..], "not a commons key file"),
        (
            b"commons-ed25519-secret-key-v1\nabcd\n",
            "2 bytes, expected 32",
        ),
    ] {
        std::fs::write(&key, contents).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let out = output(
            commons(home.path())
                .args(["keys", "show", "--key"])
                .arg(&key),
        );
        assert!(!out.status.success());
        assert!(stderr(&out).contains(expected), "{}", stderr(&out));
        assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
    }

    let missing = output(
        commons(home.path())
            .args(["keys", "show", "--key"])
            .arg(home.path().join("nope")),
    );
    assert!(!missing.status.success());
    assert!(
        stderr(&missing).contains("cannot read key file"),
        "{}",
        stderr(&missing)
    );
}

#[test]
fn version_and_train_group() {
    let home = tempfile::tempdir().unwrap();
    let out = output(commons(home.path()).arg("--version"));
    assert!(out.status.success());
    assert!(stdout(&out).starts_with("commons "), "{}", stdout(&out));
    let help = output(commons(home.path()).args(["train", "submit", "--help"]));
    assert!(
        help.status.success(),
        "train submit --help: {}",
        stderr(&help)
    );
    assert!(stdout(&help).contains("--config"), "{}", stdout(&help));
    let out = output(commons(home.path()).args(["train", "anything"]));
    assert!(!out.status.success(), "train anything should fail");
    // A run needs its configuration.
    let out = output(commons(home.path()).args(["train", "submit"]));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--config train.toml"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn bad_config_file_is_a_clear_error() {
    let home = tempfile::tempdir().unwrap();
    let config = home.path().join("c.toml");
    std::fs::write(&config, "data_dri = 1\n").unwrap();
    let out = output(
        commons(home.path())
            .args(["keys", "show", "--config"])
            .arg(&config),
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("invalid config file"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("unknown field"), "{}", stderr(&out));
}
