use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::Message;
use crate::bounded::BoundedVec;
use crate::codec::{self, Limit};
use crate::envelope::MessageKind;
use crate::ids::{CoalitionId, Hash, NodeId, Signature};
use crate::keys::{self, Identity};
use crate::time::UnixMillis;

const CHARTER_TAG: &[u8] = b"commons/charter/v1";
const COALITION_ID_DOMAIN: &str = "commons coalition id v1";

/// A coalition's membership, signed by a quorum of its admins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoalitionCharter {
    /// Fixed at the first version: see [`CoalitionCharter::genesis_id`].
    pub id: CoalitionId,
    /// Human name.
    pub name: String,
    /// Increases with every change.
    pub version: u64,
    /// Members whose work the coalition's nodes accept.
    pub members: BoundedVec<NodeId, 4096>,
    /// Admins who may change the charter.
    pub admins: BoundedVec<NodeId, 64>,
    /// Admin signatures needed for a version to be valid.
    pub threshold: u16,
    /// Issue time.
    pub issued_at: UnixMillis,
    /// Signatures of admins over everything above.
    pub admin_signatures: BoundedVec<AdminSignature, 64>,
}

/// One admin's signature over a charter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminSignature {
    /// The admin.
    pub admin: NodeId,
    /// Signature over the charter's signing bytes.
    pub signature: Signature,
}

/// A charter that is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CharterError {
    /// The threshold is zero or larger than the number of admins.
    #[error("threshold {threshold} is not between 1 and the {admins} admins")]
    BadThreshold {
        /// The threshold.
        threshold: u16,
        /// Admins listed.
        admins: usize,
    },
    /// Fewer valid admin signatures than the threshold.
    #[error("{valid} valid admin signatures, {threshold} needed")]
    NotEnoughSignatures {
        /// Distinct admins whose signature verified.
        valid: usize,
        /// Needed.
        threshold: u16,
    },
    /// A signature is by a key that is not an admin.
    #[error("{signer} signed but is not an admin")]
    NotAnAdmin {
        /// The key.
        signer: NodeId,
    },
    /// Too many members, admins or signatures.
    #[error("the charter is too large")]
    TooLarge,
    /// The id is not the one its name and admins found: a charter claiming
    /// another coalition's id.
    #[error("the id {id} is not the one founded by this name and these admins")]
    WrongId {
        /// The id it claims.
        id: CoalitionId,
    },
    /// The name is empty or too long.
    #[error("a coalition's name must be 1 to {MAX_NAME_BYTES} bytes, not {len}")]
    BadName {
        /// Its length in bytes.
        len: usize,
    },
}

/// Longest coalition name, in bytes.
pub const MAX_NAME_BYTES: usize = 128;

impl CoalitionCharter {
    /// The first version of a coalition, unsigned: `admins` (sorted, each
    /// once) may change it, `threshold` of them must sign each version, and
    /// `members` (each once, in the order given) may submit its work.
    pub fn found(
        name: &str,
        admins: &[NodeId],
        threshold: u16,
        members: &[NodeId],
        issued_at: UnixMillis,
    ) -> Result<Self, CharterError> {
        if name.is_empty() || name.len() > MAX_NAME_BYTES {
            return Err(CharterError::BadName { len: name.len() });
        }
        let admins: Vec<NodeId> = admins
            .iter()
            .copied()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if threshold == 0 || usize::from(threshold) > admins.len() {
            return Err(CharterError::BadThreshold {
                threshold,
                admins: admins.len(),
            });
        }
        let mut unique = BTreeSet::new();
        let members: Vec<NodeId> = members
            .iter()
            .copied()
            .filter(|m| unique.insert(*m))
            .collect();
        Ok(Self {
            id: Self::genesis_id(name, &admins),
            name: name.to_owned(),
            version: 1,
            members: BoundedVec::try_from_vec(members).map_err(|_| CharterError::TooLarge)?,
            admins: BoundedVec::try_from_vec(admins).map_err(|_| CharterError::TooLarge)?,
            threshold,
            issued_at,
            admin_signatures: BoundedVec::new(),
        })
    }

    /// The next version, to be changed and then signed again: the same
    /// coalition, admins and threshold, the version one higher, no signatures.
    #[must_use]
    pub fn next_version(&self, issued_at: UnixMillis) -> Self {
        Self {
            version: self.version.saturating_add(1),
            issued_at,
            admin_signatures: BoundedVec::new(),
            ..self.clone()
        }
    }

    /// Adds `node` to the members; false if it already is one.
    pub fn add_member(&mut self, node: NodeId) -> Result<bool, CharterError> {
        if self.is_member(&node) {
            return Ok(false);
        }
        self.members
            .try_push(node)
            .map_err(|_| CharterError::TooLarge)?;
        Ok(true)
    }

    /// Removes `node` from the members; false if it was not one.
    pub fn remove_member(&mut self, node: &NodeId) -> bool {
        let before = self.members.len();
        self.members.retain(|m| m != node);
        self.members.len() < before
    }

    /// Whether `node` is an admin.
    #[must_use]
    pub fn is_admin(&self, node: &NodeId) -> bool {
        self.admins.contains(node)
    }

    /// The admins whose signature over this version verifies.
    #[must_use]
    pub fn valid_signers(&self) -> BTreeSet<NodeId> {
        let Ok(bytes) = self.signing_bytes() else {
            return BTreeSet::new();
        };
        self.admin_signatures
            .iter()
            .filter(|s| self.is_admin(&s.admin))
            .filter(|s| keys::verify(&s.admin, &bytes, &s.signature).is_ok())
            .map(|s| s.admin)
            .collect()
    }

    /// The id of a coalition founded under `name` by `admins`.
    #[must_use]
    pub fn genesis_id(name: &str, admins: &[NodeId]) -> CoalitionId {
        let mut parts: Vec<&[u8]> = vec![name.as_bytes()];
        parts.extend(admins.iter().map(|a| a.0.as_slice()));
        CoalitionId(Hash::of_parts(COALITION_ID_DOMAIN, &parts))
    }

    /// The bytes each admin signs: everything but the signatures.
    pub fn signing_bytes(&self) -> Result<Vec<u8>, codec::EncodeError> {
        let body = (
            &self.id,
            &self.name,
            self.version,
            &self.members,
            &self.admins,
            self.threshold,
            self.issued_at,
        );
        Ok([CHARTER_TAG, &codec::encode(&body)?].concat())
    }

    /// Adds `admin`'s signature.
    pub fn sign_as(&mut self, admin: &Identity) -> Result<(), CharterError> {
        let bytes = self.signing_bytes().map_err(|_| CharterError::TooLarge)?;
        let signature = admin.sign(&bytes);
        self.admin_signatures
            .try_push(AdminSignature {
                admin: admin.node_id(),
                signature,
            })
            .map_err(|_| CharterError::TooLarge)
    }

    /// Checks that the id is the one this name and these admins founded (so
    /// no one can sign a charter for someone else's coalition), the threshold,
    /// and that at least `threshold` distinct admins signed.
    pub fn verify(&self) -> Result<(), CharterError> {
        if Self::genesis_id(&self.name, &self.admins) != self.id {
            return Err(CharterError::WrongId { id: self.id });
        }
        let admins: BTreeSet<&NodeId> = self.admins.iter().collect();
        if self.threshold == 0 || usize::from(self.threshold) > admins.len() {
            return Err(CharterError::BadThreshold {
                threshold: self.threshold,
                admins: admins.len(),
            });
        }
        let bytes = self.signing_bytes().map_err(|_| CharterError::TooLarge)?;
        let mut valid = BTreeSet::new();
        for sig in &self.admin_signatures {
            if !admins.contains(&sig.admin) {
                return Err(CharterError::NotAnAdmin { signer: sig.admin });
            }
            if keys::verify(&sig.admin, &bytes, &sig.signature).is_ok() {
                valid.insert(sig.admin);
            }
        }
        if valid.len() < usize::from(self.threshold) {
            return Err(CharterError::NotEnoughSignatures {
                valid: valid.len(),
                threshold: self.threshold,
            });
        }
        Ok(())
    }

    /// Whether `node` is a member.
    #[must_use]
    pub fn is_member(&self, node: &NodeId) -> bool {
        self.members.contains(node)
    }
}

impl Message for CoalitionCharter {
    const KIND: MessageKind = MessageKind::CoalitionCharter;
    const LIMIT: Limit = Limit::M1;

    fn signed_by(&self, signer: &NodeId) -> bool {
        self.admins.contains(signer)
    }

    fn validity(&self) -> (UnixMillis, UnixMillis) {
        // A charter is valid until a higher version replaces it.
        (self.issued_at, UnixMillis(u64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn charter(admins: &[&Identity], threshold: u16) -> CoalitionCharter {
        let ids: Vec<NodeId> = admins.iter().map(|a| a.node_id()).collect();
        CoalitionCharter {
            id: CoalitionCharter::genesis_id("riverside", &ids),
            name: "riverside".into(),
            version: 1,
            members: BoundedVec::try_from_vec(vec![NodeId([9; 32])]).unwrap(),
            admins: BoundedVec::try_from_vec(ids).unwrap(),
            threshold,
            issued_at: UnixMillis(1),
            admin_signatures: BoundedVec::new(),
        }
    }

    #[test]
    fn quorum_of_admins_makes_it_valid() {
        let (a, b, c) = (
            Identity::from_secret([1; 32]),
            Identity::from_secret([2; 32]),
            Identity::from_secret([3; 32]),
        );
        let mut ch = charter(&[&a, &b, &c], 2);
        ch.sign_as(&a).unwrap();
        assert_eq!(
            ch.verify(),
            Err(CharterError::NotEnoughSignatures {
                valid: 1,
                threshold: 2
            })
        );
        // The same admin twice does not count twice.
        ch.sign_as(&a).unwrap();
        assert_eq!(
            ch.verify(),
            Err(CharterError::NotEnoughSignatures {
                valid: 1,
                threshold: 2
            })
        );
        ch.sign_as(&b).unwrap();
        ch.verify().unwrap();
        // Changing the membership after signing breaks the signatures.
        ch.members.try_push(NodeId([8; 32])).unwrap();
        assert_eq!(
            ch.verify(),
            Err(CharterError::NotEnoughSignatures {
                valid: 0,
                threshold: 2
            })
        );
    }

    #[test]
    fn no_one_can_sign_for_another_coalitions_id() {
        let (a, x) = (
            Identity::from_secret([1; 32]),
            Identity::from_secret([7; 32]),
        );
        let real = charter(&[&a], 1);
        // An outsider lists itself as the admin of a higher version of the
        // same id, and signs it: valid signatures, wrong coalition.
        let mut forged = charter(&[&x], 1);
        forged.id = real.id;
        forged.version = 99;
        forged.sign_as(&x).unwrap();
        assert_eq!(forged.verify(), Err(CharterError::WrongId { id: real.id }));
        let mut honest = charter(&[&x], 1);
        honest.sign_as(&x).unwrap();
        honest.verify().unwrap();
        assert_ne!(honest.id, real.id);
    }

    #[test]
    fn outsiders_and_bad_thresholds_are_refused() {
        let (a, x) = (
            Identity::from_secret([1; 32]),
            Identity::from_secret([7; 32]),
        );
        let mut ch = charter(&[&a], 1);
        ch.sign_as(&x).unwrap();
        assert_eq!(
            ch.verify(),
            Err(CharterError::NotAnAdmin {
                signer: x.node_id()
            })
        );
        let ch = charter(&[&a], 2);
        assert_eq!(
            ch.verify(),
            Err(CharterError::BadThreshold {
                threshold: 2,
                admins: 1
            })
        );
    }

    #[test]
    fn versions_are_founded_amended_and_signed_again() {
        let (a, b) = (
            Identity::from_secret([1; 32]),
            Identity::from_secret([2; 32]),
        );
        let (m, n) = (NodeId([8; 32]), NodeId([9; 32]));
        assert_eq!(
            CoalitionCharter::found("", &[a.node_id()], 1, &[], UnixMillis(1)),
            Err(CharterError::BadName { len: 0 })
        );
        assert_eq!(
            CoalitionCharter::found("x", &[a.node_id(), a.node_id()], 2, &[], UnixMillis(1)),
            Err(CharterError::BadThreshold {
                threshold: 2,
                admins: 1
            })
        );
        let mut v1 = CoalitionCharter::found(
            "riverside",
            &[b.node_id(), a.node_id()],
            2,
            &[m, m],
            UnixMillis(5),
        )
        .unwrap();
        // Admins in a canonical order, so the id does not depend on the order given.
        let mut sorted = [a.node_id(), b.node_id()];
        sorted.sort();
        assert_eq!(v1.id, CoalitionCharter::genesis_id("riverside", &sorted));
        assert_eq!(v1.admins.as_slice(), &sorted);
        assert_eq!(v1.members.as_slice(), &[m]);
        v1.sign_as(&a).unwrap();
        assert_eq!(v1.valid_signers().len(), 1);
        v1.sign_as(&b).unwrap();
        v1.verify().unwrap();

        let mut v2 = v1.next_version(UnixMillis(9));
        assert_eq!((v2.id, v2.version), (v1.id, 2));
        assert!(v2.valid_signers().is_empty());
        assert!(v2.add_member(n).unwrap());
        assert!(!v2.add_member(n).unwrap());
        assert!(v2.remove_member(&m));
        assert!(!v2.remove_member(&m));
        assert!(v2.is_member(&n) && !v2.is_member(&m));
        // v1's signatures do not carry over.
        v2.admin_signatures = v1.admin_signatures.clone();
        assert!(v2.valid_signers().is_empty());
        assert!(v2.verify().is_err());
        assert!(v2.is_admin(&a.node_id()) && !v2.is_admin(&m));
    }
}
