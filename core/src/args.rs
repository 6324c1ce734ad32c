//! Parsing of the `keepalive` directive's arguments, in safe Rust.
//!
//! Syntax, parameters in any order after the count:
//!
//! ```text
//! keepalive connections [local] [slice_key=key] [slice_conn=number]
//!           [slice_dyn=$variable] [slice_poolsize=number] [slice_keylen=length];
//! keepalive auto [max=number] [decay=time] [local] [slice_key=key] ...;
//! ```
//!
//! With `auto` the count is the ceiling `max=` (see [`crate::auto`]), and
//! `slice_key` needs no `slice_conn`: a bucket may then hold up to the
//! ceiling.
//!
//! The result still holds the raw `slice_key` text and `slice_dyn` variable
//! name: compiling them needs nginx and happens in the directive handler.

use std::fmt::{self, Write};

use crate::auto::{DEFAULT_DECAY_MS, DEFAULT_MAX, MAX_DECAY_MS, MIN_DECAY_MS};

pub const DEFAULT_POOLSIZE: usize = 20;
pub const DEFAULT_KEYLEN: usize = 40;

/// Largest `keepalive` count (and `slice_conn`). Idle connections also
/// count against `worker_connections`; the cache's memory is allocated
/// per worker with the configuration (about 240 bytes a connection, 15 MiB
/// at this limit), so an absurd value would cost memory for nothing.
pub const MAX_CONNECTIONS: usize = 1 << 16;
/// Largest `slice_poolsize`. At most `keepalive` + 1 buckets are ever
/// allocated, whatever this says: a bucket in use holds a connection.
pub const MAX_POOLSIZE: usize = 1 << 16;
/// Largest `slice_keylen`: four times the longest host name (255 bytes),
/// room for keys built from several variables; each bucket stores this
/// many bytes.
pub const MAX_KEYLEN: usize = 1024;

/// The parsed `keepalive` directive.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct KeepaliveArgs<'a> {
    /// The count, or with `auto` its ceiling (`max=`).
    pub connections: usize,
    pub local: bool,
    pub slice: Option<SliceArgs<'a>>,
    /// `auto`: the decay interval in milliseconds.
    pub auto: Option<u64>,
}

/// The `slice_*` parameters.
#[derive(Debug, PartialEq, Eq)]
pub struct SliceArgs<'a> {
    /// `slice_key=` text, a complex value (may contain variables).
    pub key: &'a [u8],
    /// `slice_conn=`: the fixed per-bucket limit.
    pub conn: Option<usize>,
    /// `slice_dyn=`: variable name without the `$`; wins over `conn`.
    pub dyn_var: Option<&'a [u8]>,
    pub poolsize: usize,
    pub keylen: usize,
}

/// A configuration error; `Display` gives the text of the `[emerg]` line.
#[derive(Debug, PartialEq, Eq)]
pub enum ArgError<'a> {
    /// Count missing, not a number or negative (nginx's own wording).
    InvalidCount(&'a [u8]),
    InvalidParameter(&'a [u8]),
    DuplicateParameter(&'a [u8]),
    InvalidNumber {
        name: &'static str,
        value: &'a [u8],
    },
    /// The count is above [`MAX_CONNECTIONS`].
    CountTooLarge(&'a [u8]),
    /// A `slice_*` number is above its limit.
    NumberTooLarge {
        name: &'static str,
        value: &'a [u8],
        max: usize,
    },
    ZeroKeylen,
    EmptyKey,
    NotAVariable(&'a [u8]),
    KeyWithoutLimit,
    SliceWithoutKey(&'static str),
    /// `max=0` with `auto`.
    ZeroMax,
    /// A `decay=` that is not a time, or out of bounds.
    InvalidDecay(&'a [u8]),
    /// `max=` or `decay=` without `auto`.
    AutoOnly(&'static str),
}

impl fmt::Display for ArgError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = |b: &[u8]| printable(b);
        match self {
            ArgError::InvalidCount(v) => {
                write!(f, "invalid value \"{}\" in \"keepalive\" directive", s(v))
            }
            ArgError::CountTooLarge(v) => write!(
                f,
                "invalid value \"{}\" in \"keepalive\" directive, \
                 the maximum is {MAX_CONNECTIONS}",
                s(v)
            ),
            ArgError::NumberTooLarge { name, value, max } => write!(
                f,
                "invalid value \"{}\" of \"{name}\" in \"keepalive\" directive, \
                 the maximum is {max}",
                s(value)
            ),
            ArgError::InvalidParameter(v) => {
                write!(
                    f,
                    "invalid parameter \"{}\" in \"keepalive\" directive",
                    s(v)
                )
            }
            ArgError::DuplicateParameter(v) => {
                write!(
                    f,
                    "duplicate parameter \"{}\" in \"keepalive\" directive",
                    s(v)
                )
            }
            ArgError::InvalidNumber { name, value } => write!(
                f,
                "invalid value \"{}\" of \"{name}\" in \"keepalive\" directive",
                s(value)
            ),
            ArgError::ZeroKeylen => write!(
                f,
                "invalid value \"slice_keylen=0\" in \"keepalive\" directive, must be at least 1"
            ),
            ArgError::EmptyKey => {
                write!(f, "empty \"slice_key\" value in \"keepalive\" directive")
            }
            ArgError::NotAVariable(v) => write!(
                f,
                "invalid value \"slice_dyn={}\" in \"keepalive\" directive, must be a variable",
                s(v)
            ),
            ArgError::KeyWithoutLimit => write!(
                f,
                "\"slice_key\" requires \"slice_conn\" or \"slice_dyn\" in \"keepalive\" directive"
            ),
            ArgError::SliceWithoutKey(name) => {
                write!(
                    f,
                    "\"{name}\" requires \"slice_key\" in \"keepalive\" directive"
                )
            }
            ArgError::ZeroMax => write!(
                f,
                "invalid value \"max=0\" in \"keepalive\" directive, must be at least 1"
            ),
            ArgError::InvalidDecay(v) => write!(
                f,
                "invalid value \"{}\" of \"decay\" in \"keepalive\" directive, \
                 must be a time from {MIN_DECAY_MS}ms to {}s",
                s(v),
                MAX_DECAY_MS / 1000
            ),
            ArgError::AutoOnly(name) => {
                write!(f, "\"{name}\" requires \"auto\" in \"keepalive\" directive")
            }
        }
    }
}

/// A configuration value as it may appear in a log line: control bytes
/// (a NUL, a newline) and invalid UTF-8 are escaped as `\xNN`, so one
/// bad value cannot forge or cut log lines.
fn printable(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c.is_control() {
                let _ = write!(out, "\\x{:02x}", u32::from(c));
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

/// Parses a non-negative decimal number as nginx's `ngx_atoi` does.
/// The variable a `slice_key` consists of, `$name` or `${name}` and nothing
/// else (as nginx's script compiler reads a name: letters, digits and `_`,
/// not starting with a digit, which would be a regex capture): such a key
/// is read as that variable, without running a script.
pub fn single_variable(key: &[u8]) -> Option<&[u8]> {
    let rest = key.strip_prefix(b"$")?;
    let name = match rest.strip_prefix(b"{") {
        Some(braced) => braced.strip_suffix(b"}")?,
        None => rest,
    };
    let first = *name.first()?;
    let valid =
        !first.is_ascii_digit() && name.iter().all(|&c| c.is_ascii_alphanumeric() || c == b'_');
    valid.then_some(name)
}

#[inline]
pub fn parse_number(value: &[u8]) -> Option<usize> {
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    value.iter().try_fold(0usize, |n, &d| {
        n.checked_mul(10)?.checked_add(usize::from(d - b'0'))
    })
}

enum Bounded {
    Within(usize),
    /// Digits only, but above the limit (or beyond `usize`).
    Above,
    NotANumber,
}

fn bounded_number(value: &[u8], max: usize) -> Bounded {
    match parse_number(value) {
        Some(n) if n <= max => Bounded::Within(n),
        Some(_) => Bounded::Above,
        None if !value.is_empty() && value.iter().all(u8::is_ascii_digit) => Bounded::Above,
        None => Bounded::NotANumber,
    }
}

/// A time as nginx writes one in a directive, in milliseconds: a number
/// with a unit (`ms`, `s`, `m`, `h`) or without (seconds). One unit only
/// (not `1m30s`).
pub fn parse_msec(value: &[u8]) -> Option<u64> {
    let digits = value.iter().take_while(|c| c.is_ascii_digit()).count();
    let (number, unit) = value.split_at(digits);
    let n = parse_number(number)? as u64;
    let scale = match unit {
        b"ms" => 1,
        b"" | b"s" => 1000,
        b"m" => 60_000,
        b"h" => 3_600_000,
        _ => return None,
    };
    n.checked_mul(scale)
}

/// Parses the directive's arguments (without the directive name).
pub fn parse_keepalive<'a>(args: &[&'a [u8]]) -> Result<KeepaliveArgs<'a>, ArgError<'a>> {
    let (&count, params) = args.split_first().ok_or(ArgError::InvalidCount(b""))?;
    let is_auto = count == b"auto";
    let mut connections = match bounded_number(count, MAX_CONNECTIONS) {
        _ if is_auto => DEFAULT_MAX,
        Bounded::Within(n) => n,
        Bounded::Above => return Err(ArgError::CountTooLarge(count)),
        Bounded::NotANumber => return Err(ArgError::InvalidCount(count)),
    };
    let mut max = None;
    let mut decay = None;

    let mut local = false;
    let mut key = None;
    let mut conn = None;
    let mut dyn_var = None;
    let mut poolsize = None;
    let mut keylen = None;

    for &param in params {
        if param == b"local" {
            if local {
                return Err(ArgError::DuplicateParameter(param));
            }
            local = true;
            continue;
        }

        let Some(eq) = memchr::memchr(b'=', param) else {
            return Err(ArgError::InvalidParameter(param));
        };
        let (name, value) = (&param[..eq], &param[eq + 1..]);

        let number = |name: &'static str, max: usize| match bounded_number(value, max) {
            Bounded::Within(n) => Ok(n),
            Bounded::Above => Err(ArgError::NumberTooLarge { name, value, max }),
            Bounded::NotANumber => Err(ArgError::InvalidNumber { name, value }),
        };

        let seen = match name {
            b"slice_key" => {
                if value.is_empty() {
                    return Err(ArgError::EmptyKey);
                }
                key.replace(value).is_some()
            }
            b"slice_conn" => conn
                .replace(number("slice_conn", MAX_CONNECTIONS)?)
                .is_some(),
            b"slice_dyn" => {
                let var = value
                    .strip_prefix(b"$")
                    .filter(|v| !v.is_empty())
                    .ok_or(ArgError::NotAVariable(value))?;
                dyn_var.replace(var).is_some()
            }
            b"slice_poolsize" => poolsize
                .replace(number("slice_poolsize", MAX_POOLSIZE)?)
                .is_some(),
            b"slice_keylen" => {
                let n = number("slice_keylen", MAX_KEYLEN)?;
                if n == 0 {
                    return Err(ArgError::ZeroKeylen);
                }
                keylen.replace(n).is_some()
            }
            b"max" => {
                let n = number("max", MAX_CONNECTIONS)?;
                if n == 0 {
                    return Err(ArgError::ZeroMax);
                }
                max.replace(n).is_some()
            }
            b"decay" => {
                let ms = parse_msec(value)
                    .filter(|ms| (MIN_DECAY_MS..=MAX_DECAY_MS).contains(ms))
                    .ok_or(ArgError::InvalidDecay(value))?;
                decay.replace(ms).is_some()
            }
            _ => return Err(ArgError::InvalidParameter(param)),
        };
        if seen {
            return Err(ArgError::DuplicateParameter(name));
        }
    }

    if !is_auto {
        if max.is_some() {
            return Err(ArgError::AutoOnly("max"));
        }
        if decay.is_some() {
            return Err(ArgError::AutoOnly("decay"));
        }
    }
    if let Some(max) = max {
        connections = max;
    }

    let slice = match key {
        Some(key) => {
            if conn.is_none() && dyn_var.is_none() && !is_auto {
                return Err(ArgError::KeyWithoutLimit);
            }
            Some(SliceArgs {
                key,
                conn,
                dyn_var,
                poolsize: poolsize.unwrap_or(DEFAULT_POOLSIZE),
                keylen: keylen.unwrap_or(DEFAULT_KEYLEN),
            })
        }
        None => {
            let stray = [
                ("slice_conn", conn.is_some()),
                ("slice_dyn", dyn_var.is_some()),
                ("slice_poolsize", poolsize.is_some()),
                ("slice_keylen", keylen.is_some()),
            ];
            if let Some((name, _)) = stray.iter().find(|(_, given)| *given) {
                return Err(ArgError::SliceWithoutKey(name));
            }
            None
        }
    };

    Ok(KeepaliveArgs {
        connections,
        local,
        slice,
        auto: is_auto.then(|| decay.unwrap_or(DEFAULT_DECAY_MS)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Result<KeepaliveArgs<'_>, String> {
        let args: Vec<&[u8]> = line.split_whitespace().map(str::as_bytes).collect();
        parse_keepalive(&args).map_err(|e| e.to_string())
    }

    #[test]
    fn auto_takes_a_ceiling_and_a_decay_interval() {
        let p = parse("auto").expect("auto");
        assert_eq!(
            (p.connections, p.auto),
            (DEFAULT_MAX, Some(DEFAULT_DECAY_MS))
        );
        let p = parse("auto max=64 decay=250ms local").expect("auto max");
        assert_eq!((p.connections, p.auto, p.local), (64, Some(250), true));
        assert_eq!(parse("auto decay=2").expect("s").auto, Some(2000));
        assert_eq!(parse("auto decay=1m").expect("m").auto, Some(60_000));
        // A slice key needs no slice_conn with auto.
        let p = parse("auto slice_key=$host").expect("sliced");
        assert_eq!(p.slice.map(|s| s.conn), Some(None));
        assert_eq!(
            parse("auto max=0").unwrap_err(),
            "invalid value \"max=0\" in \"keepalive\" directive, must be at least 1"
        );
        assert_eq!(
            parse("auto max=lots").unwrap_err(),
            "invalid value \"lots\" of \"max\" in \"keepalive\" directive"
        );
        assert_eq!(
            parse("auto max=65537").unwrap_err(),
            "invalid value \"65537\" of \"max\" in \"keepalive\" directive, the maximum is 65536"
        );
        assert_eq!(
            parse("auto decay=5x").unwrap_err(),
            "invalid value \"5x\" of \"decay\" in \"keepalive\" directive, \
             must be a time from 10ms to 3600s"
        );
        assert!(parse("auto decay=1ms").is_err());
        assert!(parse("auto decay=2h").is_err());
        assert_eq!(
            parse("16 max=32").unwrap_err(),
            "\"max\" requires \"auto\" in \"keepalive\" directive"
        );
        assert_eq!(
            parse("16 decay=1s").unwrap_err(),
            "\"decay\" requires \"auto\" in \"keepalive\" directive"
        );
        assert_eq!(
            parse("auto max=1 max=2").unwrap_err(),
            "duplicate parameter \"max\" in \"keepalive\" directive"
        );
        assert!(parse("Auto").is_err());
        assert_eq!(parse("16").expect("fixed").auto, None);
    }

    #[test]
    fn a_key_of_one_variable_is_read_as_that_variable() {
        assert_eq!(single_variable(b"$host"), Some(&b"host"[..]));
        assert_eq!(single_variable(b"${http_x_y}"), Some(&b"http_x_y"[..]));
        assert_eq!(single_variable(b"$arg_a1"), Some(&b"arg_a1"[..]));
        for key in [
            &b"$host:x"[..],
            b"x$host",
            b"$host$uri",
            b"$1",
            b"$",
            b"${}",
            b"${host",
            b"${host}x",
            b"host",
            b"$ho-st",
        ] {
            assert_eq!(single_variable(key), None, "{}", printable(key));
        }
    }

    #[test]
    fn plain_count() {
        let a = parse("16").unwrap();
        assert_eq!(a.connections, 16);
        assert!(!a.local);
        assert!(a.slice.is_none());
        assert_eq!(parse("0").unwrap().connections, 0);
        assert!(parse("8 local").unwrap().local);
    }

    #[test]
    fn bad_counts_name_the_value() {
        assert_eq!(
            parse("abc").unwrap_err(),
            "invalid value \"abc\" in \"keepalive\" directive"
        );
        assert_eq!(
            parse("-1").unwrap_err(),
            "invalid value \"-1\" in \"keepalive\" directive"
        );
        assert_eq!(
            parse("99999999999999999999999").unwrap_err(),
            "invalid value \"99999999999999999999999\" in \"keepalive\" directive, \
             the maximum is 65536"
        );
    }

    #[test]
    fn unknown_and_duplicate_parameters() {
        assert_eq!(
            parse("8 foo").unwrap_err(),
            "invalid parameter \"foo\" in \"keepalive\" directive"
        );
        assert_eq!(
            parse("8 slice_bogus=1").unwrap_err(),
            "invalid parameter \"slice_bogus=1\" in \"keepalive\" directive"
        );
        assert_eq!(
            parse("8 local local").unwrap_err(),
            "duplicate parameter \"local\" in \"keepalive\" directive"
        );
        assert_eq!(
            parse("8 slice_key=$host slice_conn=1 slice_conn=2").unwrap_err(),
            "duplicate parameter \"slice_conn\" in \"keepalive\" directive"
        );
    }

    #[test]
    fn fork_configurations_parse() {
        let a = parse("30 slice_key=$host slice_conn=2").unwrap();
        let s = a.slice.unwrap();
        assert_eq!(s.key, b"$host");
        assert_eq!(s.conn, Some(2));
        assert_eq!(s.poolsize, DEFAULT_POOLSIZE);
        assert_eq!(s.keylen, DEFAULT_KEYLEN);

        let s = parse("30 slice_key=$host slice_dyn=$conn")
            .unwrap()
            .slice
            .unwrap();
        assert_eq!(s.dyn_var, Some(&b"conn"[..]));
    }

    #[test]
    fn any_order() {
        let a = parse("4 slice_keylen=8 local slice_poolsize=3 slice_conn=0 slice_key=$host:x")
            .unwrap();
        assert!(a.local);
        let s = a.slice.unwrap();
        assert_eq!((s.conn, s.poolsize, s.keylen), (Some(0), 3, 8));
        assert_eq!(s.key, b"$host:x");
    }

    #[test]
    fn slice_errors() {
        assert!(parse("8 slice_key=$host")
            .unwrap_err()
            .contains("requires \"slice_conn\""));
        for p in [
            "slice_conn=1",
            "slice_dyn=$x",
            "slice_poolsize=3",
            "slice_keylen=4",
        ] {
            let name = p.split('=').next().unwrap();
            assert_eq!(
                parse(&format!("8 {p}")).unwrap_err(),
                format!("\"{name}\" requires \"slice_key\" in \"keepalive\" directive")
            );
        }
        assert_eq!(
            parse("8 slice_key=$host slice_conn=x").unwrap_err(),
            "invalid value \"x\" of \"slice_conn\" in \"keepalive\" directive"
        );
        assert!(parse("8 slice_key=$host slice_conn=-2")
            .unwrap_err()
            .contains("\"-2\""));
        assert!(parse("8 slice_key=$host slice_conn=1 slice_poolsize=")
            .unwrap_err()
            .contains("slice_poolsize"));
        assert!(parse("8 slice_key=$host slice_conn=1 slice_keylen=0")
            .unwrap_err()
            .contains("slice_keylen=0"));
        assert!(parse("8 slice_key=$host slice_dyn=conn")
            .unwrap_err()
            .contains("slice_dyn=conn"));
        assert!(parse("8 slice_key=$host slice_dyn=$")
            .unwrap_err()
            .contains("slice_dyn=$"));
        assert_eq!(
            parse("8 slice_key= slice_conn=1").unwrap_err(),
            "empty \"slice_key\" value in \"keepalive\" directive"
        );
    }

    #[test]
    fn absurd_values_name_the_limit() {
        assert_eq!(parse("65536").unwrap().connections, MAX_CONNECTIONS);
        assert_eq!(
            parse("100000000").unwrap_err(),
            "invalid value \"100000000\" in \"keepalive\" directive, the maximum is 65536"
        );
        assert_eq!(
            parse("8 slice_key=$host slice_conn=1 slice_keylen=1048576").unwrap_err(),
            "invalid value \"1048576\" of \"slice_keylen\" in \"keepalive\" directive, \
             the maximum is 1024"
        );
        assert_eq!(
            parse("8 slice_key=$host slice_conn=1 slice_poolsize=65537").unwrap_err(),
            "invalid value \"65537\" of \"slice_poolsize\" in \"keepalive\" directive, \
             the maximum is 65536"
        );
        assert_eq!(
            parse("8 slice_key=$host slice_conn=65537").unwrap_err(),
            "invalid value \"65537\" of \"slice_conn\" in \"keepalive\" directive, \
             the maximum is 65536"
        );
        let s = parse("8 slice_key=$host slice_conn=65536 slice_poolsize=65536 slice_keylen=1024")
            .unwrap()
            .slice
            .unwrap();
        assert_eq!(
            (s.conn, s.poolsize, s.keylen),
            (Some(MAX_CONNECTIONS), MAX_POOLSIZE, MAX_KEYLEN)
        );
    }

    #[test]
    fn log_lines_cannot_be_forged() {
        let args: [&[u8]; 2] = [b"8", b"bad\nvalue\0\xff"];
        assert_eq!(
            parse_keepalive(&args).unwrap_err().to_string(),
            "invalid parameter \"bad\\x0avalue\\x00\\xff\" in \"keepalive\" directive"
        );
    }

    /// splitmix64: a fixed sequence, so a failure is reproducible.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn pick<'a>(&mut self, items: &[&'a [u8]]) -> &'a [u8] {
            items[self.below(items.len())]
        }
    }

    const NAMES: &[&[u8]] = &[
        b"local",
        b"slice_key",
        b"slice_conn",
        b"slice_dyn",
        b"slice_poolsize",
        b"slice_keylen",
        b"max",
        b"decay",
        b"slice_",
        b"SLICE_CONN",
        b"",
        b"=",
    ];

    const VALUES: &[&[u8]] = &[
        b"",
        b"auto",
        b"5s",
        b"10ms",
        b"2m",
        b"0",
        b"1",
        b"8",
        b"1024",
        b"1025",
        b"4096",
        b"65536",
        b"65537",
        b"1048576",
        b"1048577",
        b"18446744073709551615",
        b"18446744073709551616",
        b"99999999999999999999999999",
        b"-1",
        b"+1",
        b"0x10",
        b" 1",
        b"1\0",
        b"$host",
        b"$",
        b"$$",
        b"=",
        b"a=b",
        b"\0",
        b"\n",
        b"\xff\xfe",
    ];

    fn random_bytes(rng: &mut Rng, buf: &mut Vec<u8>) {
        buf.clear();
        for _ in 0..rng.below(12) {
            buf.push(rng.next() as u8);
        }
    }

    /// One random directive argument: a known or garbled name, with or
    /// without `=`, a boundary or garbage value, or random bytes.
    fn random_arg(rng: &mut Rng) -> Vec<u8> {
        let mut arg = Vec::new();
        match rng.below(8) {
            0 => random_bytes(rng, &mut arg),
            1 => arg.extend_from_slice(rng.pick(VALUES)),
            2 => arg.extend_from_slice(rng.pick(NAMES)),
            _ => {
                arg.extend_from_slice(rng.pick(NAMES));
                arg.push(b'=');
                if rng.below(4) == 0 {
                    let mut garbage = Vec::new();
                    random_bytes(rng, &mut garbage);
                    arg.extend_from_slice(&garbage);
                } else {
                    arg.extend_from_slice(rng.pick(VALUES));
                }
            }
        }
        arg
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
    }

    /// Whatever the input, the parser returns (never panics), and:
    /// an error is a one-line message naming the directive and quoting the
    /// offending text, which comes from the input; a success obeys every
    /// limit and rule, and does not depend on the order of the parameters.
    #[test]
    fn hostile_input_property() {
        let mut rng = Rng(0x6b65_6570_616c_6976);
        let (mut accepted, mut refused) = (0, 0);
        for _ in 0..200_000 {
            let count = match rng.below(4) {
                0 => random_arg(&mut rng),
                _ => rng.pick(VALUES).to_vec(),
            };
            let mut owned = vec![count];
            for _ in 0..rng.below(7) {
                owned.push(random_arg(&mut rng));
            }
            let n = rng.below(owned.len() + 1);
            let args: Vec<&[u8]> = owned[..n].iter().map(Vec::as_slice).collect();

            match parse_keepalive(&args) {
                Err(err) => {
                    refused += 1;
                    let text = err.to_string();
                    assert!(text.contains("\"keepalive\" directive"), "{text}");
                    assert!(!text.chars().any(char::is_control), "{text:?}");
                    let quoted: &[u8] = match err {
                        ArgError::InvalidCount(v) | ArgError::CountTooLarge(v) => {
                            assert!(args.first().map_or(v.is_empty(), |c| *c == v));
                            v
                        }
                        ArgError::InvalidParameter(v) => {
                            assert!(args.contains(&v));
                            v
                        }
                        ArgError::DuplicateParameter(v) => {
                            assert!(NAMES[..8].contains(&v), "{text}");
                            v
                        }
                        ArgError::InvalidNumber { name, value }
                        | ArgError::NumberTooLarge { name, value, .. } => {
                            assert!(text.contains(name), "{text}");
                            assert!(args.iter().any(|a| contains(a, value)));
                            value
                        }
                        ArgError::NotAVariable(v) => {
                            assert!(args.iter().any(|a| contains(a, v)));
                            v
                        }
                        ArgError::ZeroKeylen => b"slice_keylen=0",
                        ArgError::EmptyKey => b"slice_key",
                        ArgError::KeyWithoutLimit => b"slice_key",
                        ArgError::SliceWithoutKey(name) => name.as_bytes(),
                        ArgError::ZeroMax => b"max=0",
                        ArgError::InvalidDecay(v) => v,
                        ArgError::AutoOnly(name) => name.as_bytes(),
                    };
                    assert!(text.contains(&printable(quoted)), "{text}");
                }
                Ok(parsed) => {
                    accepted += 1;
                    assert!(parsed.connections <= MAX_CONNECTIONS);
                    assert_eq!(parsed.local, args.contains(&&b"local"[..]));
                    if let Some(s) = &parsed.slice {
                        assert!(!s.key.is_empty());
                        assert!(s.conn.is_some() || s.dyn_var.is_some() || parsed.auto.is_some());
                        assert!(s.conn.unwrap_or(0) <= MAX_CONNECTIONS);
                        assert!(s.poolsize <= MAX_POOLSIZE);
                        assert!((1..=MAX_KEYLEN).contains(&s.keylen));
                    }
                    let mut reversed = args.clone();
                    reversed[1..].reverse();
                    assert_eq!(parse_keepalive(&reversed), Ok(parsed));
                }
            }
        }
        // The generator must reach both outcomes, or the property proves
        // little.
        assert!(accepted > 1000 && refused > 1000, "{accepted} {refused}");
    }
}
