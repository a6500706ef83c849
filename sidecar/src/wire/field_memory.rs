//! The method path and the `user-agent` remembered per connection by both sidecars, so each
//! travels once per connection instead of on every call.
//!
//! Why: QPACK's static table has neither, and h3 0.0.8 keeps no dynamic table, so every request
//! carried both as Huffman-coded literals, encoded by one sidecar and decoded by the other. Once
//! gRPC's usual fields were implied (see [`super::grpc::imply_grpc_defaults`]) they were the
//! largest per-call item left in either sidecar. An app calls few methods and sends one
//! user-agent, so both repeat on nearly every call.
//!
//! How: both ends agree on it in the handshake (ALPN [`super::tls::ALPN_H3_SIDECAR_MEMORY`]).
//! The request's `:authority`, which the serving sidecar never forwards (it addresses its own
//! app), says which slots the request defines or refers to:
//! - `q<n>`: remember this request's `:path` in path slot n; `p<n>`: the path is slot n, and
//!   `:path` travels as `/` (a static-table entry, no string);
//! - `v<n>`: remember this request's `user-agent` in agent slot n; `u<n>`: the user-agent is
//!   slot n, and the field is left off;
//! - `s`: nothing remembered or referred to.
//!
//! A slot is referred to only after the serving side answered a request that defined it. It
//! answers only once it has read the request's head, so it holds the slot by then, whatever
//! order the streams arrive in. A slot keeps its value for the connection's life on both sides;
//! a definition that got no answer is sent again with the next request of that value.

use std::fmt::Write as _;
use std::sync::Mutex;

use http::header::USER_AGENT;
use http::uri::{Authority, PathAndQuery};
use http::{HeaderMap, HeaderValue, Uri};

/// Path slots per connection: more distinct methods than that travel as they are.
pub const MAX_PATHS: usize = 64;
/// User-agent slots per connection (one per app behind the calling sidecar, usually one).
pub const MAX_AGENTS: usize = 8;
/// Longer values are not remembered, which bounds what a peer can make us hold per connection
/// to (64 + 8) × 256 bytes.
pub const MAX_REMEMBERED_BYTES: usize = 256;

/// The `:authority` of a request that refers to nothing.
const NOTHING_REMEMBERED: &str = "s";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FieldMemoryError {
    #[error("peer sidecar's :authority {0:?} is not a field reference (locality-sidecar-h3/2)")]
    Malformed(String),
    #[error("peer sidecar referred to {kind} slot {slot}, which it never defined")]
    Undefined { kind: &'static str, slot: usize },
    #[error("peer sidecar redefined {kind} slot {slot} with another value")]
    Redefined { kind: &'static str, slot: usize },
    #[error("peer sidecar asked to remember a {kind} that cannot be remembered (slot {slot})")]
    Unrememberable { kind: &'static str, slot: usize },
}

/// What one request does with one field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FieldUse {
    Literal,
    Define(usize),
    Refer(usize),
}

#[derive(Debug)]
struct SentSlot<T> {
    value: T,
    /// The peer answered a request that defined it.
    confirmed: bool,
}

/// How a request uses `value` given the slots so far; a new value takes a new slot if there is
/// one and it may be remembered.
fn field_use<T: PartialEq + Clone>(
    slots: &mut Vec<SentSlot<T>>,
    value: &T,
    limit: usize,
    rememberable: bool,
) -> FieldUse {
    if let Some(slot) = slots.iter().position(|slot| slot.value == *value) {
        return if slots[slot].confirmed {
            FieldUse::Refer(slot)
        } else {
            FieldUse::Define(slot)
        };
    }
    if !rememberable || slots.len() >= limit {
        return FieldUse::Literal;
    }
    slots.push(SentSlot {
        value: value.clone(),
        confirmed: false,
    });
    FieldUse::Define(slots.len() - 1)
}

/// The `:authority` that says what a request does with its path and user-agent.
fn reference_authority(path: FieldUse, agent: FieldUse) -> String {
    let mut text = String::with_capacity(8);
    for (field, define, refer) in [(path, 'q', 'p'), (agent, 'v', 'u')] {
        // Writing to a String cannot fail.
        let _ = match field {
            FieldUse::Literal => Ok(()),
            FieldUse::Define(slot) => write!(text, "{define}{slot}"),
            FieldUse::Refer(slot) => write!(text, "{refer}{slot}"),
        };
    }
    if text.is_empty() {
        text.push_str(NOTHING_REMEMBERED);
    }
    text
}

/// The request's user-agent when it has exactly one; only then is it remembered.
fn single_user_agent(headers: &HeaderMap) -> Option<&HeaderValue> {
    let mut agents = headers.get_all(USER_AGENT).iter();
    match (agents.next(), agents.next()) {
        (Some(agent), None) => Some(agent),
        _ => None,
    }
}

/// The slots a request defined, to be confirmed once its response headers arrive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Defined {
    path: Option<usize>,
    agent: Option<usize>,
}

impl Defined {
    fn of(path: FieldUse, agent: FieldUse) -> Defined {
        let defined = |field| match field {
            FieldUse::Define(slot) => Some(slot),
            _ => None,
        };
        Defined {
            path: defined(path),
            agent: defined(agent),
        }
    }
}

/// A request's head as it goes on the hop.
#[derive(Debug)]
pub struct Encoded {
    pub authority: Authority,
    pub path: PathAndQuery,
    pub defined: Defined,
}

#[derive(Debug, Default)]
struct SentSlots {
    paths: Vec<SentSlot<PathAndQuery>>,
    agents: Vec<SentSlot<HeaderValue>>,
    /// The last `:authority` that only referred, reused while requests keep referring to the
    /// same slots (nearly every call), so it is not formatted and parsed per call.
    steady: Option<(FieldUse, FieldUse, Authority)>,
}

/// The calling side's slots of one connection.
#[derive(Debug, Default)]
pub struct SentFields {
    slots: Mutex<SentSlots>,
}

impl SentFields {
    /// How a request to `path` goes on the hop; the user-agent is taken out of `headers` when
    /// the request refers to it.
    pub fn encode(&self, path: &PathAndQuery, headers: &mut HeaderMap) -> Encoded {
        let Ok(mut slots) = self.slots.lock() else {
            return literal(path);
        };
        let path_use = field_use(
            &mut slots.paths,
            path,
            MAX_PATHS,
            path.as_str().len() <= MAX_REMEMBERED_BYTES && path.as_str() != "/",
        );
        let agent_use = match single_user_agent(headers) {
            Some(agent) => field_use(
                &mut slots.agents,
                agent,
                MAX_AGENTS,
                agent.len() <= MAX_REMEMBERED_BYTES,
            ),
            None => FieldUse::Literal,
        };
        let authority = match &slots.steady {
            Some((p, a, authority)) if (*p, *a) == (path_use, agent_use) => authority.clone(),
            _ => match Authority::try_from(reference_authority(path_use, agent_use)) {
                Ok(authority) => {
                    if matches!(path_use, FieldUse::Refer(_) | FieldUse::Literal)
                        && matches!(agent_use, FieldUse::Refer(_) | FieldUse::Literal)
                    {
                        slots.steady = Some((path_use, agent_use, authority.clone()));
                    }
                    authority
                }
                // Only letters and digits: always an authority.
                Err(_) => return literal(path),
            },
        };
        drop(slots);
        if matches!(agent_use, FieldUse::Refer(_)) {
            headers.remove(USER_AGENT);
        }
        Encoded {
            authority,
            path: match path_use {
                FieldUse::Refer(_) => PathAndQuery::from_static("/"),
                _ => path.clone(),
            },
            defined: Defined::of(path_use, agent_use),
        }
    }

    /// The peer answered a request that defined `defined`: later requests may refer to them.
    pub fn confirm(&self, defined: Defined) {
        if defined == Defined::default() {
            return;
        }
        if let Ok(mut slots) = self.slots.lock() {
            if let Some(slot) = defined.path.and_then(|slot| slots.paths.get_mut(slot)) {
                slot.confirmed = true;
            }
            if let Some(slot) = defined.agent.and_then(|slot| slots.agents.get_mut(slot)) {
                slot.confirmed = true;
            }
        }
    }
}

fn literal(path: &PathAndQuery) -> Encoded {
    Encoded {
        authority: Authority::from_static(NOTHING_REMEMBERED),
        path: path.clone(),
        defined: Defined::default(),
    }
}

/// What a request's `:authority` says it does with its path and user-agent: the inverse of
/// [`reference_authority`].
fn parse_reference(authority: &str) -> Result<(FieldUse, FieldUse), FieldMemoryError> {
    let malformed = || FieldMemoryError::Malformed(authority.to_string());
    let (mut path, mut agent) = (FieldUse::Literal, FieldUse::Literal);
    if authority == NOTHING_REMEMBERED {
        return Ok((path, agent));
    }
    if authority.is_empty() {
        return Err(malformed());
    }
    let mut rest = authority;
    while let Some(kind) = rest.chars().next() {
        let (field, use_of): (&mut FieldUse, fn(usize) -> FieldUse) = match kind {
            'q' => (&mut path, FieldUse::Define),
            'p' => (&mut path, FieldUse::Refer),
            'v' => (&mut agent, FieldUse::Define),
            'u' => (&mut agent, FieldUse::Refer),
            _ => return Err(malformed()),
        };
        // The kind letter is ASCII, so the digits start at byte 1.
        let end = rest[1..]
            .find(|c: char| !c.is_ascii_digit())
            .map_or(rest.len(), |end| end + 1);
        let slot: usize = rest[1..end].parse().map_err(|_| malformed())?;
        if *field != FieldUse::Literal {
            return Err(malformed());
        }
        *field = use_of(slot);
        rest = &rest[end..];
    }
    Ok((path, agent))
}

#[derive(Debug)]
struct ReceivedSlots {
    paths: Vec<Option<PathAndQuery>>,
    agents: Vec<Option<HeaderValue>>,
}

/// The serving side's slots of one connection.
#[derive(Debug)]
pub struct ReceivedFields {
    slots: Mutex<ReceivedSlots>,
}

impl Default for ReceivedFields {
    fn default() -> Self {
        ReceivedFields {
            slots: Mutex::new(ReceivedSlots {
                paths: vec![None; MAX_PATHS],
                agents: vec![None; MAX_AGENTS],
            }),
        }
    }
}

/// Stores `value` in `slot`, or checks it is what the slot already holds.
fn remember<T: PartialEq + Clone>(
    slots: &mut [Option<T>],
    slot: usize,
    value: Option<&T>,
    kind: &'static str,
    fits: bool,
) -> Result<(), FieldMemoryError> {
    let unrememberable = FieldMemoryError::Unrememberable { kind, slot };
    let (Some(held), Some(value)) = (slots.get_mut(slot), value) else {
        return Err(unrememberable);
    };
    if !fits {
        return Err(unrememberable);
    }
    match held {
        Some(existing) if existing != value => Err(FieldMemoryError::Redefined { kind, slot }),
        Some(_) => Ok(()),
        None => {
            *held = Some(value.clone());
            Ok(())
        }
    }
}

fn recall<T: Clone>(
    slots: &[Option<T>],
    slot: usize,
    kind: &'static str,
) -> Result<T, FieldMemoryError> {
    slots
        .get(slot)
        .and_then(Clone::clone)
        .ok_or(FieldMemoryError::Undefined { kind, slot })
}

impl ReceivedFields {
    /// Undoes [`SentFields::encode`] on a request's head: returns the path to forward, and puts
    /// a referred user-agent back into `headers`.
    pub fn restore(
        &self,
        uri: &Uri,
        headers: &mut HeaderMap,
    ) -> Result<PathAndQuery, FieldMemoryError> {
        let sent_path = uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let authority = uri.authority().map_or("", Authority::as_str);
        let (path_use, agent_use) = parse_reference(authority)?;
        if (path_use, agent_use) == (FieldUse::Literal, FieldUse::Literal) {
            return Ok(sent_path);
        }
        let mut slots = self
            .slots
            .lock()
            .map_err(|_| FieldMemoryError::Malformed(authority.to_string()))?;
        let path = match path_use {
            FieldUse::Literal => sent_path,
            FieldUse::Define(slot) => {
                let fits = sent_path.as_str().len() <= MAX_REMEMBERED_BYTES;
                remember(&mut slots.paths, slot, Some(&sent_path), "path", fits)?;
                sent_path
            }
            FieldUse::Refer(slot) => recall(&slots.paths, slot, "path")?,
        };
        match agent_use {
            FieldUse::Literal => {}
            FieldUse::Define(slot) => {
                let agent = single_user_agent(headers);
                let fits = agent.is_some_and(|agent| agent.len() <= MAX_REMEMBERED_BYTES);
                remember(&mut slots.agents, slot, agent, "user-agent", fits)?;
            }
            FieldUse::Refer(slot) => {
                let agent = recall(&slots.agents, slot, "user-agent")?;
                if headers.contains_key(USER_AGENT) {
                    return Err(FieldMemoryError::Malformed(authority.to_string()));
                }
                headers.insert(USER_AGENT, agent);
            }
        }
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head() -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("grpc-timeout", HeaderValue::from_static("1S"));
        headers
    }

    /// The request URI as the serving side reads it off the hop.
    fn hop_uri(encoded: &Encoded) -> Uri {
        Uri::builder()
            .scheme("https")
            .authority(encoded.authority.clone())
            .path_and_query(encoded.path.clone())
            .build()
            .unwrap()
    }

    /// One request through both ends: what went on the hop, and what the serving side rebuilt.
    fn round_trip(
        sent: &SentFields,
        received: &ReceivedFields,
        path: &str,
        agents: &[&str],
    ) -> (Encoded, Result<(PathAndQuery, HeaderMap), FieldMemoryError>) {
        let mut headers = head();
        for agent in agents {
            headers.append(USER_AGENT, HeaderValue::from_str(agent).unwrap());
        }
        let encoded = sent.encode(&PathAndQuery::try_from(path).unwrap(), &mut headers);
        let restored = received
            .restore(&hop_uri(&encoded), &mut headers)
            .map(|path| (path, headers));
        (encoded, restored)
    }

    fn agents_of(headers: &HeaderMap) -> Vec<&str> {
        headers
            .get_all(USER_AGENT)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect()
    }

    #[test]
    fn a_confirmed_path_and_agent_leave_the_hop_and_come_back_exactly() {
        let (sent, received) = (SentFields::default(), ReceivedFields::default());
        let path = "/echo.Echo/Unary";
        let (first, restored) = round_trip(&sent, &received, path, &["grpc-dotnet/2.66"]);
        assert_eq!(first.authority.as_str(), "q0v0");
        assert_eq!(first.path.as_str(), path);
        let (restored_path, headers) = restored.unwrap();
        assert_eq!(restored_path.as_str(), path);
        assert_eq!(agents_of(&headers), ["grpc-dotnet/2.66"]);

        // Unanswered yet: the next request defines them again rather than referring.
        let (again, _) = round_trip(&sent, &received, path, &["grpc-dotnet/2.66"]);
        assert_eq!(again.authority.as_str(), "q0v0");

        sent.confirm(first.defined);
        let (steady, restored) = round_trip(&sent, &received, path, &["grpc-dotnet/2.66"]);
        assert_eq!(steady.authority.as_str(), "p0u0");
        assert_eq!(steady.path.as_str(), "/");
        let (restored_path, headers) = restored.unwrap();
        assert_eq!(restored_path.as_str(), path);
        assert_eq!(agents_of(&headers), ["grpc-dotnet/2.66"]);
        assert_eq!(headers.get("grpc-timeout").unwrap(), "1S");
    }

    #[test]
    fn every_form_the_memory_cannot_hold_travels_as_it_is() {
        let (sent, received) = (SentFields::default(), ReceivedFields::default());
        let long_path = format!("/svc/{}", "m".repeat(MAX_REMEMBERED_BYTES));
        let cases: [(&str, &[&str]); 5] = [
            ("/", &["a"]),
            (&long_path, &[]),
            ("/svc/Two", &["a", "b"]),
            ("/svc/Empty", &[""]),
            ("/svc/Query?x=1", &[]),
        ];
        for _ in 0..2 {
            for (path, agents) in cases {
                let (encoded, restored) = round_trip(&sent, &received, path, agents);
                let (restored_path, headers) = restored.unwrap();
                assert_eq!(restored_path.as_str(), path, "{encoded:?}");
                assert_eq!(agents_of(&headers), agents, "{encoded:?}");
                sent.confirm(encoded.defined);
            }
        }
        let (slash, _) = round_trip(&sent, &received, "/", &[]);
        assert_eq!(slash.authority.as_str(), "s");
        let (two_agents, _) = round_trip(&sent, &received, "/svc/Two", &["a", "b"]);
        assert_eq!(two_agents.authority.as_str(), "p0");
    }

    #[test]
    fn paths_beyond_the_slots_travel_as_they_are() {
        let (sent, received) = (SentFields::default(), ReceivedFields::default());
        for round in 0..2 {
            for method in 0..MAX_PATHS + 5 {
                let path = format!("/svc/M{method}");
                let (encoded, restored) = round_trip(&sent, &received, &path, &[]);
                assert_eq!(restored.unwrap().0.as_str(), path);
                let expected = match (round, method < MAX_PATHS) {
                    (_, false) => "s".to_string(),
                    (0, true) => format!("q{method}"),
                    (_, true) => format!("p{method}"),
                };
                assert_eq!(encoded.authority.as_str(), expected);
                sent.confirm(encoded.defined);
            }
        }
    }

    #[test]
    fn definitions_arriving_out_of_order_are_all_kept() {
        let (sent, received) = (SentFields::default(), ReceivedFields::default());
        let mut heads = Vec::new();
        for path in ["/svc/A", "/svc/B"] {
            let mut headers = head();
            let encoded = sent.encode(&PathAndQuery::try_from(path).unwrap(), &mut headers);
            heads.push((path, encoded));
        }
        for (path, encoded) in heads.iter().rev() {
            let restored = received
                .restore(&hop_uri(encoded), &mut HeaderMap::new())
                .unwrap();
            assert_eq!(restored.as_str(), *path);
            sent.confirm(encoded.defined);
        }
        let (_, restored) = round_trip(&sent, &received, "/svc/A", &[]);
        assert_eq!(restored.unwrap().0.as_str(), "/svc/A");
    }

    #[test]
    fn a_peer_that_breaks_the_convention_is_refused_not_believed() {
        let received = ReceivedFields::default();
        let restore = |authority: &str, path: &str, headers: &mut HeaderMap| {
            let uri = Uri::builder()
                .scheme("https")
                .authority(authority)
                .path_and_query(path)
                .build()
                .unwrap();
            received.restore(&uri, headers)
        };
        let mut none = HeaderMap::new();
        assert_eq!(
            restore("p3", "/", &mut none),
            Err(FieldMemoryError::Undefined {
                kind: "path",
                slot: 3
            })
        );
        for malformed in ["locality-sidecar", "p", "p1p2", "x1", "q1u"] {
            assert!(matches!(
                restore(malformed, "/a", &mut none),
                Err(FieldMemoryError::Malformed(_))
            ));
        }
        assert!(restore("q0", "/a", &mut none).is_ok());
        assert_eq!(
            restore("q0", "/b", &mut none),
            Err(FieldMemoryError::Redefined {
                kind: "path",
                slot: 0
            })
        );
        assert!(matches!(
            restore(&format!("q{MAX_PATHS}"), "/c", &mut none),
            Err(FieldMemoryError::Unrememberable { .. })
        ));
        assert!(matches!(
            restore("v0", "/a", &mut none),
            Err(FieldMemoryError::Unrememberable { .. })
        ));
        let mut with_agent = HeaderMap::new();
        with_agent.insert(USER_AGENT, HeaderValue::from_static("a"));
        assert!(restore("v0", "/a", &mut with_agent).is_ok());
        // Referred to and also sent: not a form our side produces.
        assert!(matches!(
            restore("u0", "/a", &mut with_agent),
            Err(FieldMemoryError::Malformed(_))
        ));
    }
}
