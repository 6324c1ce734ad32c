//! A backend's `Keep-Alive` response header (`timeout=5, max=100`), read
//! so that a connection is never reused after the backend has given it up,
//! and what it does to one connection: plain Rust, no nginx.
//!
//! Why: a backend's idle timeout is usually shorter than nginx's
//! `keepalive_timeout` (Apache and Node 5 s, gunicorn 2 s, nginx 60 s).
//! When the backend closes an idle connection just as nginx sends the next
//! request on it, a non-idempotent request (POST) is answered 502. The
//! header says how long the backend waits (`timeout`, seconds) and how
//! many more requests it accepts on the connection (`max`). Node's
//! http.Agent and undici honour it the same way: a connection idle for
//! the hint less a margin (1 s in Node's agent) is not reused.
//!
//! # What is accepted
//!
//! The header is a comma-separated list of parameters, `name` or
//! `name=value`, as HTTP lists are (RFC 9110 5.6.1): empty elements and
//! optional whitespace around commas and `=` are allowed, names are
//! case-insensitive, a value is a token or a quoted string. `timeout` and
//! `max` take a number of digits (quoted or not); other parameters are
//! ignored one by one, so an extension beside `timeout` does not cost the
//! timeout. Anything else ignores the whole header (changing nothing):
//! an empty value, a value longer than [`MAX_LEN`], bad syntax, `timeout`
//! or `max` twice, without a value, or with one that is not a number
//! (negative, fractional) or above `u32::MAX - 1` ([`Defect`]), and two
//! `Keep-Alive` headers in one response (the caller's to tell).
//!
//! # What it does ([`decide`])
//!
//! - `timeout=N`: the connection's idle timer is `N` seconds less the
//!   margin, if that is shorter than `keepalive_timeout`; when `N` seconds
//!   are not above the margin the connection is not kept (Node's agent
//!   and undici: no reuse when the remainder is not positive).
//! - `max=M`: the backend accepts `M` more requests on the connection
//!   (Apache counts `MaxKeepAliveRequests` down; its last keep-alive
//!   response says `max=1`, and after it the connection is closed). So
//!   `max=0` means not kept, `max=1` one more request. The limit stays
//!   with the connection (idle, then reused): a later response without
//!   `max` does not lift it, one with `max` can only lower it, and
//!   `keepalive_requests` still applies (the smaller wins).
//!
//! A hint only ever shortens what the configuration allows.

use core::fmt;

/// Longer values are not read: Apache's is 20 bytes.
pub const MAX_LEN: usize = 256;

/// The largest number read; above it a value counts as an overflow.
/// (`u32::MAX` is [`NO_LIMIT`] in a connection's carried limit.)
pub const MAX_NUMBER: u32 = u32::MAX - 1;

/// A connection's carried request limit when it has none.
pub const NO_LIMIT: u32 = u32::MAX;

/// A well-formed header's parameters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Hint {
    /// `timeout`: seconds the backend keeps an idle connection open.
    pub timeout: Option<u32>,
    /// `max`: further requests the backend accepts on the connection.
    pub max: Option<u32>,
}

/// The parameters this module reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Param {
    Timeout,
    Max,
}

impl Param {
    fn name(self) -> &'static str {
        match self {
            Param::Timeout => "timeout",
            Param::Max => "max",
        }
    }
}

/// Why a header was ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Defect {
    Empty,
    TooLong(usize),
    /// Bad syntax at this byte offset.
    Syntax(usize),
    Repeated(Param),
    NoValue(Param),
    NotANumber(Param),
    Overflow(Param),
    /// More than one `Keep-Alive` header in the response.
    MoreThanOneHeader,
}

impl fmt::Display for Defect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Defect::Empty => write!(f, "empty"),
            Defect::TooLong(len) => write!(f, "{len} bytes, more than {MAX_LEN}"),
            Defect::Syntax(at) => write!(f, "bad syntax at byte {at}"),
            Defect::Repeated(p) => write!(f, "\"{}\" given twice", p.name()),
            Defect::NoValue(p) => write!(f, "\"{}\" without a value", p.name()),
            Defect::NotANumber(p) => write!(f, "\"{}\" is not a number", p.name()),
            Defect::Overflow(p) => write!(f, "\"{}\" is above {MAX_NUMBER}", p.name()),
            Defect::MoreThanOneHeader => write!(f, "more than one Keep-Alive header"),
        }
    }
}

#[inline(always)]
fn is_ows(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// RFC 9110 tchar, by byte: a table, as a header's every byte is asked.
static TCHAR: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'!' | b'#'
                    | b'$'
                    | b'%'
                    | b'&'
                    | b'\''
                    | b'*'
                    | b'+'
                    | b'-'
                    | b'.'
                    | b'^'
                    | b'_'
                    | b'`'
                    | b'|'
                    | b'~'
            );
        b += 1;
    }
    table
};

#[inline(always)]
fn is_tchar(b: u8) -> bool {
    TCHAR[usize::from(b)]
}

/// The first position from `i` on that is not optional whitespace.
#[inline(always)]
fn skip_ows(s: &[u8], mut i: usize) -> usize {
    while i < s.len() && is_ows(s[i]) {
        i += 1;
    }
    i
}

/// The end of the token starting at `i` (`i` itself if there is none).
#[inline(always)]
fn token_end(s: &[u8], mut i: usize) -> usize {
    while i < s.len() && is_tchar(s[i]) {
        i += 1;
    }
    i
}

/// The closing quote of the quoted string whose content starts at `i`
/// (escapes skipped, not resolved: a value with `\` is no number), or
/// `None` if it is not terminated or holds a control character.
#[inline]
fn closing_quote(s: &[u8], mut i: usize) -> Option<usize> {
    while i < s.len() {
        match s[i] {
            b'"' => return Some(i),
            b'\\' => i += 2,
            b'\t' | b' '..=b'~' | 0x80..=0xff => i += 1,
            _ => return None,
        }
    }
    None
}

/// The value of a `timeout` or `max` parameter.
fn number(value: &[u8], param: Param) -> Result<u32, Defect> {
    if value.is_empty() {
        return Err(Defect::NoValue(param));
    }
    if !value.iter().all(u8::is_ascii_digit) {
        return Err(Defect::NotANumber(param));
    }
    let mut n: u64 = 0;
    for &d in value {
        n = n * 10 + u64::from(d - b'0');
        if n > u64::from(MAX_NUMBER) {
            return Err(Defect::Overflow(param));
        }
    }
    Ok(n as u32)
}

/// Parses one `Keep-Alive` header value.
pub fn parse(s: &[u8]) -> Result<Hint, Defect> {
    match canonical(s) {
        Some(hint) => Ok(hint),
        None => parse_list(s),
    }
}

/// The digits at the start of `s`, if there are some and they are a
/// number this module reads, and what follows them.
#[inline(always)]
fn leading_number(s: &[u8]) -> Option<(u32, &[u8])> {
    // One pass: at most 10 digits (u32::MAX has 10), read as they are
    // counted.
    let mut n = 0u64;
    let mut digits = 0;
    for &b in s {
        let d = b.wrapping_sub(b'0');
        if d > 9 {
            break;
        }
        digits += 1;
        if digits > 10 {
            return None;
        }
        n = n * 10 + u64::from(d);
    }
    if digits == 0 || n > u64::from(MAX_NUMBER) {
        return None;
    }
    Some((n as u32, s.get(digits..)?))
}

/// The header as Apache (`timeout=5, max=100`) and Node (`timeout=5`)
/// write it, read without the list parser: every response of theirs has
/// it. `None` for anything else, which [`parse_list`] reads (the same
/// result for these, as the unit tests check).
#[inline]
fn canonical(s: &[u8]) -> Option<Hint> {
    let rest = s.strip_prefix(b"timeout=")?;
    let (timeout, rest) = leading_number(rest)?;
    if rest.is_empty() {
        return Some(Hint {
            timeout: Some(timeout),
            max: None,
        });
    }
    let (max, rest) = leading_number(rest.strip_prefix(b", max=")?)?;
    rest.is_empty().then_some(Hint {
        timeout: Some(timeout),
        max: Some(max),
    })
}

/// Parses one `Keep-Alive` header value as an HTTP list (RFC 9110 5.6.1).
fn parse_list(s: &[u8]) -> Result<Hint, Defect> {
    if s.len() > MAX_LEN {
        return Err(Defect::TooLong(s.len()));
    }
    let mut hint = Hint::default();
    let mut any = false;
    let mut i = 0;
    loop {
        i = skip_ows(s, i);
        if i == s.len() {
            break;
        }
        if s[i] == b',' {
            // An empty list element.
            i += 1;
            continue;
        }
        let name_at = i;
        i = token_end(s, i);
        if i == name_at {
            return Err(Defect::Syntax(name_at));
        }
        let name = &s[name_at..i];
        any = true;
        i = skip_ows(s, i);
        let mut value: &[u8] = &[];
        if i < s.len() && s[i] == b'=' {
            i = skip_ows(s, i + 1);
            let value_at = i;
            if i < s.len() && s[i] == b'"' {
                let end = closing_quote(s, i + 1).ok_or(Defect::Syntax(value_at))?;
                value = &s[i + 1..end];
                i = end + 1;
            } else {
                i = token_end(s, i);
                // `timeout=` and `timeout=,`: a value is missing; a byte
                // that cannot start one is bad syntax.
                if i == value_at && i < s.len() && s[i] != b',' {
                    return Err(Defect::Syntax(value_at));
                }
                value = &s[value_at..i];
            }
            i = skip_ows(s, i);
        }
        if i < s.len() && s[i] != b',' {
            return Err(Defect::Syntax(i));
        }

        let (param, slot) = if name.eq_ignore_ascii_case(b"timeout") {
            (Param::Timeout, &mut hint.timeout)
        } else if name.eq_ignore_ascii_case(b"max") {
            (Param::Max, &mut hint.max)
        } else {
            // Another parameter: ignored by itself.
            continue;
        };
        if slot.is_some() {
            return Err(Defect::Repeated(param));
        }
        *slot = Some(number(value, param)?);
    }
    if !any {
        return Err(Defect::Empty);
    }
    Ok(hint)
}

/// What the configuration allows one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allowed {
    /// `keepalive_requests`.
    pub requests: u64,
    /// `keepalive_timeout`, milliseconds.
    pub timeout_ms: u64,
    /// `keepalive_hint_margin`, milliseconds.
    pub margin_ms: u64,
}

/// Why a hint says the connection must not be reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoReuse {
    /// `timeout` is not above the margin.
    Timeout,
    /// The requests the backend accepts (`max`) are used up.
    Max,
}

/// What happens to a connection whose response has just been read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// The connection may be kept only while it has carried fewer
    /// requests than this (`keepalive_requests` or the hint's, the
    /// smaller; 0 when the hint says no reuse).
    pub requests: u64,
    /// The hint's own limit on the requests the connection carries, to
    /// travel with it while idle and reused ([`NO_LIMIT`] without one).
    pub carried: u32,
    /// The idle timer, milliseconds.
    pub timeout_ms: u64,
    /// The hint made the timer shorter than `keepalive_timeout`.
    pub timer_shortened: bool,
    pub no_reuse: Option<NoReuse>,
}

/// What a hint (`None` for a response without a usable one) does to a
/// connection that has carried `requests` requests, this one included,
/// and carries the limit `carried` from earlier hints.
pub fn decide(hint: Option<&Hint>, carried: u32, requests: u64, allowed: &Allowed) -> Decision {
    let mut limit = u64::from(carried);
    let mut carried = carried;
    if let Some(max) = hint.and_then(|h| h.max) {
        let new = requests.saturating_add(u64::from(max));
        if new < limit {
            limit = new;
            // Past u32 (four billion requests on one connection) the
            // limit is not carried: keepalive_requests still applies.
            carried = u32::try_from(new).unwrap_or(NO_LIMIT);
        }
    }
    let mut d = Decision {
        requests: allowed.requests.min(limit),
        carried,
        timeout_ms: allowed.timeout_ms,
        timer_shortened: false,
        no_reuse: None,
    };
    if carried != NO_LIMIT && requests >= u64::from(carried) {
        d.no_reuse = Some(NoReuse::Max);
    }
    if let Some(timeout) = hint.and_then(|h| h.timeout) {
        let hinted = u64::from(timeout) * 1000;
        if hinted <= allowed.margin_ms {
            d.requests = 0;
            d.no_reuse = Some(NoReuse::Timeout);
        } else if hinted - allowed.margin_ms < allowed.timeout_ms {
            d.timeout_ms = hinted - allowed.margin_ms;
            d.timer_shortened = true;
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hint(timeout: Option<u32>, max: Option<u32>) -> Result<Hint, Defect> {
        Ok(Hint { timeout, max })
    }

    #[test]
    fn headers_as_backends_send_them_and_as_the_rfc_allows() {
        let cases: &[(&[u8], Result<Hint, Defect>)] = &[
            // Apache, Node
            (b"timeout=5, max=100", hint(Some(5), Some(100))),
            (b"timeout=5", hint(Some(5), None)),
            (b"max=3", hint(None, Some(3))),
            // case, whitespace, order, empty elements, quoting
            (b"Timeout=5, MAX=100", hint(Some(5), Some(100))),
            (b"TIMEOUT = 5 ,max= 9", hint(Some(5), Some(9))),
            (b"  timeout=5\t,\tmax=9  ", hint(Some(5), Some(9))),
            (b"max=9,timeout=5", hint(Some(5), Some(9))),
            (b",timeout=5,,", hint(Some(5), None)),
            (b"timeout=\"5\"", hint(Some(5), None)),
            (b"timeout=0", hint(Some(0), None)),
            (b"max=0", hint(None, Some(0))),
            (b"timeout=007", hint(Some(7), None)),
            (b"timeout=4294967294", hint(Some(MAX_NUMBER), None)),
            // other parameters are ignored one by one
            (b"timeout=5, foo=bar", hint(Some(5), None)),
            (b"foo, timeout=5", hint(Some(5), None)),
            (b"x-ext=\"a, b\", max=2", hint(None, Some(2))),
            (b"foo=bar", hint(None, None)),
            (b"timeoutx=5", hint(None, None)),
            // the whole header ignored
            (b"", Err(Defect::Empty)),
            (b"   ", Err(Defect::Empty)),
            (b",,", Err(Defect::Empty)),
            (b"timeout=-1", Err(Defect::NotANumber(Param::Timeout))),
            (b"timeout=+5", Err(Defect::NotANumber(Param::Timeout))),
            (b"timeout=5.5", Err(Defect::NotANumber(Param::Timeout))),
            (b"timeout=abc", Err(Defect::NotANumber(Param::Timeout))),
            (b"timeout=5s", Err(Defect::NotANumber(Param::Timeout))),
            (b"max=1e3", Err(Defect::NotANumber(Param::Max))),
            (b"timeout=\"5 \"", Err(Defect::NotANumber(Param::Timeout))),
            (b"timeout=\"\\5\"", Err(Defect::NotANumber(Param::Timeout))),
            (b"timeout=4294967295", Err(Defect::Overflow(Param::Timeout))),
            (
                b"max=99999999999999999999999",
                Err(Defect::Overflow(Param::Max)),
            ),
            (b"timeout", Err(Defect::NoValue(Param::Timeout))),
            (b"timeout=", Err(Defect::NoValue(Param::Timeout))),
            (b"timeout=, max=5", Err(Defect::NoValue(Param::Timeout))),
            (b"max=\"\"", Err(Defect::NoValue(Param::Max))),
            (
                b"timeout=5, timeout=5",
                Err(Defect::Repeated(Param::Timeout)),
            ),
            (b"max=1, Max=2", Err(Defect::Repeated(Param::Max))),
            (b"timeout=5 max=100", Err(Defect::Syntax(10))),
            (b"timeout=5; max=100", Err(Defect::Syntax(9))),
            (b"timeout==5", Err(Defect::Syntax(8))),
            (b"=5", Err(Defect::Syntax(0))),
            (b"timeout=\"5", Err(Defect::Syntax(8))),
            (b"timeout=\"5\"x", Err(Defect::Syntax(11))),
            (b"timeout=5\x00", Err(Defect::Syntax(9))),
            (b"t\xffimeout=5", Err(Defect::Syntax(1))),
        ];
        for (value, expected) in cases {
            assert_eq!(
                parse(value),
                *expected,
                "{:?}",
                String::from_utf8_lossy(value)
            );
        }
    }

    /// The fast path's numbers at their limits: the largest read, one
    /// above it, more than ten digits, leading zeros; each as the list
    /// parser reads it.
    #[test]
    fn canonical_numbers_at_their_limits() {
        let max = MAX_NUMBER;
        let cases: [(String, Option<Hint>); 6] = [
            (
                format!("timeout={max}"),
                Some(Hint {
                    timeout: Some(max),
                    max: None,
                }),
            ),
            (format!("timeout={}", u64::from(max) + 1), None),
            ("timeout=00000000001".into(), None),
            (
                "timeout=0000000001, max=0000000002".into(),
                Some(Hint {
                    timeout: Some(1),
                    max: Some(2),
                }),
            ),
            (
                format!("timeout=5, max={max}"),
                Some(Hint {
                    timeout: Some(5),
                    max: Some(max),
                }),
            ),
            ("timeout=5, max=".into(), None),
        ];
        for (value, fast) in cases {
            let bytes = value.as_bytes();
            assert_eq!(canonical(bytes), fast, "{value:?}");
            assert_eq!(parse(bytes), parse_list(bytes), "{value:?}");
        }
    }

    #[test]
    fn tchar_is_rfc_9110s() {
        let listed = b"!#$%&'*+-.^_`|~";
        for b in 0..=255u8 {
            let expected = b.is_ascii_alphanumeric() || listed.contains(&b);
            assert_eq!(is_tchar(b), expected, "{b:#x}");
        }
    }

    #[test]
    fn oversized_headers_are_not_read() {
        let mut long = b"timeout=5, ".to_vec();
        long.resize(MAX_LEN, b' ');
        assert_eq!(parse(&long), hint(Some(5), None));
        long.push(b' ');
        assert_eq!(parse(&long), Err(Defect::TooLong(MAX_LEN + 1)));
    }

    /// A model: the header built from random parameters parses to what
    /// they say, whatever the spelling; any byte string parses without
    /// panicking, and to a defect or to parameters it really contains.
    #[test]
    fn parses_what_it_is_built_from() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let spaces = ["", " ", "\t", "  "];
        for _ in 0..20_000 {
            let mut parts = Vec::new();
            let timeout = (next() % 3 == 0).then(|| (next() % 100_000) as u32);
            let max = (next() % 3 == 0).then(|| (next() % 100_000) as u32);
            if let Some(t) = timeout {
                parts.push(("TiMeOuT", t.to_string()));
            }
            if let Some(m) = max {
                parts.push(("mAx", m.to_string()));
            }
            for _ in 0..next() % 3 {
                parts.push(("ext", "v".to_string()));
            }
            if parts.is_empty() {
                continue;
            }
            // a rotation of the parameters
            let turn = (next() as usize) % parts.len();
            parts.rotate_left(turn);
            let mut value = String::new();
            for (i, (name, v)) in parts.iter().enumerate() {
                let sp = |n: u64| spaces[(n % 4) as usize];
                if i > 0 {
                    value.push_str(sp(next()));
                    value.push(',');
                }
                let name = if next() % 2 == 0 {
                    name.to_ascii_lowercase()
                } else {
                    name.to_string()
                };
                let v = if next() % 4 == 0 {
                    format!("\"{v}\"")
                } else {
                    v.clone()
                };
                value.push_str(&format!(
                    "{}{name}{}={}{v}",
                    sp(next()),
                    sp(next()),
                    sp(next())
                ));
            }
            assert_eq!(parse(value.as_bytes()), hint(timeout, max), "{value:?}");
        }

        // the shortcut for Apache's and Node's spelling reads what the
        // list parser reads
        for _ in 0..50_000 {
            let t = next() % 6_000_000_000;
            let m = next() % 6_000_000_000;
            let value = match next() % 4 {
                0 => format!("timeout={t}"),
                1 => format!("timeout={t}, max={m}"),
                2 => format!("timeout=0{t}, max={m}"),
                _ => format!("timeout={}, max={m}", t % 100),
            };
            let bytes = value.as_bytes();
            if let Some(h) = canonical(bytes) {
                assert_eq!(parse_list(bytes), Ok(h), "{value:?}");
            }
            assert_eq!(parse(bytes), parse_list(bytes), "{value:?}");
            // Apache's and Node's own values take the shortcut
            let apache = format!("timeout={}, max={}", t % 100, m % 1000);
            assert!(canonical(apache.as_bytes()).is_some(), "{apache:?}");
        }

        let alphabet = b"timeoutmax=0123456789,\" \t-;\\x";
        for _ in 0..50_000 {
            let len = (next() % 24) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| alphabet[(next() as usize) % alphabet.len()])
                .collect();
            assert_eq!(parse(&bytes), parse_list(&bytes));
            if let Some(h) = canonical(&bytes) {
                assert_eq!(parse_list(&bytes), Ok(h));
            }
            if let Ok(h) = parse(&bytes) {
                let text = String::from_utf8_lossy(&bytes).to_ascii_lowercase();
                if let Some(t) = h.timeout {
                    assert!(text.contains(&t.to_string()), "{text:?}");
                    assert!(text.contains("timeout"), "{text:?}");
                }
                if let Some(m) = h.max {
                    assert!(text.contains(&m.to_string()), "{text:?}");
                    assert!(text.contains("max"), "{text:?}");
                }
            }
        }
    }

    const ALLOWED: Allowed = Allowed {
        requests: 1000,
        timeout_ms: 60_000,
        margin_ms: 1000,
    };

    #[test]
    fn no_hint_changes_nothing() {
        let d = decide(None, NO_LIMIT, 7, &ALLOWED);
        assert_eq!(
            d,
            Decision {
                requests: 1000,
                carried: NO_LIMIT,
                timeout_ms: 60_000,
                timer_shortened: false,
                no_reuse: None,
            }
        );
        let d = decide(Some(&Hint::default()), NO_LIMIT, 7, &ALLOWED);
        assert_eq!((d.requests, d.timeout_ms), (1000, 60_000));
    }

    #[test]
    fn timeout_shortens_the_idle_timer_by_the_margin() {
        let t = |secs, allowed: &Allowed| {
            let d = decide(
                Some(&Hint {
                    timeout: Some(secs),
                    max: None,
                }),
                NO_LIMIT,
                1,
                allowed,
            );
            (d.timeout_ms, d.timer_shortened, d.no_reuse, d.requests)
        };
        assert_eq!(t(5, &ALLOWED), (4000, true, None, 1000));
        assert_eq!(t(3, &ALLOWED), (2000, true, None, 1000));
        // never longer than keepalive_timeout
        assert_eq!(t(300, &ALLOWED), (60_000, false, None, 1000));
        assert_eq!(t(61, &ALLOWED), (60_000, false, None, 1000));
        assert_eq!(t(MAX_NUMBER, &ALLOWED), (60_000, false, None, 1000));
        // not above the margin: not kept
        assert_eq!(t(1, &ALLOWED), (60_000, false, Some(NoReuse::Timeout), 0));
        assert_eq!(t(0, &ALLOWED), (60_000, false, Some(NoReuse::Timeout), 0));
        let short = Allowed {
            timeout_ms: 2000,
            ..ALLOWED
        };
        assert_eq!(t(300, &short), (2000, false, None, 1000));
        assert_eq!(t(2, &short), (1000, true, None, 1000));
        let no_margin = Allowed {
            margin_ms: 0,
            ..ALLOWED
        };
        assert_eq!(t(1, &no_margin), (1000, true, None, 1000));
        assert_eq!(t(0, &no_margin), (60_000, false, Some(NoReuse::Timeout), 0));
        let wide = Allowed {
            margin_ms: 2500,
            ..ALLOWED
        };
        assert_eq!(t(3, &wide), (500, true, None, 1000));
    }

    #[test]
    fn max_limits_the_requests_and_travels_with_the_connection() {
        let max = |m| Hint {
            timeout: None,
            max: Some(m),
        };
        // max=0: not kept
        let d = decide(Some(&max(0)), NO_LIMIT, 1, &ALLOWED);
        assert_eq!(
            (d.requests, d.carried, d.no_reuse),
            (1, 1, Some(NoReuse::Max))
        );
        // max=2 after the first request: two more, then not kept
        let d = decide(Some(&max(2)), NO_LIMIT, 1, &ALLOWED);
        assert_eq!((d.requests, d.carried, d.no_reuse), (3, 3, None));
        assert!(1 < d.requests);
        // the second request's response says nothing: the limit stays
        let d = decide(None, d.carried, 2, &ALLOWED);
        assert_eq!((d.requests, d.carried, d.no_reuse), (3, 3, None));
        // the third: used up
        let d = decide(None, d.carried, 3, &ALLOWED);
        assert_eq!((d.requests, d.no_reuse), (3, Some(NoReuse::Max)));
        assert!(3 >= d.requests);
        // a later, larger max does not lift it; a smaller one lowers it
        let d = decide(Some(&max(50)), 10, 5, &ALLOWED);
        assert_eq!((d.requests, d.carried), (10, 10));
        let d = decide(Some(&max(1)), 10, 5, &ALLOWED);
        assert_eq!((d.requests, d.carried), (6, 6));
        // keepalive_requests is smaller: it wins, the hint is carried
        let few = Allowed {
            requests: 4,
            ..ALLOWED
        };
        let d = decide(Some(&max(100)), NO_LIMIT, 1, &few);
        assert_eq!((d.requests, d.carried, d.no_reuse), (4, 101, None));
        // Apache: MaxKeepAliveRequests 3 says max=3, 2, 1, then closes
        let mut carried = NO_LIMIT;
        for (request, m) in [(1, 3), (2, 2), (3, 1)] {
            let d = decide(Some(&max(m)), carried, request, &ALLOWED);
            assert!(request < d.requests, "request {request}");
            carried = d.carried;
        }
        assert_eq!(carried, 4);
        let d = decide(None, carried, 4, &ALLOWED);
        assert!(4 >= d.requests);
        // beyond u32: not carried, keepalive_requests still applies
        let d = decide(
            Some(&max(MAX_NUMBER)),
            NO_LIMIT,
            u64::from(u32::MAX),
            &ALLOWED,
        );
        assert_eq!((d.requests, d.carried), (1000, NO_LIMIT));
    }

    #[test]
    fn both_parameters() {
        let h = Hint {
            timeout: Some(5),
            max: Some(100),
        };
        let d = decide(Some(&h), NO_LIMIT, 1, &ALLOWED);
        assert_eq!(
            d,
            Decision {
                requests: 101,
                carried: 101,
                timeout_ms: 4000,
                timer_shortened: true,
                no_reuse: None,
            }
        );
        let h = Hint {
            timeout: Some(1),
            max: Some(100),
        };
        let d = decide(Some(&h), NO_LIMIT, 1, &ALLOWED);
        assert_eq!((d.requests, d.no_reuse), (0, Some(NoReuse::Timeout)));
    }

    #[test]
    fn defects_read_as_text() {
        assert_eq!(
            Defect::Overflow(Param::Max).to_string(),
            "\"max\" is above 4294967294"
        );
        assert_eq!(Defect::Syntax(3).to_string(), "bad syntax at byte 3");
        assert_eq!(
            Defect::MoreThanOneHeader.to_string(),
            "more than one Keep-Alive header"
        );
    }
}
