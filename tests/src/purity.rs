//! The pure crates (`commons-protocol`, `commons-coordinator`) must never
//! depend, even indirectly, on an async runtime, a network stack or a compute
//! kernel. This reads `cargo metadata` and walks their normal dependencies.

use std::collections::{BTreeSet, HashMap, VecDeque};

use anyhow::{Context as _, bail};
use serde_json::Value;

/// Crates that must never appear under a pure crate (matched as a name or a `name-` prefix).
pub const FORBIDDEN: &[&str] = &["tokio", "libp2p", "candle", "quinn", "mio"];

/// Pure crates of the workspace.
pub const PURE: &[&str] = &["commons-protocol", "commons-coordinator"];

fn forbidden(name: &str) -> bool {
    FORBIDDEN.iter().any(|f| {
        name == *f || name.starts_with(&format!("{f}-")) || name.starts_with(&format!("{f}_"))
    })
}

/// For each pure crate, the forbidden crates in its normal-dependency closure.
pub fn violations(metadata: &Value) -> anyhow::Result<Vec<(String, BTreeSet<String>)>> {
    let packages = metadata["packages"]
        .as_array()
        .context("metadata without packages")?;
    let name_of: HashMap<&str, &str> = packages
        .iter()
        .filter_map(|p| Some((p["id"].as_str()?, p["name"].as_str()?)))
        .collect();
    let nodes = metadata["resolve"]["nodes"]
        .as_array()
        .context("metadata without resolve graph")?;
    let deps_of: HashMap<&str, Vec<&str>> = nodes
        .iter()
        .filter_map(|n| {
            let id = n["id"].as_str()?;
            let deps = n["deps"]
                .as_array()?
                .iter()
                .filter(|d| {
                    d["dep_kinds"]
                        .as_array()
                        .is_some_and(|ks| ks.iter().any(|k| k["kind"].is_null()))
                })
                .filter_map(|d| d["pkg"].as_str())
                .collect();
            Some((id, deps))
        })
        .collect();

    let mut out = Vec::new();
    for pure in PURE {
        let Some((root, _)) = name_of.iter().find(|(_, name)| *name == pure) else {
            bail!("{pure} is not in the workspace");
        };
        let mut seen = BTreeSet::new();
        let mut queue = VecDeque::from([*root]);
        let mut bad = BTreeSet::new();
        while let Some(id) = queue.pop_front() {
            if !seen.insert(id) {
                continue;
            }
            let name = name_of.get(id).copied().unwrap_or(id);
            if forbidden(name) {
                bad.insert(name.to_owned());
            }
            queue.extend(deps_of.get(id).into_iter().flatten());
        }
        out.push(((*pure).to_owned(), bad));
    }
    Ok(out)
}

/// `cargo metadata` of this workspace.
pub fn workspace_metadata() -> anyhow::Result<Value> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml");
    let out = std::process::Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--locked",
            "--manifest-path",
            manifest,
        ])
        .output()
        .context("cannot run cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).context("cargo metadata printed invalid JSON")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn dep(pkg: &str, kind: Option<&str>) -> Value {
        json!({ "name": pkg, "pkg": pkg, "dep_kinds": [{ "kind": kind, "target": null }] })
    }

    fn graph(protocol_deps: Vec<Value>) -> Value {
        let names = [
            "commons-protocol",
            "commons-coordinator",
            "serde",
            "tokio",
            "libp2p-core",
            "candle-core",
            "proptest",
        ];
        json!({
            "packages": names.iter().map(|n| json!({ "id": n, "name": n })).collect::<Vec<_>>(),
            "resolve": { "nodes": [
                { "id": "commons-protocol", "deps": protocol_deps },
                { "id": "commons-coordinator", "deps": [dep("commons-protocol", None)] },
                { "id": "serde", "deps": [] },
                { "id": "proptest", "deps": [dep("tokio", None)] },
                { "id": "tokio", "deps": [] },
                { "id": "libp2p-core", "deps": [] },
                { "id": "candle-core", "deps": [] },
            ]}
        })
    }

    #[test]
    fn clean_graph_passes_and_dev_deps_do_not_count() {
        let v = violations(&graph(vec![
            dep("serde", None),
            dep("proptest", Some("dev")),
        ]))
        .unwrap();
        assert!(v.iter().all(|(_, bad)| bad.is_empty()), "{v:?}");
    }

    #[test]
    fn direct_and_transitive_violations_are_found() {
        let v = violations(&graph(vec![
            dep("serde", None),
            dep("proptest", None),
            dep("candle-core", None),
        ]))
        .unwrap();
        let expected: BTreeSet<String> = ["tokio".to_owned(), "candle-core".to_owned()].into();
        assert_eq!(v[0], ("commons-protocol".to_owned(), expected.clone()));
        // The coordinator depends on the protocol, so it inherits the violation.
        assert_eq!(v[1], ("commons-coordinator".to_owned(), expected));
        let v = violations(&graph(vec![dep("libp2p-core", None)])).unwrap();
        assert_eq!(v[0].1, ["libp2p-core".to_owned()].into());
    }
}
