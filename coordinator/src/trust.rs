//! Coalition authorisation: which work a node or a coordinator takes, and from whom.
//!
//! A node or coordinator started with no charter serves open work only (work
//! that names no coalition). Started with charters, it serves those
//! coalitions only: work must name one of them, and the one asking (the
//! submitter of a job, the issuer of a work unit) must be one of its members.
//! Coordinators route a coalition's units only to nodes that advertise it
//! ([`serves`]).

use std::collections::{BTreeMap, BTreeSet};

use commons_protocol::messages::{CharterError, CoalitionCharter};
use commons_protocol::{CoalitionId, NodeId};

/// Whether a node advertising `served` takes work for `coalition`: open work
/// goes to nodes that serve no coalition, a coalition's work to nodes that serve it.
#[must_use]
pub fn serves(served: &BTreeSet<CoalitionId>, coalition: Option<CoalitionId>) -> bool {
    match coalition {
        None => served.is_empty(),
        Some(c) => served.contains(&c),
    }
}

/// A charter that cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the charter of coalition {name} ({id}) is not valid")]
pub struct InvalidCharter {
    /// Its name.
    pub name: String,
    /// Its id.
    pub id: CoalitionId,
    /// Why.
    #[source]
    pub source: CharterError,
}

/// Work refused because of who asks or which coalition it is for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Unauthorized {
    /// Open work where only coalitions are served.
    #[error("open work (no coalition) is refused here: it serves only {served}")]
    OpenWork {
        /// The coalitions served, by name and id.
        served: String,
    },
    /// A coalition not served here.
    #[error("coalition {coalition} is not served here ({served})")]
    NotServed {
        /// The coalition asked for.
        coalition: CoalitionId,
        /// What is served, for people.
        served: String,
    },
    /// The one asking is not a member.
    #[error("{who} is not a member of coalition {name} ({coalition})")]
    NotAMember {
        /// Who asked.
        who: NodeId,
        /// The coalition.
        coalition: CoalitionId,
        /// Its name.
        name: String,
    },
}

/// The coalitions served here, by their latest valid charter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Coalitions {
    charters: BTreeMap<CoalitionId, CoalitionCharter>,
}

impl Coalitions {
    /// Serves open work only.
    #[must_use]
    pub fn open() -> Self {
        Self::default()
    }

    /// Serves the coalitions of `charters`, each of which must be signed by
    /// its admins' threshold; of two versions of one coalition, the higher wins.
    pub fn new(charters: Vec<CoalitionCharter>) -> Result<Self, InvalidCharter> {
        let mut this = Self::default();
        for charter in charters {
            charter.verify().map_err(|source| InvalidCharter {
                name: charter.name.clone(),
                id: charter.id,
                source,
            })?;
            let newer = this
                .charters
                .get(&charter.id)
                .is_none_or(|old| old.version < charter.version);
            if newer {
                this.charters.insert(charter.id, charter);
            }
        }
        Ok(this)
    }

    /// True when no coalition is served (open work only).
    #[must_use]
    pub fn is_open(&self) -> bool {
        self.charters.is_empty()
    }

    /// The ids of the coalitions served.
    #[must_use]
    pub fn ids(&self) -> BTreeSet<CoalitionId> {
        self.charters.keys().copied().collect()
    }

    /// The charters served.
    pub fn charters(&self) -> impl Iterator<Item = &CoalitionCharter> {
        self.charters.values()
    }

    /// The charter of `id`, if served.
    #[must_use]
    pub fn get(&self, id: &CoalitionId) -> Option<&CoalitionCharter> {
        self.charters.get(id)
    }

    fn describe(&self) -> String {
        if self.is_open() {
            return "only open work is served here".into();
        }
        let names: Vec<String> = self
            .charters
            .values()
            .map(|c| format!("{} ({})", c.name, c.id))
            .collect();
        format!("it serves {}", names.join(", "))
    }

    /// Whether `who` may have work for `coalition` done here.
    pub fn authorize(
        &self,
        coalition: Option<CoalitionId>,
        who: &NodeId,
    ) -> Result<(), Unauthorized> {
        let Some(id) = coalition else {
            if self.is_open() {
                return Ok(());
            }
            let names: Vec<String> = self
                .charters
                .values()
                .map(|c| format!("{} ({})", c.name, c.id))
                .collect();
            return Err(Unauthorized::OpenWork {
                served: names.join(", "),
            });
        };
        let Some(charter) = self.charters.get(&id) else {
            return Err(Unauthorized::NotServed {
                coalition: id,
                served: self.describe(),
            });
        };
        if !charter.is_member(who) {
            return Err(Unauthorized::NotAMember {
                who: *who,
                coalition: id,
                name: charter.name.clone(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use commons_protocol::{Identity, UnixMillis};

    fn charter(name: &str, admin: &Identity, members: &[NodeId], version: u64) -> CoalitionCharter {
        let mut c =
            CoalitionCharter::found(name, &[admin.node_id()], 1, members, UnixMillis(1)).unwrap();
        c.version = version;
        c.sign_as(admin).unwrap();
        c
    }

    #[test]
    fn open_nodes_take_open_work_only() {
        let open = Coalitions::open();
        let who = NodeId([1; 32]);
        open.authorize(None, &who).unwrap();
        let a = charter("a", &Identity::from_secret([1; 32]), &[who], 1);
        let e = open.authorize(Some(a.id), &who).unwrap_err();
        assert!(matches!(e, Unauthorized::NotServed { .. }), "{e}");
        assert!(e.to_string().contains("only open work"), "{e}");
        assert!(serves(&BTreeSet::new(), None));
        assert!(!serves(&BTreeSet::new(), Some(a.id)));
    }

    #[test]
    fn coalition_nodes_take_their_members_work_only() {
        let admin = Identity::from_secret([1; 32]);
        let (member, outsider) = (NodeId([2; 32]), NodeId([3; 32]));
        let a = charter("riverside", &admin, &[member], 1);
        let b = charter("hillside", &admin, &[member, outsider], 1);
        let served = Coalitions::new(vec![a.clone()]).unwrap();
        assert_eq!(served.ids(), BTreeSet::from([a.id]));
        served.authorize(Some(a.id), &member).unwrap();
        let e = served.authorize(Some(a.id), &outsider).unwrap_err();
        assert_eq!(
            e,
            Unauthorized::NotAMember {
                who: outsider,
                coalition: a.id,
                name: "riverside".into()
            }
        );
        assert!(e.to_string().contains("riverside"), "{e}");
        let e = served.authorize(Some(b.id), &member).unwrap_err();
        assert!(matches!(e, Unauthorized::NotServed { coalition, .. } if coalition == b.id));
        assert!(e.to_string().contains("riverside"), "{e}");
        let e = served.authorize(None, &member).unwrap_err();
        assert!(matches!(e, Unauthorized::OpenWork { .. }), "{e}");
        assert!(serves(&served.ids(), Some(a.id)));
        assert!(!serves(&served.ids(), None));
        assert!(!serves(&served.ids(), Some(b.id)));
    }

    #[test]
    fn unsigned_charters_are_refused_and_newer_versions_win() {
        let admin = Identity::from_secret([1; 32]);
        let (m1, m2) = (NodeId([2; 32]), NodeId([3; 32]));
        let mut unsigned = charter("a", &admin, &[m1], 1);
        unsigned.admin_signatures = Default::default();
        let e = Coalitions::new(vec![unsigned]).unwrap_err();
        assert!(matches!(
            e.source,
            CharterError::NotEnoughSignatures { valid: 0, .. }
        ));
        let v1 = charter("a", &admin, &[m1], 1);
        let v2 = charter("a", &admin, &[m2], 2);
        let served = Coalitions::new(vec![v2.clone(), v1]).unwrap();
        assert_eq!(served.get(&v2.id), Some(&v2));
        assert!(served.authorize(Some(v2.id), &m1).is_err());
        served.authorize(Some(v2.id), &m2).unwrap();
    }
}
