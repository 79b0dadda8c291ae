//! Edge admission: join tokens, and the record of each admitted edge's key.
//!
//! An operator issues a join token for a node name ([`create_token`],
//! `outpost-cloud token create --node NAME`). The token is printed once; the
//! API keeps only a hash of its secret half, in a Secret of type
//! [`TOKEN_SECRET_TYPE`] in the [`SYSTEM_NAMESPACE`] namespace, with its
//! expiry. An edge presents the token once, over a connection that proves it
//! holds its iroh key ([`admit`]; the join protocol in [`crate::join`] is the
//! network side). Admission spends the token and records the edge's key in
//! the same Secret, in one update guarded by the Secret's resourceVersion,
//! so two edges racing with one token cannot both win.
//!
//! From then on the edge is known by that key only: the admitted records (the
//! Secrets labelled [`ADMITTED_LABEL`]) make up the sync roster
//! ([`roster_of`]). A spent, expired or unknown token is refused with an
//! error that says which; so is a malformed one. Presenting a spent token
//! again with the key it admitted succeeds (a retry after a lost reply).
//! Admitting a node again (a new token, a new key: an edge that lost its disk)
//! replaces the node's key; the most recent admission wins.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use outpost_sync::PeerId;
use outpost_sync::access::{Role, Roster};

/// The namespace that holds join tokens and admission records.
pub const SYSTEM_NAMESPACE: &str = "outpost-system";
/// The type of a join-token Secret.
pub const TOKEN_SECRET_TYPE: &str = "outpost.io/join-token";
/// Label on token Secrets that admitted an edge (value `true`).
pub const ADMITTED_LABEL: &str = "outpost.io/admitted";
/// Annotation: the node a token admits.
pub const NODE_ANNOTATION: &str = "outpost.io/node";
/// Annotation: the site of the node, if any.
pub const SITE_ANNOTATION: &str = "outpost.io/site";
/// Annotation: when the token expires (RFC 3339).
pub const EXPIRES_ANNOTATION: &str = "outpost.io/expires-at";
/// Annotation: when the token was spent (RFC 3339).
pub const ADMITTED_AT_ANNOTATION: &str = "outpost.io/admitted-at";
/// Annotation on token Secrets and Nodes: the admitted edge's iroh key (hex).
pub const PEER_KEY_ANNOTATION: &str = "outpost.io/peer-key";
/// The Secret data key holding the BLAKE3 hash (hex) of the token's secret.
const SECRET_HASH_KEY: &str = "secret-hash";

/// Characters of token ids and secrets (lowercase letters and digits, as
/// kubeadm's bootstrap tokens).
const ALPHABET: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";
/// Length of a token's public id.
const ID_LEN: usize = 8;
/// Length of a token's secret (about 165 bits).
const SECRET_LEN: usize = 32;

/// A join token: `<id>.<secret>`. Only the id is stored in clear.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    id: String,
    secret: String,
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never log the secret half.
        write!(f, "JoinToken({}.***)", self.id)
    }
}

impl std::fmt::Display for JoinToken {
    /// The full token, as the operator hands it to the edge.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.id, self.secret)
    }
}

/// Why a string is not a join token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "malformed join token: {0} (expected <8 characters>.<32 characters>, lowercase letters and digits)"
)]
pub struct MalformedToken(&'static str);

impl std::str::FromStr for JoinToken {
    type Err = MalformedToken;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (id, secret) = s.split_once('.').ok_or(MalformedToken("no '.'"))?;
        let valid = |part: &str| part.bytes().all(|b| ALPHABET.contains(&b));
        if id.len() != ID_LEN || !valid(id) {
            return Err(MalformedToken("bad id"));
        }
        if secret.len() != SECRET_LEN || !valid(secret) {
            return Err(MalformedToken("bad secret"));
        }
        Ok(Self {
            id: id.to_owned(),
            secret: secret.to_owned(),
        })
    }
}

impl JoinToken {
    /// A new random token.
    pub fn generate() -> Result<Self, getrandom::Error> {
        Ok(Self {
            id: random_string(ID_LEN)?,
            secret: random_string(SECRET_LEN)?,
        })
    }

    /// The token's public id (names its Secret).
    pub fn id(&self) -> &str {
        &self.id
    }

    fn secret_hash(&self) -> blake3::Hash {
        blake3::hash(self.secret.as_bytes())
    }
}

fn random_string(len: usize) -> Result<String, getrandom::Error> {
    let mut out = String::with_capacity(len);
    let mut buf = [0u8; 64];
    while out.len() < len {
        getrandom::fill(&mut buf)?;
        // Rejection sampling keeps every character equally likely.
        for b in buf {
            if (b as usize) < 252 && out.len() < len {
                out.push(ALPHABET[b as usize % 36] as char);
            }
        }
    }
    Ok(out)
}

/// The name of a token's Secret.
pub fn token_secret_name(id: &str) -> String {
    format!("join-token-{id}")
}

/// A token issued by [`create_token`].
#[derive(Debug, Clone)]
pub struct IssuedToken {
    /// The token, to hand to the edge once.
    pub token: JoinToken,
    /// The node it admits.
    pub node: String,
    /// When it expires.
    pub expires_at: Timestamp,
}

/// Why a token could not be issued.
#[derive(Debug, thiserror::Error)]
pub enum CreateTokenError {
    /// The node name is not a valid Kubernetes node name.
    #[error("invalid node name {0:?}: {1}")]
    InvalidNode(String, &'static str),
    /// The time to live is not positive.
    #[error("the token's time to live must be positive")]
    InvalidTtl,
    /// No randomness.
    #[error("cannot generate a token: no randomness: {0}")]
    Random(String),
    /// The API refused.
    #[error("cannot store the join token in {SYSTEM_NAMESPACE}: {0}")]
    Kube(#[from] kube::Error),
}

/// Checks a node name: a DNS subdomain (lowercase letters, digits, `-`,
/// `.`), at most 63 characters so that it also fits label values and
/// document ids.
pub fn validate_node_name(node: &str) -> Result<(), &'static str> {
    if node.is_empty() || node.len() > 63 {
        return Err("must be 1 to 63 characters");
    }
    if !node
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    {
        return Err("only lowercase letters, digits, '-' and '.'");
    }
    let edge_ok = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_alphanumeric());
    if !edge_ok(node.bytes().next()) || !edge_ok(node.bytes().last()) {
        return Err("must start and end with a letter or digit");
    }
    Ok(())
}

/// Creates the [`SYSTEM_NAMESPACE`] namespace if it is missing. A bridge
/// that may not create namespaces (deployed with `deploy/cloud-rbac.yaml`,
/// which creates it) goes on: a missing namespace then shows as a clear
/// error on the first token or watch.
pub async fn ensure_namespace(client: &Client) -> Result<(), kube::Error> {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(SYSTEM_NAMESPACE.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    match api.create(&PostParams::default(), &ns).await {
        Ok(_) => Ok(()),
        Err(e) if is_status(&e, 409) || is_status(&e, 403) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Whether `e` is an API error with this HTTP status code.
pub fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

/// Issues a join token for `node`, valid for `ttl`, stored (hashed) in a
/// Secret in [`SYSTEM_NAMESPACE`].
pub async fn create_token(
    client: &Client,
    node: &str,
    site: Option<&str>,
    ttl: std::time::Duration,
) -> Result<IssuedToken, CreateTokenError> {
    validate_node_name(node).map_err(|why| CreateTokenError::InvalidNode(node.into(), why))?;
    if let Some(site) = site {
        validate_node_name(site).map_err(|why| CreateTokenError::InvalidNode(site.into(), why))?;
    }
    let ttl = SignedDuration::try_from(ttl).map_err(|_| CreateTokenError::InvalidTtl)?;
    if ttl <= SignedDuration::ZERO {
        return Err(CreateTokenError::InvalidTtl);
    }
    let expires_at = Timestamp::now()
        .checked_add(ttl)
        .map_err(|_| CreateTokenError::InvalidTtl)?;
    ensure_namespace(client).await?;
    let token = JoinToken::generate().map_err(|e| CreateTokenError::Random(e.to_string()))?;
    let mut annotations = BTreeMap::from([
        (NODE_ANNOTATION.to_owned(), node.to_owned()),
        (EXPIRES_ANNOTATION.to_owned(), expires_at.to_string()),
    ]);
    if let Some(site) = site {
        annotations.insert(SITE_ANNOTATION.to_owned(), site.to_owned());
    }
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(token_secret_name(token.id())),
            namespace: Some(SYSTEM_NAMESPACE.into()),
            annotations: Some(annotations),
            ..Default::default()
        },
        type_: Some(TOKEN_SECRET_TYPE.into()),
        string_data: Some(BTreeMap::from([(
            SECRET_HASH_KEY.to_owned(),
            token.secret_hash().to_hex().to_string(),
        )])),
        ..Default::default()
    };
    let api: Api<Secret> = Api::namespaced(client.clone(), SYSTEM_NAMESPACE);
    api.create(&PostParams::default(), &secret).await?;
    Ok(IssuedToken {
        token,
        node: node.to_owned(),
        expires_at,
    })
}

/// An edge the bridge admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    /// The node's name.
    pub node: String,
    /// Its site, if any.
    pub site: Option<String>,
    /// Its iroh key.
    pub key: PeerId,
    /// When it was admitted.
    pub admitted_at: Timestamp,
}

impl Admitted {
    /// Reads an admission record (a spent token Secret); `None` if the
    /// Secret is not one.
    pub fn from_secret(secret: &Secret) -> Option<Self> {
        if secret.type_.as_deref() != Some(TOKEN_SECRET_TYPE) {
            return None;
        }
        let ann = secret.metadata.annotations.as_ref()?;
        let key = parse_key(ann.get(PEER_KEY_ANNOTATION)?)?;
        Some(Self {
            node: ann.get(NODE_ANNOTATION)?.clone(),
            site: ann.get(SITE_ANNOTATION).cloned(),
            key,
            admitted_at: ann.get(ADMITTED_AT_ANNOTATION)?.parse().ok()?,
        })
    }
}

/// Parses a peer key written as 64 hex digits.
pub fn parse_key(hex_key: &str) -> Option<PeerId> {
    let bytes = hex::decode(hex_key).ok()?;
    Some(PeerId(bytes.try_into().ok()?))
}

/// Why an edge was refused.
#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    /// The token does not parse.
    #[error(transparent)]
    Malformed(#[from] MalformedToken),
    /// No such token (or the secret half does not match).
    #[error("unknown join token {id}: issue one with `outpost-cloud token create --node NAME`")]
    Unknown {
        /// The token's id.
        id: String,
    },
    /// The token has expired.
    #[error("join token {id} for node {node} expired at {expired_at}: issue a new one")]
    Expired {
        /// The token's id.
        id: String,
        /// The node it was for.
        node: String,
        /// When it expired.
        expired_at: Timestamp,
    },
    /// The token was already used, by another key.
    #[error(
        "join token {id} for node {node} was already used (by key {by}); a token admits one edge once"
    )]
    Spent {
        /// The token's id.
        id: String,
        /// The node it was for.
        node: String,
        /// The key it admitted (hex), or `unknown` when it lost a race.
        by: String,
    },
    /// The token's Secret is damaged (hand-edited).
    #[error("join token {id} is damaged: {reason}")]
    Damaged {
        /// The token's id.
        id: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// The API failed.
    #[error("the Kubernetes API failed while admitting: {0}")]
    Kube(#[from] kube::Error),
}

/// Admits the edge holding `key` with `token`: checks the token, spends it
/// and records the key. The caller has authenticated `key` (an iroh
/// connection proves it).
pub async fn admit(client: &Client, token: &str, key: PeerId) -> Result<Admitted, AdmitError> {
    let token: JoinToken = token.parse()?;
    let api: Api<Secret> = Api::namespaced(client.clone(), SYSTEM_NAMESPACE);
    let unknown = || AdmitError::Unknown {
        id: token.id.clone(),
    };
    let Some(mut secret) = api.get_opt(&token_secret_name(&token.id)).await? else {
        return Err(unknown());
    };
    if secret.type_.as_deref() != Some(TOKEN_SECRET_TYPE) {
        return Err(unknown());
    }
    let stored = secret
        .data
        .as_ref()
        .and_then(|d| d.get(SECRET_HASH_KEY))
        .and_then(|h| std::str::from_utf8(&h.0).ok())
        .and_then(|h| blake3::Hash::from_hex(h).ok());
    let Some(stored) = stored else {
        return Err(AdmitError::Damaged {
            id: token.id.clone(),
            reason: "no secret hash",
        });
    };
    // blake3::Hash compares in constant time.
    if stored != token.secret_hash() {
        return Err(unknown());
    }
    let ann = secret.metadata.annotations.clone().unwrap_or_default();
    let node = ann
        .get(NODE_ANNOTATION)
        .cloned()
        .ok_or(AdmitError::Damaged {
            id: token.id.clone(),
            reason: "no node annotation",
        })?;
    if let Some(by) = ann.get(PEER_KEY_ANNOTATION) {
        if parse_key(by) == Some(key)
            && let Some(admitted) = Admitted::from_secret(&secret)
        {
            return Ok(admitted);
        }
        return Err(AdmitError::Spent {
            id: token.id.clone(),
            node,
            by: by.clone(),
        });
    }
    let expired_at: Timestamp = ann
        .get(EXPIRES_ANNOTATION)
        .and_then(|t| t.parse().ok())
        .ok_or(AdmitError::Damaged {
            id: token.id.clone(),
            reason: "no valid expiry",
        })?;
    let now = Timestamp::now();
    if now >= expired_at {
        return Err(AdmitError::Expired {
            id: token.id.clone(),
            node,
            expired_at,
        });
    }
    let meta = &mut secret.metadata;
    let annotations = meta.annotations.get_or_insert_with(Default::default);
    annotations.insert(PEER_KEY_ANNOTATION.into(), key.to_string());
    annotations.insert(ADMITTED_AT_ANNOTATION.into(), now.to_string());
    meta.labels
        .get_or_insert_with(Default::default)
        .insert(ADMITTED_LABEL.into(), "true".into());
    // The replace carries the resourceVersion read above: a concurrent
    // admission with the same token makes this one fail with a conflict.
    match api
        .replace(
            &token_secret_name(&token.id),
            &PostParams::default(),
            &secret,
        )
        .await
    {
        Ok(stored) => Admitted::from_secret(&stored).ok_or(AdmitError::Damaged {
            id: token.id.clone(),
            reason: "the stored record does not read back",
        }),
        Err(e) if is_status(&e, 409) => Err(AdmitError::Spent {
            id: token.id.clone(),
            node,
            by: "unknown".into(),
        }),
        Err(e) => Err(e.into()),
    }
}

/// The admitted edges, one per node: the most recent admission of each node
/// wins (its earlier keys are no longer trusted).
pub fn latest_per_node<'a>(
    records: impl IntoIterator<Item = &'a Secret>,
) -> BTreeMap<String, Admitted> {
    let mut out: BTreeMap<String, Admitted> = BTreeMap::new();
    for admitted in records.into_iter().filter_map(Admitted::from_secret) {
        match out.get(&admitted.node) {
            Some(known) if known.admitted_at >= admitted.admitted_at => {}
            _ => {
                out.insert(admitted.node.clone(), admitted);
            }
        }
    }
    out
}

/// The sync roster of the admitted edges.
pub fn roster_of(edges: &BTreeMap<String, Admitted>) -> Roster {
    let mut roster = Roster::new();
    for edge in edges.values() {
        roster.insert(
            edge.key,
            Role::Edge {
                node: edge.node.clone(),
                site: edge.site.clone(),
            },
        );
    }
    roster
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_garbage_is_refused() {
        let t = JoinToken::generate().expect("random");
        let text = t.to_string();
        assert_eq!(text.len(), ID_LEN + 1 + SECRET_LEN);
        assert_eq!(text.parse::<JoinToken>().expect("parses"), t);
        assert!(
            !format!("{t:?}").contains(&t.secret),
            "Debug hides the secret"
        );
        for bad in [
            "",
            "abc",
            "abcdefgh",
            "abcdefgh.short",
            "ABCDEFGH.abcdefghabcdefghabcdefghabcdefgh",
            "abcdefg.abcdefghabcdefghabcdefghabcdefgha",
            "abcdefgh.abcdefghabcdefghabcdefghabcdefg!",
        ] {
            assert!(bad.parse::<JoinToken>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn node_names_are_checked() {
        assert!(validate_node_name("edge-1.site").is_ok());
        for bad in ["", "Edge", "-edge", "edge-", "edge_1", &"e".repeat(64)] {
            assert!(validate_node_name(bad).is_err(), "{bad:?}");
        }
    }
}
