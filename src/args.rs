//! Parsing of the `keepalive` directive's arguments, in safe Rust.
//!
//! Syntax, parameters in any order after the count:
//!
//! ```text
//! keepalive connections [local] [slice_key=key] [slice_conn=number]
//!           [slice_dyn=$variable] [slice_poolsize=number] [slice_keylen=length];
//! ```
//!
//! The result still holds the raw `slice_key` text and `slice_dyn` variable
//! name: compiling them needs nginx and happens in the directive handler.

use std::fmt;

pub const DEFAULT_POOLSIZE: usize = 20;
pub const DEFAULT_KEYLEN: usize = 40;

/// The parsed `keepalive` directive.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct KeepaliveArgs<'a> {
    pub connections: usize,
    pub local: bool,
    pub slice: Option<SliceArgs<'a>>,
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
    ZeroKeylen,
    EmptyKey,
    NotAVariable(&'a [u8]),
    KeyWithoutLimit,
    SliceWithoutKey(&'static str),
}

impl fmt::Display for ArgError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        match self {
            ArgError::InvalidCount(v) => {
                write!(f, "invalid value \"{}\" in \"keepalive\" directive", s(v))
            }
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
        }
    }
}

/// Parses a non-negative decimal number as nginx's `ngx_atoi` does.
pub fn parse_number(value: &[u8]) -> Option<usize> {
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    value.iter().try_fold(0usize, |n, &d| {
        n.checked_mul(10)?.checked_add(usize::from(d - b'0'))
    })
}

/// Parses the directive's arguments (without the directive name).
pub fn parse_keepalive<'a>(args: &[&'a [u8]]) -> Result<KeepaliveArgs<'a>, ArgError<'a>> {
    let (&count, params) = args.split_first().ok_or(ArgError::InvalidCount(b""))?;
    let connections = parse_number(count).ok_or(ArgError::InvalidCount(count))?;

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

        let number =
            |name: &'static str| parse_number(value).ok_or(ArgError::InvalidNumber { name, value });

        let seen = match name {
            b"slice_key" => {
                if value.is_empty() {
                    return Err(ArgError::EmptyKey);
                }
                key.replace(value).is_some()
            }
            b"slice_conn" => conn.replace(number("slice_conn")?).is_some(),
            b"slice_dyn" => {
                let var = value
                    .strip_prefix(b"$")
                    .filter(|v| !v.is_empty())
                    .ok_or(ArgError::NotAVariable(value))?;
                dyn_var.replace(var).is_some()
            }
            b"slice_poolsize" => poolsize.replace(number("slice_poolsize")?).is_some(),
            b"slice_keylen" => {
                let n = number("slice_keylen")?;
                if n == 0 {
                    return Err(ArgError::ZeroKeylen);
                }
                keylen.replace(n).is_some()
            }
            _ => return Err(ArgError::InvalidParameter(param)),
        };
        if seen {
            return Err(ArgError::DuplicateParameter(name));
        }
    }

    let slice = match key {
        Some(key) => {
            if conn.is_none() && dyn_var.is_none() {
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
        assert!(parse("99999999999999999999999").is_err());
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
}
