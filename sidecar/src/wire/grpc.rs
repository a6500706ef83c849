//! The small parts of the gRPC wire protocol the proxy itself must speak: `grpc-timeout`,
//! status codes, percent-encoded `grpc-message`, and the trailers-only responses it produces for
//! failures of its own (so an app always sees a gRPC status, never a bare HTTP error).

use std::time::Duration;

use http::{HeaderMap, HeaderValue};

pub const GRPC_TIMEOUT: &str = "grpc-timeout";
pub const GRPC_STATUS: &str = "grpc-status";
pub const GRPC_MESSAGE: &str = "grpc-message";

/// gRPC status codes the proxy produces or maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    Ok = 0,
    Cancelled = 1,
    Unknown = 2,
    DeadlineExceeded = 4,
    ResourceExhausted = 8,
    Internal = 13,
    Unavailable = 14,
}

impl Code {
    pub fn as_header(self) -> HeaderValue {
        HeaderValue::from(self as u16)
    }
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

/// Maps an HTTP/3 stream error code to the gRPC status a client should see (gRFC G2).
pub fn code_for_h3_reset(code: h3::error::Code) -> Code {
    if code == h3::error::Code::H3_REQUEST_CANCELLED {
        Code::Cancelled
    } else if code == h3::error::Code::H3_EXCESSIVE_LOAD {
        Code::ResourceExhausted
    } else {
        // H3_REQUEST_REJECTED means the request was not processed; anything else is a failure of
        // the link rather than the app, which is what UNAVAILABLE says.
        Code::Unavailable
    }
}

/// Maps an HTTP/2 reset reason from the local app to the HTTP/3 code sent to the peer.
pub fn h3_code_for_h2_reason(reason: h2::Reason) -> h3::error::Code {
    match reason {
        h2::Reason::CANCEL | h2::Reason::NO_ERROR => h3::error::Code::H3_REQUEST_CANCELLED,
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

/// Headers that describe one HTTP hop, not the call; HTTP/2 and HTTP/3 both forbid them.
const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "host",
];

pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in HOP_BY_HOP {
        headers.remove(name);
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
}
