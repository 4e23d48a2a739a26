//! Write a sitewatch rule in Rust: one function from [`Response`] to [`Verdict`], exported
//! with [`rule!`]. The crate implements ABI v1 (see `rules/README.md`): it exports `alloc` (a
//! bump allocator; every evaluation runs in a fresh instance, so nothing is ever freed) and
//! `evaluate`, reads the record the host wrote, and writes the reason into the output window.
//!
//! ```text
//! #![no_std]
//! use sitewatch_rule::{rule, Response, Verdict};
//!
//! fn check(r: &Response) -> Verdict {
//!     if r.body_contains("Example Domain") { Verdict::Up } else { Verdict::down("keyword missing") }
//! }
//! rule!(check);
//! ```
//!
//! `no_std` and no allocator, so a rule stays a few KB. Reasons are built in a fixed buffer
//! ([`Reason`]) without `core::fmt`, which alone would add several KB.
#![cfg_attr(not(test), no_std)]

use core::sync::atomic::{AtomicUsize, Ordering};

/// The ABI version this SDK speaks.
pub const ABI_VERSION: u32 = 1;

/// Record header offsets (little-endian u32 each), as in `rules/README.md`. The host keeps the
/// same table in `agent/src/rules/wasm.rs`; the two sides are separate builds on purpose.
mod offset {
    pub const ABI: usize = 0;
    pub const STATUS: usize = 4;
    pub const ELAPSED_MS: usize = 8;
    pub const FLAGS: usize = 12;
    pub const URL: usize = 16;
    pub const HEADERS: usize = 24;
    pub const BODY: usize = 32;
    pub const ERROR: usize = 40;
    pub const OUT: usize = 48;
    pub const OUT_LEN: usize = 56;
}

const FLAG_BODY_TRUNCATED: u32 = 1;
const FLAG_TLS: u32 = 2;
const FLAG_TRANSPORT_ERROR: u32 = 4;

/// The response a rule judges: a view of the record the host wrote.
pub struct Response<'a> {
    status: u16,
    elapsed_ms: u32,
    flags: u32,
    url: &'a [u8],
    headers: &'a [u8],
    body: &'a [u8],
    error: &'a [u8],
}

impl<'a> Response<'a> {
    /// HTTP status; 0 when the request failed before a response (see [`Response::error`]).
    pub fn status(&self) -> u16 {
        self.status
    }

    /// Time from the start of the check to the end of the body, in ms.
    pub fn elapsed_ms(&self) -> u32 {
        self.elapsed_ms
    }

    /// The body was cut at the agent's body cap.
    pub fn body_truncated(&self) -> bool {
        self.flags & FLAG_BODY_TRUNCATED != 0
    }

    /// The request went over TLS.
    pub fn tls(&self) -> bool {
        self.flags & FLAG_TLS != 0
    }

    /// The request failed (DNS, connect, TLS, timeout…): there is no response to judge.
    pub fn failed(&self) -> bool {
        self.flags & FLAG_TRANSPORT_ERROR != 0
    }

    /// The transport error text when the request failed.
    pub fn error(&self) -> Option<&'a str> {
        if self.failed() {
            core::str::from_utf8(self.error).ok()
        } else {
            None
        }
    }

    /// The URL that was checked.
    pub fn url(&self) -> &'a str {
        core::str::from_utf8(self.url).unwrap_or("")
    }

    /// The body bytes (possibly truncated).
    pub fn body(&self) -> &'a [u8] {
        self.body
    }

    /// The body as text, when it is valid UTF-8.
    pub fn body_text(&self) -> Option<&'a str> {
        core::str::from_utf8(self.body).ok()
    }

    /// Whether the body contains `needle` (bytes or text).
    pub fn body_contains(&self, needle: impl AsRef<[u8]>) -> bool {
        find(self.body, needle.as_ref()).is_some()
    }

    /// The first header named `name` (case-insensitive), value trimmed.
    pub fn header(&self, name: &str) -> Option<&'a str> {
        self.headers()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// Every header as `(name, value)`, names lower-cased, in the order received.
    pub fn headers(&self) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        let text = core::str::from_utf8(self.headers).unwrap_or("");
        text.split('\n').filter_map(|line| {
            let (name, value) = line.split_once(':')?;
            Some((name.trim(), value.trim()))
        })
    }

    /// The raw text of the string value of `key` in the body's top-level JSON object
    /// (escapes are not decoded). `None` when the body is not an object, the key is
    /// missing, or its value is not a string. A scanner, not a parser: a few hundred bytes of
    /// code instead of a JSON library.
    pub fn json_str(&self, key: &str) -> Option<&'a str> {
        json_top_level_str(self.body, key.as_bytes()).and_then(|v| core::str::from_utf8(v).ok())
    }
}

/// Finds `needle` in `hay` (naive search: bodies are capped and rules are short-lived).
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Scans a JSON object for a top-level `"key": "value"` and returns the raw value bytes.
fn json_top_level_str<'a>(json: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let mut i = skip_ws(json, 0);
    if json.get(i) != Some(&b'{') {
        return None;
    }
    let mut depth = 0usize;
    // The last string seen at depth 1 in key position, waiting for its ':'.
    let mut expect_key = false;
    while i < json.len() {
        match json[i] {
            b'{' | b'[' => {
                depth += 1;
                expect_key = depth == 1 && json[i] == b'{';
                i += 1;
            }
            b'}' | b']' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return None;
                }
                i += 1;
            }
            b',' => {
                expect_key = depth == 1;
                i += 1;
            }
            b'"' => {
                let (s, next) = json_string(json, i)?;
                i = next;
                if depth == 1 && expect_key {
                    expect_key = false;
                    let colon = skip_ws(json, i);
                    if json.get(colon) != Some(&b':') {
                        return None;
                    }
                    i = skip_ws(json, colon + 1);
                    if s == key {
                        return if json.get(i) == Some(&b'"') {
                            json_string(json, i).map(|(v, _)| v)
                        } else {
                            None
                        };
                    }
                }
            }
            _ => i += 1,
        }
    }
    None
}

/// The raw content of the JSON string starting at `json[start] == '"'`, and the index after it.
fn json_string(json: &[u8], start: usize) -> Option<(&[u8], usize)> {
    let mut i = start + 1;
    while i < json.len() {
        match json[i] {
            b'\\' => i += 2,
            b'"' => return Some((&json[start + 1..i], i + 1)),
            _ => i += 1,
        }
    }
    None
}

fn skip_ws(json: &[u8], mut i: usize) -> usize {
    while i < json.len() && matches!(json[i], b' ' | b'\t' | b'\n' | b'\r') {
        i += 1;
    }
    i
}

/// A reason of at most [`Reason::CAPACITY`] bytes, built without an allocator. Longer text is
/// cut at a character boundary. A reason that is a JSON object (`{"reason": …, "k": v}`)
/// stores its other fields with the check.
#[derive(Clone)]
pub struct Reason {
    buf: [u8; Reason::CAPACITY],
    len: usize,
}

impl Reason {
    pub const CAPACITY: usize = 512;

    pub const fn new() -> Reason {
        Reason {
            buf: [0; Reason::CAPACITY],
            len: 0,
        }
    }

    /// Appends text (cut at a character boundary when full).
    pub fn push(mut self, s: &str) -> Reason {
        self.append(s);
        self
    }

    fn append(&mut self, s: &str) {
        let room = Reason::CAPACITY - self.len;
        let mut n = s.len().min(room);
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
    }

    /// Appends a number in decimal.
    pub fn push_u32(self, mut n: u32) -> Reason {
        let mut digits = [0u8; 10];
        let mut at = digits.len();
        loop {
            at -= 1;
            digits[at] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        // Only ASCII digits were written.
        self.push(core::str::from_utf8(&digits[at..]).unwrap_or(""))
    }

    pub fn as_str(&self) -> &str {
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

impl Default for Reason {
    fn default() -> Reason {
        Reason::new()
    }
}

/// `write!(reason, ..)`; costs the module `core::fmt` (several KB), which `push` avoids.
impl core::fmt::Write for Reason {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        self.append(s);
        Ok(())
    }
}

impl From<&str> for Reason {
    fn from(s: &str) -> Reason {
        Reason::new().push(s)
    }
}

/// What a rule says about one response.
pub enum Verdict {
    Up,
    /// Up, with a note recorded as the reason.
    UpWith(Reason),
    Down(Reason),
    /// No opinion: the agent's status / regex checks decide.
    Unknown,
}

impl Verdict {
    /// `Verdict::Down` with a plain-text reason.
    pub fn down(reason: &str) -> Verdict {
        Verdict::Down(Reason::from(reason))
    }
}

const PAGE: usize = 65536;
/// The bump pointer; 0 until the first `alloc` of this instance.
static HEAP_TOP: AtomicUsize = AtomicUsize::new(0);

/// ABI v1 `alloc`: `len` bytes, 8-aligned, after everything the module itself uses (the heap
/// starts at the initial end of memory), growing memory as needed; 0 when refused.
#[doc(hidden)]
pub fn __alloc(len: i32) -> i32 {
    let Ok(len) = usize::try_from(len) else {
        return 0;
    };
    let have = memory_bytes();
    let top = match HEAP_TOP.load(Ordering::Relaxed) {
        0 => have,
        top => top,
    };
    let ptr = (top + 7) & !7;
    let Some(end) = ptr.checked_add(len) else {
        return 0;
    };
    if end > have && !grow_memory((end - have).div_ceil(PAGE)) {
        return 0;
    }
    HEAP_TOP.store(end, Ordering::Relaxed);
    ptr as i32
}

#[cfg(target_arch = "wasm32")]
fn memory_bytes() -> usize {
    core::arch::wasm32::memory_size(0) * PAGE
}

#[cfg(target_arch = "wasm32")]
fn grow_memory(pages: usize) -> bool {
    core::arch::wasm32::memory_grow(0, pages) != usize::MAX
}

// Off wasm32 (e.g. `cargo check` on the host) there is no linear memory to manage.
#[cfg(not(target_arch = "wasm32"))]
fn memory_bytes() -> usize {
    0
}

#[cfg(not(target_arch = "wasm32"))]
fn grow_memory(_pages: usize) -> bool {
    false
}

/// ABI v1 `evaluate`: reads the record at `rec`, runs `rule`, writes the reason.
///
/// # Safety
/// `rec` must point at an ABI v1 record written by the host (the [`rule!`] macro's export is
/// only ever called that way).
#[doc(hidden)]
pub unsafe fn __evaluate(rec: i32, _len: i32, rule: fn(&Response) -> Verdict) -> i32 {
    let base = rec as u32 as usize as *mut u8;
    // SAFETY: the host wrote a 64-byte header at `rec` and every (offset, length) pair in it
    // points inside this module's memory (host side of ABI v1).
    unsafe {
        let u32_at = |at: usize| u32::from_le_bytes(*(base.add(at) as *const [u8; 4]));
        let bytes = |at: usize| {
            core::slice::from_raw_parts(u32_at(at) as usize as *const u8, u32_at(at + 4) as usize)
        };
        if u32_at(offset::ABI) != ABI_VERSION {
            return 3; // not a verdict: the host reports a rule error
        }
        let response = Response {
            status: u32_at(offset::STATUS) as u16,
            elapsed_ms: u32_at(offset::ELAPSED_MS),
            flags: u32_at(offset::FLAGS),
            url: bytes(offset::URL),
            headers: bytes(offset::HEADERS),
            body: bytes(offset::BODY),
            error: bytes(offset::ERROR),
        };
        let (code, reason) = match rule(&response) {
            Verdict::Up => (1, None),
            Verdict::UpWith(r) => (1, Some(r)),
            Verdict::Down(r) => (0, Some(r)),
            Verdict::Unknown => (2, None),
        };
        let mut out_len = 0;
        if let Some(reason) = reason {
            let out = u32_at(offset::OUT) as usize as *mut u8;
            let cap = u32_at(offset::OUT + 4) as usize;
            let text = reason.as_str().as_bytes();
            out_len = text.len().min(cap);
            core::ptr::copy_nonoverlapping(text.as_ptr(), out, out_len);
        }
        *(base.add(offset::OUT_LEN) as *mut [u8; 4]) = (out_len as u32).to_le_bytes();
        code
    }
}

/// Exports `alloc` and `evaluate` for a rule function `fn(&Response) -> Verdict`.
#[macro_export]
macro_rules! rule {
    ($check:path) => {
        #[unsafe(no_mangle)]
        pub extern "C" fn alloc(len: i32) -> i32 {
            $crate::__alloc(len)
        }

        #[unsafe(no_mangle)]
        pub extern "C" fn evaluate(rec: i32, len: i32) -> i32 {
            // SAFETY: only the host calls this export, with a record it wrote (ABI v1).
            unsafe { $crate::__evaluate(rec, len, $check) }
        }
    };
}

/// A panic in a rule ends the evaluation with `unreachable`: the host records a rule error.
#[cfg(all(target_arch = "wasm32", not(test)))]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    core::arch::wasm32::unreachable()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_scanner() {
        let check = |json: &str, key: &str, want: Option<&str>| {
            let got = json_top_level_str(json.as_bytes(), key.as_bytes())
                .map(|v| core::str::from_utf8(v).unwrap());
            assert_eq!(got, want, "{json} / {key}");
        };
        check(r#"{"status":"ok"}"#, "status", Some("ok"));
        check(
            r#" { "a" : 1, "status" : "degraded" } "#,
            "status",
            Some("degraded"),
        );
        check(
            r#"{"db":{"status":"down"},"status":"ok"}"#,
            "status",
            Some("ok"),
        );
        check(r#"{"db":{"status":"down"}}"#, "status", None);
        check(
            r#"{"list":["status","x"],"status":"ok"}"#,
            "status",
            Some("ok"),
        );
        check(r#"{"status":1}"#, "status", None);
        check(
            r#"{"s\"tatus":"no","status":"o\"k"}"#,
            "status",
            Some("o\\\"k"),
        );
        check(r#"["status","ok"]"#, "status", None);
        check(r#"{"status":"ok"#, "status", None);
        check("", "status", None);
    }

    #[test]
    fn reasons() {
        assert_eq!(Reason::from("took ").push_u32(0).as_str(), "took 0");
        assert_eq!(Reason::new().push_u32(4294967295).as_str(), "4294967295");
        let long = Reason::new().push(&"é".repeat(400));
        assert_eq!(long.as_str().len(), 512);
        let mut r = Reason::from("n=");
        core::fmt::Write::write_fmt(&mut r, format_args!("{}", 42)).unwrap();
        assert_eq!(r.as_str(), "n=42");
    }
}
