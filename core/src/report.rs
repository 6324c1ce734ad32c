//! What `keepalive_status` and the `$upstream_keepalive_*` variables print,
//! in plain Rust: the status page in JSON and in the Prometheus text
//! exposition format, and the per-try values of the variables joined as
//! nginx joins `$upstream_addr`.

use core::fmt::Write;

use crate::stats::{Closed, Counter, NotKept, Snapshot};

/// One upstream's line of the report.
pub struct UpstreamReport<'a> {
    /// The upstream's name: operator text, any bytes.
    pub name: &'a [u8],
    pub snapshot: Snapshot,
    /// `keepalive auto`: its estimate and ceiling are shown.
    pub auto: bool,
}

/// Versions named in the report.
pub struct Versions<'a> {
    pub module: &'a str,
    pub nginx: &'a str,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Gauge,
    Counter,
}

#[derive(Clone, Copy)]
enum Series {
    Idle,
    Buckets,
    AutoEstimate,
    AutoLimit,
    One(Counter),
    NotKept,
    Closed,
}

/// A metric: its JSON key and Prometheus name, and where its values are.
struct Family {
    json: &'static str,
    prometheus: &'static str,
    kind: Kind,
    help: &'static str,
    series: Series,
}

/// Every number of the report, in the order shown. A new counter in
/// `stats` shows up here, or in `NotKept::ALL`/`Closed::ALL` for a reason.
const FAMILIES: [Family; 12] = [
    Family {
        json: "idle",
        prometheus: "nginx_upstream_keepalive_idle",
        kind: Kind::Gauge,
        help: "Idle upstream connections in the keepalive cache, all workers.",
        series: Series::Idle,
    },
    Family {
        json: "buckets",
        prometheus: "nginx_upstream_keepalive_buckets",
        kind: Kind::Gauge,
        help: "Buckets (server address and slice key) holding idle connections, all workers.",
        series: Series::Buckets,
    },
    Family {
        json: "auto_estimate",
        prometheus: "nginx_upstream_keepalive_auto_estimate",
        kind: Kind::Gauge,
        help: "keepalive auto: idle connections the recent load needs, by the workers' estimates, summed.",
        series: Series::AutoEstimate,
    },
    Family {
        json: "auto_limit",
        prometheus: "nginx_upstream_keepalive_auto_limit",
        kind: Kind::Gauge,
        help: "keepalive auto: the ceiling (max=) of idle connections, summed over the workers.",
        series: Series::AutoLimit,
    },
    Family {
        json: "reused",
        prometheus: "nginx_upstream_keepalive_reused_total",
        kind: Kind::Counter,
        help: "Upstream tries that took a cached connection.",
        series: Series::One(Counter::Reused),
    },
    Family {
        json: "missed",
        prometheus: "nginx_upstream_keepalive_missed_total",
        kind: Kind::Counter,
        help: "Upstream tries that found no cached connection.",
        series: Series::One(Counter::Missed),
    },
    Family {
        json: "kept",
        prometheus: "nginx_upstream_keepalive_kept_total",
        kind: Kind::Counter,
        help: "Connections stored in the cache after a request.",
        series: Series::One(Counter::Kept),
    },
    Family {
        json: "not_kept",
        prometheus: "nginx_upstream_keepalive_not_kept_total",
        kind: Kind::Counter,
        help: "Connections not stored in the cache after a request, by reason.",
        series: Series::NotKept,
    },
    Family {
        json: "evicted",
        prometheus: "nginx_upstream_keepalive_evicted_total",
        kind: Kind::Counter,
        help: "Idle connections closed to make room for another (least recently used).",
        series: Series::One(Counter::Evicted),
    },
    Family {
        json: "closed",
        prometheus: "nginx_upstream_keepalive_closed_total",
        kind: Kind::Counter,
        help: "Idle connections closed while in the cache, by reason.",
        series: Series::Closed,
    },
    Family {
        json: "shared_taken",
        prometheus: "nginx_upstream_keepalive_shared_taken_total",
        kind: Kind::Counter,
        help: "Upstream tries that took an idle connection from another worker (also in reused).",
        series: Series::One(Counter::SharedTaken),
    },
    Family {
        json: "share_failed",
        prometheus: "nginx_upstream_keepalive_share_failed_total",
        kind: Kind::Counter,
        help: "Another worker's idle connections claimed but not had (worker gone, socket changed, refused).",
        series: Series::One(Counter::ShareFailed),
    },
];

impl Family {
    /// Whether the family has a value for `upstream`: `keepalive auto`'s
    /// gauges only for an auto upstream.
    fn applies(&self, upstream: &UpstreamReport) -> bool {
        upstream.auto || !matches!(self.series, Series::AutoEstimate | Series::AutoLimit)
    }

    /// The family's values for one upstream: (reason, value).
    fn values(&self, s: &Snapshot) -> Vec<(Option<&'static str>, u64)> {
        match self.series {
            Series::Idle => vec![(None, s.idle())],
            Series::Buckets => vec![(None, s.buckets())],
            Series::AutoEstimate => vec![(None, s.auto_estimate())],
            Series::AutoLimit => vec![(None, s.auto_limit())],
            Series::One(counter) => vec![(None, s.get(counter))],
            Series::NotKept => NotKept::ALL
                .iter()
                .map(|&r| (Some(r.label()), s.get(Counter::NotKept(r))))
                .collect(),
            Series::Closed => Closed::ALL
                .iter()
                .map(|&r| (Some(r.label()), s.get(Counter::Closed(r))))
                .collect(),
        }
    }
}

/// The status page as JSON: versions, then one object per upstream.
pub fn json(versions: &Versions, upstreams: &[UpstreamReport]) -> String {
    let mut out = String::with_capacity(256 + upstreams.len() * 640);
    out.push_str("{\"module_version\":");
    json_string(&mut out, versions.module.as_bytes());
    out.push_str(",\"nginx_version\":");
    json_string(&mut out, versions.nginx.as_bytes());
    out.push_str(",\"upstreams\":{");
    for (i, upstream) in upstreams.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('\n');
        json_string(&mut out, upstream.name);
        out.push_str(":{");
        let families = FAMILIES.iter().filter(|f| f.applies(upstream));
        for (j, family) in families.enumerate() {
            if j > 0 {
                out.push(',');
            }
            let _ = write!(out, "\"{}\":", family.json);
            match family.values(&upstream.snapshot).as_slice() {
                [(None, value)] => {
                    let _ = write!(out, "{value}");
                }
                reasons => {
                    out.push('{');
                    for (k, (reason, value)) in reasons.iter().enumerate() {
                        if k > 0 {
                            out.push(',');
                        }
                        let _ = write!(out, "\"{}\":{value}", reason.unwrap_or(""));
                    }
                    out.push('}');
                }
            }
        }
        out.push('}');
    }
    out.push_str("\n}}\n");
    out
}

/// The status page in the Prometheus text exposition format (0.0.4).
pub fn prometheus(versions: &Versions, upstreams: &[UpstreamReport]) -> String {
    let mut out = String::with_capacity(2048 + upstreams.len() * 1600);
    out.push_str(
        "# HELP nginx_upstream_keepalive_module_info The keepalive slice module and the nginx it runs in.\n\
         # TYPE nginx_upstream_keepalive_module_info gauge\n\
         nginx_upstream_keepalive_module_info{module_version=\"",
    );
    label_value(&mut out, versions.module.as_bytes());
    out.push_str("\",nginx_version=\"");
    label_value(&mut out, versions.nginx.as_bytes());
    out.push_str("\"} 1\n");

    for family in &FAMILIES {
        let kind = match family.kind {
            Kind::Gauge => "gauge",
            Kind::Counter => "counter",
        };
        let _ = writeln!(out, "# HELP {} {}", family.prometheus, family.help);
        let _ = writeln!(out, "# TYPE {} {kind}", family.prometheus);
        for upstream in upstreams.iter().filter(|u| family.applies(u)) {
            for (reason, value) in family.values(&upstream.snapshot) {
                out.push_str(family.prometheus);
                out.push_str("{upstream=\"");
                label_value(&mut out, upstream.name);
                if let Some(reason) = reason {
                    let _ = write!(out, "\",reason=\"{reason}");
                }
                let _ = writeln!(out, "\"}} {value}");
            }
        }
    }
    out
}

/// `bytes` as a JSON string: quotes, backslashes and control characters
/// escaped, bytes that are not UTF-8 replaced by U+FFFD.
fn json_string(out: &mut String, bytes: &[u8]) {
    out.push('"');
    for c in String::from_utf8_lossy(bytes).chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `bytes` as the inside of a Prometheus label value: backslash, double
/// quote and line feed escaped, as the text format requires; bytes that
/// are not UTF-8 replaced by U+FFFD (the format is UTF-8).
fn label_value(out: &mut String, bytes: &[u8]) {
    for c in String::from_utf8_lossy(bytes).chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// What the cache did for one upstream try, as the variables show it.
#[derive(Clone, Copy, Debug)]
pub struct TryRecord<K> {
    /// Its position in nginx's `r->upstream_states`.
    pub state: usize,
    /// The connection came from the cache.
    pub reused: bool,
    /// ... from another worker's idle connections.
    pub shared: bool,
    /// Requests the connection has carried, this one included.
    pub requests: u64,
    /// The bucket key as the cache saw it.
    pub key: K,
}

/// Which variable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TryField {
    Reused,
    Requests,
    Key,
}

/// Where joined values go: a length count first, then the buffer sized by
/// it (nginx allocates variable values from the request pool).
pub trait Sink {
    fn put(&mut self, bytes: &[u8]);
}

/// Counts bytes.
#[derive(Default)]
pub struct Length(pub usize);

impl Sink for Length {
    #[inline]
    fn put(&mut self, bytes: &[u8]) {
        self.0 += bytes.len();
    }
}

/// Writes into a buffer, never past its end.
pub struct Writer<'a> {
    buf: &'a mut [u8],
    pub len: usize,
}

impl<'a> Writer<'a> {
    pub fn new(buf: &'a mut [u8]) -> Self {
        Writer { buf, len: 0 }
    }
}

impl Sink for Writer<'_> {
    #[inline]
    fn put(&mut self, bytes: &[u8]) {
        let end = (self.len + bytes.len()).min(self.buf.len());
        let n = end - self.len;
        self.buf[self.len..end].copy_from_slice(&bytes[..n]);
        self.len = end;
    }
}

/// One value per entry of nginx's upstream states, as nginx joins
/// `$upstream_status`: ", " between the tries of one upstream, " : "
/// where an internal redirect went to another upstream (an entry without
/// a peer is such a separator and has no value of its own). A try the
/// module has no record of (another upstream's, or one that got no
/// server) shows "-".
///
/// `has_peer(i)` says whether entry `i` of `states` entries has a peer;
/// `tries` are in order of their `state`.
pub fn join_tries<K: AsRef<[u8]>>(
    field: TryField,
    states: usize,
    has_peer: impl Fn(usize) -> bool,
    tries: &[TryRecord<K>],
    out: &mut impl Sink,
) {
    let mut tries = tries.iter().peekable();
    let mut value = |i: usize, out: &mut dyn FnMut(&[u8])| {
        while tries.next_if(|t| t.state < i).is_some() {}
        match tries.next_if(|t| t.state == i) {
            None => out(b"-"),
            Some(t) => match field {
                TryField::Reused => out(match (t.reused, t.shared) {
                    (true, true) => b"w",
                    (true, false) => b"r",
                    _ => b".",
                }),
                TryField::Requests => {
                    let mut digits = [0u8; 20];
                    out(decimal(t.requests, &mut digits));
                }
                TryField::Key => out(t.key.as_ref()),
            },
        }
    };
    if states == 0 {
        return;
    }
    let mut i = 0;
    loop {
        value(i, &mut |b| out.put(b));
        i += 1;
        if i == states {
            break;
        }
        if has_peer(i) {
            out.put(b", ");
        } else {
            out.put(b" : ");
            i += 1;
            if i == states {
                break;
            }
        }
    }
}

/// `n` in decimal, written at the end of `buf`: two digits at a time.
#[inline]
pub fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    const PAIRS: &[u8; 200] = b"0001020304050607080910111213141516171819\
        2021222324252627282930313233343536373839\
        4041424344454647484950515253545556575859\
        6061626364656667686970717273747576777879\
        8081828384858687888990919293949596979899";
    let mut at = buf.len();
    while n >= 100 {
        let pair = (n % 100) as usize * 2;
        n /= 100;
        at -= 2;
        buf[at..at + 2].copy_from_slice(&PAIRS[pair..pair + 2]);
    }
    if n >= 10 {
        let pair = n as usize * 2;
        at -= 2;
        buf[at..at + 2].copy_from_slice(&PAIRS[pair..pair + 2]);
    } else {
        at -= 1;
        buf[at] = b'0' + n as u8;
    }
    &buf[at..]
}

#[cfg(test)]
mod tests {
    use super::*;

    const VERSIONS: Versions = Versions {
        module: "0.1.0",
        nginx: "1.28.3",
    };

    fn sample() -> Snapshot {
        Snapshot::zero()
            .with(Counter::Reused, 7)
            .with(Counter::Missed, 3)
            .with(Counter::Kept, 9)
            .with(Counter::Evicted, 1)
            .with(Counter::NotKept(NotKept::BucketFull), 1)
            .with(Counter::Closed(Closed::Timeout), 1)
            .with_buckets(2)
    }

    #[test]
    fn json_carries_every_number() {
        let up = [
            UpstreamReport {
                name: b"backend",
                snapshot: sample(),
                auto: false,
            },
            UpstreamReport {
                name: b"auto",
                snapshot: sample().with_auto(5, 2048),
                auto: true,
            },
        ];
        let out = json(&VERSIONS, &up);
        assert!(out.starts_with(
            "{\"module_version\":\"0.1.0\",\"nginx_version\":\"1.28.3\",\"upstreams\":{"
        ));
        for part in [
            "\"backend\":{\"idle\":0,\"buckets\":2,\"reused\":7,\"missed\":3,\"kept\":9,",
            "\"not_kept\":{\"bucket_full\":1,\"no_free_bucket\":0,",
            "\"error\":0,\"keepalive_hint\":0},\"evicted\":1,\"closed\":{\"timeout\":1,",
            "\"error\":0,\"hint_timeout\":0,\"decay\":0},\"shared_taken\":0,\"share_failed\":0}",
            "\"auto\":{\"idle\":0,\"buckets\":2,\"auto_estimate\":5,\"auto_limit\":2048,\"reused\":7,",
        ] {
            assert!(out.contains(part), "{part} in {out}");
        }
        assert_eq!(out.matches('{').count(), out.matches('}').count());
        assert_eq!(
            out.matches("auto_estimate").count(),
            1,
            "auto upstreams only"
        );
        let empty = json(&VERSIONS, &[]);
        assert!(empty.ends_with("\"upstreams\":{\n}}\n"), "{empty}");
    }

    #[test]
    fn idle_is_what_was_kept_and_has_not_left() {
        // 9 kept; 7 taken, 1 evicted, 1 timed out: none idle.
        assert_eq!(sample().idle(), 0);
        assert_eq!(sample().with(Counter::Kept, 12).idle(), 3);
    }

    #[test]
    fn prometheus_names_and_labels() {
        let up = [
            UpstreamReport {
                name: b"a",
                snapshot: sample(),
                auto: false,
            },
            UpstreamReport {
                name: b"b",
                snapshot: Snapshot::zero().with_auto(3, 64),
                auto: true,
            },
        ];
        let out = prometheus(&VERSIONS, &up);
        for line in [
            "nginx_upstream_keepalive_module_info{module_version=\"0.1.0\",nginx_version=\"1.28.3\"} 1",
            "# TYPE nginx_upstream_keepalive_idle gauge",
            "# TYPE nginx_upstream_keepalive_buckets gauge",
            "# TYPE nginx_upstream_keepalive_reused_total counter",
            "nginx_upstream_keepalive_buckets{upstream=\"a\"} 2",
            "nginx_upstream_keepalive_reused_total{upstream=\"a\"} 7",
            "nginx_upstream_keepalive_missed_total{upstream=\"b\"} 0",
            "nginx_upstream_keepalive_kept_total{upstream=\"a\"} 9",
            "nginx_upstream_keepalive_not_kept_total{upstream=\"a\",reason=\"bucket_full\"} 1",
            "nginx_upstream_keepalive_not_kept_total{upstream=\"a\",reason=\"keepalive_requests\"} 0",
            "nginx_upstream_keepalive_evicted_total{upstream=\"a\"} 1",
            "nginx_upstream_keepalive_closed_total{upstream=\"a\",reason=\"timeout\"} 1",
            "nginx_upstream_keepalive_closed_total{upstream=\"b\",reason=\"closed_by_server\"} 0",
            "nginx_upstream_keepalive_not_kept_total{upstream=\"a\",reason=\"keepalive_hint\"} 0",
            "nginx_upstream_keepalive_closed_total{upstream=\"b\",reason=\"hint_timeout\"} 0",
            "nginx_upstream_keepalive_closed_total{upstream=\"b\",reason=\"decay\"} 0",
            "# TYPE nginx_upstream_keepalive_auto_estimate gauge",
            "nginx_upstream_keepalive_auto_estimate{upstream=\"b\"} 3",
            "nginx_upstream_keepalive_auto_limit{upstream=\"b\"} 64",
        ] {
            assert!(out.lines().any(|l| l == line), "{line} in\n{out}");
        }
        assert!(!out.contains("auto_estimate{upstream=\"a\"}"), "{out}");
        // each family declared once, before its samples
        assert_eq!(out.matches("# TYPE ").count(), FAMILIES.len() + 1);
        assert!(out.ends_with('\n'));
    }

    #[test]
    fn operator_text_is_escaped() {
        let name = b"we\"ird\\up\nstream\x01\xff";
        let up = [UpstreamReport {
            name,
            snapshot: Snapshot::zero(),
            auto: false,
        }];
        let prom = prometheus(&VERSIONS, &up);
        assert!(
            prom.contains("{upstream=\"we\\\"ird\\\\up\\nstream\u{1}\u{fffd}\"}"),
            "{prom}"
        );
        // no raw line feed inside a sample line
        assert!(prom
            .lines()
            .all(|l| l.starts_with('#') || l.starts_with("nginx_")));
        let js = json(&VERSIONS, &up);
        assert!(
            js.contains("\"we\\\"ird\\\\up\\nstream\\u0001\u{fffd}\":{"),
            "{js}"
        );
    }

    fn joined(field: TryField, peers: &[bool], tries: &[TryRecord<&'static [u8]>]) -> String {
        let mut length = Length::default();
        join_tries(field, peers.len(), |i| peers[i], tries, &mut length);
        let mut buf = vec![0u8; length.0];
        let mut w = Writer::new(&mut buf);
        join_tries(field, peers.len(), |i| peers[i], tries, &mut w);
        assert_eq!(w.len, length.0);
        String::from_utf8(buf).unwrap()
    }

    fn try_at(
        state: usize,
        reused: bool,
        requests: u64,
        key: &'static [u8],
    ) -> TryRecord<&'static [u8]> {
        TryRecord {
            state,
            reused,
            shared: false,
            requests,
            key,
        }
    }

    #[test]
    fn a_connection_from_another_worker_shows_w() {
        let mut tries = [try_at(0, true, 2, b""), try_at(1, true, 3, b"")];
        tries[1].shared = true;
        assert_eq!(joined(TryField::Reused, &[true, true], &tries), "r, w");
    }

    #[test]
    fn one_value_per_try_as_upstream_addr() {
        let tries = [try_at(0, true, 12, b"a.example")];
        assert_eq!(joined(TryField::Reused, &[true], &tries), "r");
        assert_eq!(joined(TryField::Requests, &[true], &tries), "12");
        assert_eq!(joined(TryField::Key, &[true], &tries), "a.example");

        // two tries of one upstream: ", "
        let tries = [try_at(0, false, 1, b"k"), try_at(1, true, 40, b"k")];
        assert_eq!(joined(TryField::Reused, &[true, true], &tries), "., r");
        assert_eq!(joined(TryField::Requests, &[true, true], &tries), "1, 40");

        // an internal redirect to an upstream that is not ours: " : ",
        // the separator entry has no value, the other upstream's try "-"
        let peers = [true, false, true];
        let tries = [try_at(0, true, 2, b"a")];
        assert_eq!(joined(TryField::Reused, &peers, &tries), "r : -");
        assert_eq!(joined(TryField::Key, &peers, &tries), "a : -");

        // and back to ours after the redirect
        let tries = [try_at(2, false, 1, b"b")];
        assert_eq!(joined(TryField::Key, &peers, &tries), "- : b");
        assert_eq!(joined(TryField::Requests, &peers, &tries), "- : 1");

        // an empty key (not sliced) is empty
        let tries = [try_at(0, true, 3, b""), try_at(1, true, 4, b"")];
        assert_eq!(joined(TryField::Key, &[true, true], &tries), ", ");

        // nothing recorded at all; and a trailing separator
        assert_eq!(joined(TryField::Reused, &[true, true], &[]), "-, -");
        assert_eq!(joined(TryField::Reused, &[true, false], &[]), "- : ");
        assert_eq!(joined(TryField::Reused, &[], &[]), "");
    }

    #[test]
    fn decimals() {
        for n in [
            0,
            1,
            9,
            10,
            11,
            99,
            100,
            101,
            999,
            1000,
            12345,
            100000,
            u64::MAX,
        ] {
            assert_eq!(decimal(n, &mut [0; 20]), n.to_string().as_bytes(), "{n}");
        }
    }

    #[test]
    fn large_request_counts() {
        let tries = [try_at(0, true, u64::MAX, b"")];
        assert_eq!(
            joined(TryField::Requests, &[true], &tries),
            u64::MAX.to_string()
        );
        let tries = [try_at(0, true, 0, b"")];
        assert_eq!(joined(TryField::Requests, &[true], &tries), "0");
    }

    #[test]
    fn a_short_buffer_is_never_overrun() {
        let tries = [try_at(0, true, 1, b"long key")];
        let mut buf = [0u8; 3];
        let mut w = Writer::new(&mut buf);
        join_tries(TryField::Key, 1, |_| true, &tries, &mut w);
        let len = w.len;
        assert_eq!((&buf, len), (b"lon", 3));
    }
}
