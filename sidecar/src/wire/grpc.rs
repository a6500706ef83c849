//! The small parts of the gRPC wire protocol the proxy itself must speak: `grpc-timeout`,
//! status codes, percent-encoded `grpc-message`, and the trailers-only responses it produces for
//! failures of its own (so an app always sees a gRPC status, never a bare HTTP error).

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};

// Names, not strings: a lookup by `&str` parses and validates the name on every call.
pub const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
pub const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");

/// The 17 gRPC status codes (the numbers are the wire values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Code {
    Ok = 0,
    Cancelled = 1,
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    AlreadyExists = 6,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Aborted = 10,
    OutOfRange = 11,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    DataLoss = 15,
    Unauthenticated = 16,
}

impl Code {
    pub const ALL: [Code; 17] = [
        Code::Ok,
        Code::Cancelled,
        Code::Unknown,
        Code::InvalidArgument,
        Code::DeadlineExceeded,
        Code::NotFound,
        Code::AlreadyExists,
        Code::PermissionDenied,
        Code::ResourceExhausted,
        Code::FailedPrecondition,
        Code::Aborted,
        Code::OutOfRange,
        Code::Unimplemented,
        Code::Internal,
        Code::Unavailable,
        Code::DataLoss,
        Code::Unauthenticated,
    ];

    /// The code for a wire value; values outside 0..=16 are UNKNOWN, as gRPC clients treat them.
    pub fn from_u32(value: u32) -> Code {
        Code::ALL
            .get(value as usize)
            .copied()
            .unwrap_or(Code::Unknown)
    }

    /// A `grpc-status` header value; a malformed one is UNKNOWN (the gRPC spec's choice).
    pub fn from_header(value: &HeaderValue) -> Code {
        value
            .to_str()
            .ok()
            .and_then(|text| text.parse::<u32>().ok())
            .map_or(Code::Unknown, Code::from_u32)
    }

    /// The canonical upper-case name (`UNAVAILABLE`), as service configs and metrics use it.
    pub fn name(self) -> &'static str {
        match self {
            Code::Ok => "OK",
            Code::Cancelled => "CANCELLED",
            Code::Unknown => "UNKNOWN",
            Code::InvalidArgument => "INVALID_ARGUMENT",
            Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Code::NotFound => "NOT_FOUND",
            Code::AlreadyExists => "ALREADY_EXISTS",
            Code::PermissionDenied => "PERMISSION_DENIED",
            Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
            Code::FailedPrecondition => "FAILED_PRECONDITION",
            Code::Aborted => "ABORTED",
            Code::OutOfRange => "OUT_OF_RANGE",
            Code::Unimplemented => "UNIMPLEMENTED",
            Code::Internal => "INTERNAL",
            Code::Unavailable => "UNAVAILABLE",
            Code::DataLoss => "DATA_LOSS",
            Code::Unauthenticated => "UNAUTHENTICATED",
        }
    }

    /// Parses a canonical name, any case (`unavailable` too: YAML authors write both).
    pub fn from_name(name: &str) -> Option<Code> {
        Code::ALL
            .iter()
            .copied()
            .find(|code| code.name().eq_ignore_ascii_case(name.trim()))
    }

    pub fn as_header(self) -> HeaderValue {
        HeaderValue::from(self as u16)
    }
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The canonical name of a wire status value (for metrics and logs).
pub fn status_name(code: u32) -> &'static str {
    Code::from_u32(code).name()
}

/// Parses a `grpc-timeout` value: 1 to 8 ASCII digits and a unit (H, M, S, m, u, n).
pub fn parse_timeout(value: &HeaderValue) -> Option<Duration> {
    let bytes = value.as_bytes();
    if bytes.len() < 2 || bytes.len() > 9 {
        return None;
    }
    let (digits, unit) = bytes.split_at(bytes.len() - 1);
    if !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let amount: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit[0] {
        b'H' => Duration::from_secs(amount.checked_mul(3600)?),
        b'M' => Duration::from_secs(amount.checked_mul(60)?),
        b'S' => Duration::from_secs(amount),
        b'm' => Duration::from_millis(amount),
        b'u' => Duration::from_micros(amount),
        b'n' => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// Formats a timeout in the finest unit that fits the protocol's 8 digits, so forwarding a
/// reduced deadline loses as little precision as possible.
pub fn format_timeout(timeout: Duration) -> HeaderValue {
    const MAX: u128 = 99_999_999;
    let nanos = timeout.as_nanos();
    let candidates: [(u128, char); 6] = [
        (1, 'n'),
        (1_000, 'u'),
        (1_000_000, 'm'),
        (1_000_000_000, 'S'),
        (60_000_000_000, 'M'),
        (3_600_000_000_000, 'H'),
    ];
    for (unit_nanos, unit) in candidates {
        let amount = nanos / unit_nanos;
        if amount <= MAX {
            // Never send 0: a zero timeout would make the peer fail a call the client still allows.
            let amount = amount.max(1);
            return HeaderValue::from_str(&format!("{amount}{unit}"))
                .unwrap_or_else(|_| HeaderValue::from_static("1n"));
        }
    }
    HeaderValue::from_static("99999999H")
}

/// Percent-encodes a status message as the gRPC spec requires for `grpc-message`.
pub fn encode_message(message: &str) -> HeaderValue {
    let mut encoded = String::with_capacity(message.len());
    for byte in message.bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    // Only printable ASCII remains, which is always a valid header value.
    HeaderValue::from_str(&encoded).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// The header block of a gRPC status: `grpc-status` and, when non-empty, `grpc-message`.
pub fn status_headers(code: Code, message: &str) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(3);
    headers.insert(GRPC_STATUS, code.as_header());
    if !message.is_empty() {
        headers.insert(GRPC_MESSAGE, encode_message(message));
    }
    headers
}

/// A trailers-only gRPC response: HTTP 200, content type, status and message in one HEADERS frame.
pub fn trailers_only_response<B>(code: Code, message: &str, body: B) -> http::Response<B> {
    let mut response = http::Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.extend(status_headers(code, message));
    response
}

/// Maps a stream reset from the local app (HTTP/2) to the status its caller sees, as gRPC's
/// HTTP/2 protocol mapping specifies. Only REFUSED_STREAM, which promises the request was not
/// processed, is UNAVAILABLE; an app that resets a stream is not a failed link.
pub fn code_for_h2_reset(reason: h2::Reason) -> Code {
    match reason {
        h2::Reason::REFUSED_STREAM => Code::Unavailable,
        h2::Reason::CANCEL => Code::Cancelled,
        h2::Reason::ENHANCE_YOUR_CALM => Code::ResourceExhausted,
        h2::Reason::INADEQUATE_SECURITY => Code::PermissionDenied,
        // NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR, SETTINGS_TIMEOUT,
        // FRAME_SIZE_ERROR, COMPRESSION_ERROR, CONNECT_ERROR and unknown reasons.
        _ => Code::Internal,
    }
}

/// The HTTP/3 code an inbound sidecar resets a stream with when its connection to the local app
/// was lost mid-call: a transport failure on the upstream pod, which callers see as UNAVAILABLE
/// (H3_CONNECT_ERROR's own meaning: the connection behind this request failed).
pub const H3_APP_CONNECTION_LOST: h3::error::Code = h3::error::Code::H3_CONNECT_ERROR;

/// Maps an HTTP/3 stream reset from a peer sidecar to the gRPC status the app sees, mirroring
/// [`code_for_h2_reset`] through [`h3_code_for_h2_reason`].
pub fn code_for_h3_reset(code: h3::error::Code) -> Code {
    use h3::error::Code as H3;
    if code == H3::H3_REQUEST_CANCELLED {
        Code::Cancelled
    } else if code == H3::H3_EXCESSIVE_LOAD {
        Code::ResourceExhausted
    } else if code == H3::H3_REQUEST_REJECTED || code == H3_APP_CONNECTION_LOST {
        // Not processed, or the link behind the peer failed: a transport loss.
        Code::Unavailable
    } else {
        // The app reset its stream with an error, or the peer hit an internal failure: the
        // request may have been processed, so this is neither UNAVAILABLE nor retried.
        Code::Internal
    }
}

/// Maps an HTTP/2 reset reason from the local app to the HTTP/3 code sent to the peer.
pub fn h3_code_for_h2_reason(reason: h2::Reason) -> h3::error::Code {
    match reason {
        h2::Reason::CANCEL => h3::error::Code::H3_REQUEST_CANCELLED,
        h2::Reason::REFUSED_STREAM => h3::error::Code::H3_REQUEST_REJECTED,
        h2::Reason::ENHANCE_YOUR_CALM => h3::error::Code::H3_EXCESSIVE_LOAD,
        _ => h3::error::Code::H3_INTERNAL_ERROR,
    }
}

/// Maps an HTTP/3 reset code from a peer to the HTTP/2 reason sent to the local app or client,
/// mirroring [`h3_code_for_h2_reason`].
pub fn h2_reason_for_h3_code(code: h3::error::Code) -> h2::Reason {
    if code == h3::error::Code::H3_REQUEST_CANCELLED {
        h2::Reason::CANCEL
    } else if code == h3::error::Code::H3_REQUEST_REJECTED {
        h2::Reason::REFUSED_STREAM
    } else if code == h3::error::Code::H3_EXCESSIVE_LOAD {
        h2::Reason::ENHANCE_YOUR_CALM
    } else {
        h2::Reason::INTERNAL_ERROR
    }
}

/// gRPC over HTTP/2 requires `te: trailers` on every request (it tells the server the client
/// takes trailers, so no proxy in between drops them; gRPC C-core servers refuse a call without
/// it). Between sidecars it is one header field, two Huffman-coded strings, to encode and decode
/// on every call, and HTTP/3 makes it optional (RFC 9114, section 4.2). So the serving sidecar
/// always sets it on the request to its app ([`require_trailers`]) and says so in
/// [`FEATURES`] on its first response on each connection; from then on the calling sidecar
/// leaves it off requests on that connection. A serving sidecar that never says so (an older
/// version, mid-rollout) keeps getting it.
pub const FEATURES: HeaderName = HeaderName::from_static("locality-sidecar-features");
/// The [`FEATURES`] value of a serving sidecar that sets `te: trailers` itself.
pub const FEATURE_RESTORES_TE: HeaderValue = HeaderValue::from_static("te");

/// Takes `te` off a request from the app; [`require_trailers`] puts it back per hop when the peer
/// needs it.
pub fn leave_te_off_the_hop(headers: &mut HeaderMap) {
    headers.remove(http::header::TE);
}

/// Sets `te: trailers` on a request: to the app, or to a peer sidecar that does not restore it.
pub fn require_trailers(headers: &mut HeaderMap) {
    headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
}

/// Whether a peer sidecar's response says it restores `te` for its app (see [`FEATURES`]).
pub fn announces_te(headers: &HeaderMap) -> bool {
    headers.get_all(FEATURES).iter().any(|value| {
        value
            .to_str()
            .is_ok_and(|list| list.split(',').any(|feature| feature.trim() == "te"))
    })
}

const GRPC_CONTENT_TYPE: HeaderValue = HeaderValue::from_static("application/grpc");
const OK_STATUS: HeaderValue = HeaderValue::from_static("0");

/// Request or response headers as they go on the hop between two sidecars.
///
/// Fields nearly every gRPC call carries with the same value: `content-type: application/grpc`
/// on requests and responses, `grpc-status: 0` in the trailers of a call that succeeded.
/// QPACK's static table (RFC 9204, appendix A) has neither, so on the hop between sidecars
/// each would cost Huffman-coded literals on every call, encoded on one side and decoded on the
/// other. Two sidecars that agreed on [`crate::wire::tls::ALPN_H3_SIDECAR`] imply them instead:
/// the sender applies [`imply_grpc_defaults`] (requests and response headers) and
/// [`imply_ok_status`] (response trailers) to what it forwards, the receiver the matching
/// `restore_` function before anything else reads the fields. Each mapping is one to one, so
/// the other side gets exactly the fields that were sent, in whatever form.
pub fn imply_grpc_defaults(headers: &mut HeaderMap) {
    imply_field(headers, http::header::CONTENT_TYPE, &GRPC_CONTENT_TYPE);
}

/// Undoes [`imply_grpc_defaults`] on what a sidecar of the same convention sent.
pub fn restore_grpc_defaults(headers: &mut HeaderMap) {
    restore_field(headers, http::header::CONTENT_TYPE, GRPC_CONTENT_TYPE);
}

/// Response trailers as they go on the hop (see [`imply_grpc_defaults`]).
pub fn imply_ok_status(trailers: &mut HeaderMap) {
    imply_field(trailers, GRPC_STATUS, &OK_STATUS);
}

/// Undoes [`imply_ok_status`] on what a sidecar of the same convention sent.
pub fn restore_ok_status(trailers: &mut HeaderMap) {
    restore_field(trailers, GRPC_STATUS, OK_STATUS);
}

/// A single `name: usual` is left off; no `name` at all, or only empty ones, gets one more
/// empty one; anything else is left as it is.
fn imply_field(headers: &mut HeaderMap, name: HeaderName, usual: &HeaderValue) {
    match field_form(headers, &name, usual) {
        FieldForm::Usual => {
            headers.remove(name);
        }
        FieldForm::Empty(_) => {
            headers.append(name, HeaderValue::from_static(""));
        }
        FieldForm::Other => {}
    }
}

fn restore_field(headers: &mut HeaderMap, name: HeaderName, usual: HeaderValue) {
    match field_form(headers, &name, &usual) {
        FieldForm::Empty(0) => {
            headers.insert(name, usual);
        }
        FieldForm::Empty(count) => {
            headers.remove(&name);
            for _ in 1..count {
                headers.append(name.clone(), HeaderValue::from_static(""));
            }
        }
        FieldForm::Usual | FieldForm::Other => {}
    }
}

enum FieldForm {
    /// Exactly one field of the name, with the usual value.
    Usual,
    /// This many fields of the name, all empty (0: none).
    Empty(usize),
    Other,
}

fn field_form(headers: &HeaderMap, name: &HeaderName, usual: &HeaderValue) -> FieldForm {
    let mut count = 0;
    let mut all_empty = true;
    let mut is_usual = false;
    for value in headers.get_all(name) {
        count += 1;
        all_empty &= value.is_empty();
        is_usual = value == usual;
    }
    if count == 1 && is_usual {
        FieldForm::Usual
    } else if all_empty {
        FieldForm::Empty(count)
    } else {
        FieldForm::Other
    }
}

/// Headers that describe one HTTP hop, not the call; HTTP/2 and HTTP/3 both forbid them.
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "host",
    // Between sidecars only (see `FEATURES`); never passed on to an app.
    "locality-sidecar-features",
];

pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Peers almost never send one. Comparing the few names a call carries is cheaper than a
    // lookup per listed name, each of which parses and hashes it, so the map is searched only
    // when one is there.
    if headers
        .keys()
        .any(|name| HOP_BY_HOP.contains(&name.as_str()))
    {
        for name in HOP_BY_HOP {
            headers.remove(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeout_units_parse() {
        let parse = |s: &'static str| parse_timeout(&HeaderValue::from_static(s));
        assert_eq!(parse("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse("40m"), Some(Duration::from_millis(40)));
        assert_eq!(parse("50u"), Some(Duration::from_micros(50)));
        assert_eq!(parse("60n"), Some(Duration::from_nanos(60)));
        assert_eq!(parse("99999999S"), Some(Duration::from_secs(99_999_999)));
    }

    #[test]
    fn malformed_timeouts_are_rejected() {
        for bad in ["", "S", "123456789S", "10x", "-1S", "1.5S", "10 S"] {
            assert_eq!(
                parse_timeout(&HeaderValue::from_str(bad).unwrap()),
                None,
                "{bad}"
            );
        }
    }

    #[test]
    fn timeout_format_keeps_precision_and_round_trips() {
        for duration in [
            Duration::from_nanos(1),
            Duration::from_micros(999_876),
            Duration::from_millis(9_999),
            Duration::from_secs(5 * 3600),
            Duration::from_secs(200_000_000),
        ] {
            let header = format_timeout(duration);
            let back = parse_timeout(&header).unwrap();
            assert!(back <= duration, "{header:?}");
            assert!(duration - back < duration / 10_000_000 + Duration::from_nanos(1));
        }
        assert_eq!(format_timeout(Duration::from_millis(10)), "10000000n");
        assert_eq!(format_timeout(Duration::ZERO), "1n");
    }

    #[test]
    fn message_is_percent_encoded() {
        assert_eq!(encode_message("plain text"), "plain text");
        assert_eq!(encode_message("50% é"), "50%25 %C3%A9");
    }

    #[test]
    fn all_seventeen_codes_round_trip_by_number_and_name() {
        for (number, code) in Code::ALL.iter().enumerate() {
            assert_eq!(*code as usize, number);
            assert_eq!(Code::from_u32(number as u32), *code);
            assert_eq!(Code::from_name(code.name()), Some(*code));
            assert_eq!(Code::from_name(&code.name().to_lowercase()), Some(*code));
            assert_eq!(Code::from_header(&code.as_header()), *code);
        }
        assert_eq!(Code::from_name("NOT_A_CODE"), None);
        assert_eq!(status_name(14), "UNAVAILABLE");
    }

    #[test]
    fn out_of_range_or_malformed_statuses_are_unknown() {
        assert_eq!(Code::from_u32(17), Code::Unknown);
        assert_eq!(Code::from_u32(u32::MAX), Code::Unknown);
        for bad in ["", "x", "-1", "1.0", "99999999999"] {
            assert_eq!(
                Code::from_header(&HeaderValue::from_str(bad).unwrap()),
                Code::Unknown,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn app_resets_map_as_grpc_specifies_for_http2() {
        use h2::Reason;
        let expected = [
            (Reason::NO_ERROR, Code::Internal),
            (Reason::PROTOCOL_ERROR, Code::Internal),
            (Reason::INTERNAL_ERROR, Code::Internal),
            (Reason::FLOW_CONTROL_ERROR, Code::Internal),
            (Reason::SETTINGS_TIMEOUT, Code::Internal),
            (Reason::FRAME_SIZE_ERROR, Code::Internal),
            (Reason::REFUSED_STREAM, Code::Unavailable),
            (Reason::CANCEL, Code::Cancelled),
            (Reason::COMPRESSION_ERROR, Code::Internal),
            (Reason::CONNECT_ERROR, Code::Internal),
            (Reason::ENHANCE_YOUR_CALM, Code::ResourceExhausted),
            (Reason::INADEQUATE_SECURITY, Code::PermissionDenied),
        ];
        for (reason, code) in expected {
            assert_eq!(code_for_h2_reset(reason), code, "{reason:?}");
        }
    }

    #[test]
    fn app_resets_reach_the_caller_with_the_same_status_through_http3() {
        use h2::Reason;
        // The app resets its stream; the inbound passes it on as an HTTP/3 code; the outbound
        // turns that into the status the calling app sees. Both ends must agree with HTTP/2's
        // mapping, except REFUSED_STREAM, which the outbound retries before anyone sees it.
        for reason in [
            Reason::INTERNAL_ERROR,
            Reason::CANCEL,
            Reason::ENHANCE_YOUR_CALM,
            Reason::PROTOCOL_ERROR,
            Reason::NO_ERROR,
            Reason::REFUSED_STREAM,
        ] {
            let through = code_for_h3_reset(h3_code_for_h2_reason(reason));
            assert_eq!(through, code_for_h2_reset(reason), "{reason:?}");
        }
        assert_eq!(code_for_h3_reset(H3_APP_CONNECTION_LOST), Code::Unavailable);
        assert_eq!(
            code_for_h3_reset(h3::error::Code::H3_INTERNAL_ERROR),
            Code::Internal,
            "an app's error is not a transport loss"
        );
    }

    #[test]
    fn usual_grpc_fields_are_implied_on_the_hop_and_every_form_comes_back_exactly() {
        type Mapping = (fn(&mut HeaderMap), fn(&mut HeaderMap));
        let fields: [(HeaderName, &str, Mapping); 2] = [
            (
                http::header::CONTENT_TYPE,
                "application/grpc",
                (imply_grpc_defaults, restore_grpc_defaults),
            ),
            (GRPC_STATUS, "0", (imply_ok_status, restore_ok_status)),
        ];
        for (name, usual, (imply, restore)) in fields {
            let cases: [(Vec<&str>, Vec<&str>); 8] = [
                // What an app sends, and what goes on the hop between the sidecars.
                (vec![usual], vec![]),
                (vec![], vec![""]),
                (vec![""], vec!["", ""]),
                (vec!["", ""], vec!["", "", ""]),
                (vec!["14"], vec!["14"]),
                (
                    vec!["application/grpc+proto"],
                    vec!["application/grpc+proto"],
                ),
                (vec![usual, usual], vec![usual, usual]),
                (vec![usual, ""], vec![usual, ""]),
            ];
            for (sent, on_the_hop) in cases {
                let mut headers = HeaderMap::new();
                headers.insert("x-user", HeaderValue::from_static("kept"));
                for value in &sent {
                    headers.append(&name, HeaderValue::from_str(value).unwrap());
                }
                let values = |headers: &HeaderMap| -> Vec<String> {
                    headers
                        .get_all(&name)
                        .iter()
                        .map(|value| value.to_str().unwrap().to_string())
                        .collect()
                };
                imply(&mut headers);
                assert_eq!(values(&headers), on_the_hop, "{name} {sent:?}");
                restore(&mut headers);
                assert_eq!(values(&headers), sent, "{name} {sent:?}");
                assert_eq!(headers["x-user"], "kept");
            }
        }
    }

    #[test]
    fn a_peer_restores_te_only_when_its_features_name_it() {
        let with = |values: &[&'static str]| {
            let mut headers = HeaderMap::new();
            for value in values {
                headers.append(FEATURES, HeaderValue::from_static(value));
            }
            announces_te(&headers)
        };
        assert!(with(&["te"]));
        assert!(with(&["later, te"]));
        assert!(with(&["other", " te "]));
        assert!(!with(&[]));
        assert!(!with(&["tea", "t e", ""]));
        let mut restored = HeaderMap::new();
        restored.insert(FEATURES, FEATURE_RESTORES_TE);
        assert!(announces_te(&restored));
        // The announcement never reaches an app.
        strip_hop_by_hop(&mut restored);
        assert!(restored.is_empty());
    }

    #[test]
    fn hop_by_hop_headers_are_stripped_and_call_metadata_kept() {
        let mut headers = HeaderMap::new();
        for name in [
            "connection",
            "keep-alive",
            "transfer-encoding",
            "upgrade",
            "host",
        ] {
            headers.insert(name, HeaderValue::from_static("x"));
        }
        headers.insert("te", HeaderValue::from_static("trailers"));
        headers.insert("x-user-bin", HeaderValue::from_static("AAE="));
        strip_hop_by_hop(&mut headers);
        let left: Vec<&str> = headers.keys().map(|name| name.as_str()).collect();
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(headers.contains_key("te") && headers.contains_key("x-user-bin"));
    }
}
