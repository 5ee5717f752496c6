//! Coalition authorisation: which work a node or a coordinator takes, and from whom.
//!
//! A node or coordinator started with no charter serves open work only (work
//! that names no coalition). Started with charters, it serves those
//! coalitions only: work must name one of them, and the one asking (the
//! submitter of a job, the issuer of a work unit) must be one of its members.
//! Coordinators route a coalition's units only to nodes that advertise it
//! ([`serves`]).
//!
//! Charters travel through the swarm: a [`CharterBook`] keeps the latest
//! valid version of every coalition a node has heard of, and which of them
//! the node chose to serve. A node can start serving a coalition by its id
//! before its charter has reached it (the coalition is *pending*: its work is
//! refused until the charter arrives), and can drop one at any time.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

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
    /// The coalition is served here, but its charter has not arrived yet.
    #[error(
        "coalition {coalition} is served here, but its charter has not reached this node yet; try again shortly"
    )]
    CharterPending {
        /// The coalition.
        coalition: CoalitionId,
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
    /// Served, but their charters have not arrived: their work is refused.
    pending: BTreeSet<CoalitionId>,
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
        self.charters.is_empty() && self.pending.is_empty()
    }

    /// The ids of the coalitions served, pending ones included.
    #[must_use]
    pub fn ids(&self) -> BTreeSet<CoalitionId> {
        self.charters.keys().chain(&self.pending).copied().collect()
    }

    /// Coalitions served whose charters have not arrived yet.
    #[must_use]
    pub fn pending(&self) -> &BTreeSet<CoalitionId> {
        &self.pending
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
            .chain(
                self.pending
                    .iter()
                    .map(|id| format!("{id} (charter pending)")),
            )
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
                .chain(self.pending.iter().map(ToString::to_string))
                .collect();
            return Err(Unauthorized::OpenWork {
                served: names.join(", "),
            });
        };
        if self.pending.contains(&id) {
            return Err(Unauthorized::CharterPending { coalition: id });
        }
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

/// Charters of coalitions a node does not serve that it keeps at most (the
/// ones it serves are always kept): anyone can found a coalition, so what
/// the swarm can make a node remember is bounded.
pub const MAX_OTHER_CHARTERS: usize = 256;

/// How a charter was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Learned {
    /// The first version heard of this coalition.
    First,
    /// A newer version than the one known, which it replaces.
    Newer {
        /// The version it replaces.
        from: u64,
    },
}

/// A charter not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NotLearned {
    /// Not valid on its own.
    #[error(transparent)]
    Invalid(#[from] InvalidCharter),
    /// This version, or a newer one, is known already.
    #[error("coalition {name} ({id}): version {got} is not newer than version {have}, known here")]
    Stale {
        /// The coalition.
        id: CoalitionId,
        /// Its name.
        name: String,
        /// The version known.
        have: u64,
        /// The version offered.
        got: u64,
    },
    /// A later version with another threshold: one admin could otherwise
    /// lower the threshold and then sign alone.
    #[error(
        "coalition {name} ({id}): version {got} changes the threshold from {have} to {offered} admins, which no version may"
    )]
    ThresholdChanged {
        /// The coalition.
        id: CoalitionId,
        /// Its name.
        name: String,
        /// The threshold known.
        have: u16,
        /// The threshold offered.
        offered: u16,
        /// The version offered.
        got: u64,
    },
}

impl NotLearned {
    /// True for a version already superseded: nothing wrong, nothing new.
    #[must_use]
    pub fn is_stale(&self) -> bool {
        matches!(self, Self::Stale { .. })
    }
}

/// The latest valid charter of every coalition heard of, and which of them
/// are served. Pure: the node feeds it charters from files, its control API
/// and the swarm's gossip.
#[derive(Debug, Clone)]
pub struct CharterBook {
    known: BTreeMap<CoalitionId, CoalitionCharter>,
    served: BTreeSet<CoalitionId>,
    /// Known coalitions not served, oldest first: the first to be forgotten.
    others: VecDeque<CoalitionId>,
    limit: usize,
}

impl Default for CharterBook {
    fn default() -> Self {
        Self::with_limit(MAX_OTHER_CHARTERS)
    }
}

impl CharterBook {
    /// An empty book keeping at most `limit` charters of coalitions not served.
    #[must_use]
    pub fn with_limit(limit: usize) -> Self {
        Self {
            known: BTreeMap::new(),
            served: BTreeSet::new(),
            others: VecDeque::new(),
            limit,
        }
    }

    /// Takes `charter` if it is valid and newer than the version known. A
    /// later version must keep the coalition's threshold (its name and admins
    /// are bound to its id by [`CoalitionCharter::verify`]).
    pub fn learn(&mut self, charter: CoalitionCharter) -> Result<Learned, NotLearned> {
        charter.verify().map_err(|source| InvalidCharter {
            name: charter.name.clone(),
            id: charter.id,
            source,
        })?;
        let id = charter.id;
        let learned = match self.known.get(&id) {
            Some(old) if old.version >= charter.version => {
                return Err(NotLearned::Stale {
                    id,
                    name: old.name.clone(),
                    have: old.version,
                    got: charter.version,
                });
            }
            Some(old) if old.threshold != charter.threshold => {
                return Err(NotLearned::ThresholdChanged {
                    id,
                    name: old.name.clone(),
                    have: old.threshold,
                    offered: charter.threshold,
                    got: charter.version,
                });
            }
            Some(old) => Learned::Newer { from: old.version },
            None => Learned::First,
        };
        self.known.insert(id, charter);
        if learned == Learned::First && !self.served.contains(&id) {
            self.others.push_back(id);
            self.forget_oldest();
        }
        Ok(learned)
    }

    fn forget_oldest(&mut self) {
        while self.others.len() > self.limit {
            if let Some(old) = self.others.pop_front() {
                self.known.remove(&old);
            }
        }
    }

    /// Serves coalition `id` from now on (pending until its charter is
    /// known); false if it was served already.
    pub fn serve(&mut self, id: CoalitionId) -> bool {
        self.others.retain(|o| *o != id);
        self.served.insert(id)
    }

    /// Stops serving `id`; false if it was not served. Its charter stays
    /// known, so serving it again needs no new copy.
    pub fn drop_coalition(&mut self, id: &CoalitionId) -> bool {
        if !self.served.remove(id) {
            return false;
        }
        if self.known.contains_key(id) {
            self.others.push_back(*id);
            self.forget_oldest();
        }
        true
    }

    /// Whether `id` is served (pending or not).
    #[must_use]
    pub fn is_served(&self, id: &CoalitionId) -> bool {
        self.served.contains(id)
    }

    /// The latest known charter of `id`.
    #[must_use]
    pub fn get(&self, id: &CoalitionId) -> Option<&CoalitionCharter> {
        self.known.get(id)
    }

    /// Every charter known, served or not.
    pub fn known(&self) -> impl Iterator<Item = &CoalitionCharter> {
        self.known.values()
    }

    /// What is served now: the served coalitions' latest charters, and the
    /// served ids whose charters are not known yet.
    #[must_use]
    pub fn coalitions(&self) -> Coalitions {
        let mut charters = BTreeMap::new();
        let mut pending = BTreeSet::new();
        for id in &self.served {
            match self.known.get(id) {
                Some(c) => {
                    charters.insert(*id, c.clone());
                }
                None => {
                    pending.insert(*id);
                }
            }
        }
        Coalitions { charters, pending }
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

    #[test]
    fn the_book_keeps_the_newest_valid_version_and_serves_by_choice() {
        let (admin, rogue) = (
            Identity::from_secret([1; 32]),
            Identity::from_secret([9; 32]),
        );
        let (m1, m2) = (NodeId([2; 32]), NodeId([3; 32]));
        let v1 = charter("a", &admin, &[m1], 1);
        let v2 = charter("a", &admin, &[m1, m2], 2);
        let mut book = CharterBook::default();

        // Served by id before the charter is known: pending, refusing work.
        assert!(book.serve(v1.id));
        assert!(!book.serve(v1.id));
        let now = book.coalitions();
        assert!(!now.is_open());
        assert_eq!(now.ids(), BTreeSet::from([v1.id]));
        assert_eq!(
            now.authorize(Some(v1.id), &m1),
            Err(Unauthorized::CharterPending { coalition: v1.id })
        );
        assert!(matches!(
            now.authorize(None, &m1),
            Err(Unauthorized::OpenWork { .. })
        ));

        assert_eq!(book.learn(v1.clone()), Ok(Learned::First));
        book.coalitions().authorize(Some(v1.id), &m1).unwrap();
        assert!(book.coalitions().authorize(Some(v1.id), &m2).is_err());
        assert_eq!(book.learn(v2.clone()), Ok(Learned::Newer { from: 1 }));
        book.coalitions().authorize(Some(v1.id), &m2).unwrap();
        // The old version again, or the same one: stale, nothing changes.
        let e = book.learn(v1.clone()).unwrap_err();
        assert!(e.is_stale(), "{e}");
        assert!(book.learn(v2.clone()).unwrap_err().is_stale());
        assert_eq!(book.get(&v1.id), Some(&v2));

        // Unsigned, claimed by a rogue, or with a lowered threshold: refused.
        let mut unsigned = charter("a", &admin, &[m1], 3);
        unsigned.admin_signatures = Default::default();
        assert!(matches!(book.learn(unsigned), Err(NotLearned::Invalid(_))));
        let mut forged = charter("a", &rogue, &[NodeId([7; 32])], 5);
        forged.id = v1.id;
        forged.admin_signatures = Default::default();
        forged.sign_as(&rogue).unwrap();
        let e = book.learn(forged).unwrap_err();
        assert!(
            matches!(
                &e,
                NotLearned::Invalid(InvalidCharter {
                    source: CharterError::WrongId { .. },
                    ..
                })
            ),
            "{e}"
        );
        let (b1, b2) = (
            Identity::from_secret([4; 32]),
            Identity::from_secret([5; 32]),
        );
        let mut two =
            CoalitionCharter::found("b", &[b1.node_id(), b2.node_id()], 2, &[m1], UnixMillis(1))
                .unwrap();
        two.sign_as(&b1).unwrap();
        two.sign_as(&b2).unwrap();
        book.learn(two.clone()).unwrap();
        let mut lowered = two.next_version(UnixMillis(2));
        lowered.threshold = 1;
        lowered.add_member(NodeId([7; 32])).unwrap();
        lowered.sign_as(&b1).unwrap();
        assert!(matches!(
            book.learn(lowered),
            Err(NotLearned::ThresholdChanged {
                have: 2,
                offered: 1,
                ..
            })
        ));

        // Dropped at any time; the charter stays known for serving again.
        assert!(book.drop_coalition(&v1.id));
        assert!(!book.drop_coalition(&v1.id));
        assert!(book.coalitions().is_open());
        assert!(book.serve(v1.id));
        book.coalitions().authorize(Some(v1.id), &m2).unwrap();
    }

    #[test]
    fn the_book_forgets_the_oldest_coalitions_it_does_not_serve() {
        let admin = Identity::from_secret([1; 32]);
        let mut book = CharterBook::with_limit(2);
        let cs: Vec<CoalitionCharter> = (0..4)
            .map(|i| charter(&format!("c{i}"), &admin, &[], 1))
            .collect();
        book.serve(cs[0].id);
        for c in &cs {
            book.learn(c.clone()).unwrap();
        }
        // Served: always kept; of the others, the two latest.
        let kept: BTreeSet<CoalitionId> = book.known().map(|c| c.id).collect();
        assert_eq!(kept, BTreeSet::from([cs[0].id, cs[2].id, cs[3].id]));
        assert!(book.get(&cs[1].id).is_none());
        // A dropped coalition joins the others, and pushes out the oldest.
        book.drop_coalition(&cs[0].id);
        let kept: BTreeSet<CoalitionId> = book.known().map(|c| c.id).collect();
        assert_eq!(kept, BTreeSet::from([cs[0].id, cs[3].id]));
    }
}
