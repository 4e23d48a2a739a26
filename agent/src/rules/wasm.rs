//! The WASM rule engine (wasmtime): compile each module once, a fresh store per evaluation,
//! an epoch deadline, a memory cap, a stack cap, optional fuel, and no imports. It owns the
//! table of loaded rules and swaps entries atomically on reload. See `rules/README.md` for the
//! ABI v1 this host speaks; the constants below are that ABI.
//!
//! What it is not for: deciding what a verdict means for the check (that is `probe`), or
//! reading the config (the caller passes a [`RulesConfig`]).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, RwLock, Weak};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::{
    Caller, Config, Engine as WasmEngine, ExternType, FuncType, InstancePre, Linker, Module,
    ResourceLimiter, Store, Trap, ValType,
};

use super::{RuleInput, RuleOutcome, Verdict};
use crate::config::RulesConfig;

/// The ABI version this host writes into every record.
pub const ABI_VERSION: u32 = 1;
/// Size of the fixed record header the host writes at the pointer `alloc` returned.
pub const RECORD_HEADER: usize = 64;
/// Bytes of the output window the host reserves after the data for the rule's reason.
pub const OUTPUT_CAPACITY: usize = 4096;
/// Record header offsets (little-endian u32 each). Frozen: ABI v1.
pub mod offset {
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
/// Record flag bits (the `flags` field).
pub mod flag {
    pub const BODY_TRUNCATED: u32 = 1;
    pub const TLS: u32 = 2;
    pub const TRANSPORT_ERROR: u32 = 4;
}
/// A rule file larger than this is refused before it is compiled (rules are a few KB).
pub const MAX_MODULE_BYTES: u64 = 8 << 20;
/// Wasm stack per evaluation. Well below the 2 MiB of a default Rust thread, because the rule
/// runs on the calling worker's native stack.
pub const MAX_WASM_STACK: usize = 256 * 1024;
/// Most table elements a rule may have (function pointer tables of small modules are tiny).
const MAX_TABLE_ELEMENTS: usize = 10_000;

/// A loaded rule: compiled once, instantiated per evaluation from the shared `InstancePre`.
pub struct LoadedRule {
    pub name: String,
    /// First 16 hex digits of the SHA-256 of the file.
    pub hash: String,
    pub size: usize,
    pub compile_ms: f64,
    pre: InstancePre<StoreState>,
    has_initialize: bool,
}

/// What the table holds for one rule name.
#[derive(Clone)]
enum Slot {
    /// Serving. `rejected` remembers the last newer file that failed to load (its hash, or
    /// the read error), so a reload or a poll does not recompile and re-log it.
    Ready {
        rule: Arc<LoadedRule>,
        rejected: Option<String>,
    },
    Failed {
        hash: Option<String>,
        error: String,
    },
}

/// Per-evaluation store data: only the resource limiter.
struct StoreState {
    limiter: Limiter,
}

struct Limiter {
    memory_limit: usize,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // An error (rather than Ok(false), which makes memory.grow return -1) ends the
        // evaluation with a message naming the limit; a rule that checks for -1 would only
        // fail later with a less useful trap anyway.
        if desired > self.memory_limit {
            return Err(wasmtime::Error::new(HostTrap::MemoryLimit {
                desired,
                limit: self.memory_limit,
            }));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > MAX_TABLE_ELEMENTS {
            return Err(wasmtime::Error::new(HostTrap::TableLimit { desired }));
        }
        Ok(true)
    }

    fn instances(&self) -> usize {
        1
    }

    fn tables(&self) -> usize {
        4
    }

    fn memories(&self) -> usize {
        1
    }
}

/// Traps the host raises itself; downcast from the wasmtime error to word the rule error.
#[derive(Debug)]
enum HostTrap {
    MemoryLimit { desired: usize, limit: usize },
    TableLimit { desired: usize },
    Abort(String),
}

impl fmt::Display for HostTrap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostTrap::MemoryLimit { desired, limit } => write!(
                f,
                "memory limit exceeded: the rule asked for {} of linear memory, rules.memory_limit is {}",
                size_text(*desired),
                size_text(*limit)
            ),
            HostTrap::TableLimit { desired } => write!(
                f,
                "table limit exceeded: the rule asked for {desired} table elements, at most {MAX_TABLE_ELEMENTS} are allowed"
            ),
            HostTrap::Abort(msg) => write!(f, "the rule called env.abort: {msg}"),
        }
    }
}

impl std::error::Error for HostTrap {}

fn size_text(bytes: usize) -> String {
    if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else if bytes >= 1 << 10 && bytes.is_multiple_of(1 << 10) {
        format!("{} KiB", bytes >> 10)
    } else {
        format!("{bytes} bytes")
    }
}

/// The engine: a wasmtime engine with our limits, the epoch ticker, and the rule table.
pub struct Engine {
    engine: WasmEngine,
    linker: Linker<StoreState>,
    cfg: RulesConfig,
    /// Epoch ticks an evaluation may run (the deadline rounded up, plus one partial tick).
    deadline_ticks: u64,
    rules: RwLock<HashMap<String, Slot>>,
    /// Evaluations in flight: the ticker only ticks while there are some, so an idle agent
    /// does not wake up every few ms.
    running: AtomicUsize,
    ticker: OnceLock<std::thread::Thread>,
}

/// Counts one evaluation in flight (and wakes the ticker) for as long as it lives.
struct Running<'a>(&'a Engine);

impl<'a> Running<'a> {
    fn start(engine: &'a Engine) -> Running<'a> {
        if engine.running.fetch_add(1, Ordering::SeqCst) == 0
            && let Some(t) = engine.ticker.get()
        {
            t.unpark();
        }
        Running(engine)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Engine {
    /// Builds the engine and starts its epoch ticker thread (`rule-epoch`), which ends by
    /// itself once the engine is dropped.
    pub fn new(cfg: &RulesConfig) -> Result<Arc<Engine>, String> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        config.consume_fuel(cfg.fuel.is_some());
        config.max_wasm_stack(MAX_WASM_STACK);
        let engine =
            WasmEngine::new(&config).map_err(|e| format!("cannot start the WASM engine: {e}"))?;

        let mut linker = Linker::new(&engine);
        // AssemblyScript imports `env.abort(msg, file, line, column)` for failed assertions
        // unless built with `--use abort=`. It is the one import we accept, and it traps.
        linker
            .func_wrap(
                "env",
                "abort",
                |mut caller: Caller<'_, StoreState>,
                 msg: i32,
                 file: i32,
                 line: i32,
                 col: i32|
                 -> wasmtime::Result<()> {
                    let msg = read_as_string(&mut caller, msg);
                    let file = read_as_string(&mut caller, file);
                    Err(wasmtime::Error::new(HostTrap::Abort(format!(
                        "{msg:?} at {file}:{line}:{col}"
                    ))))
                },
            )
            .map_err(|e| format!("cannot define env.abort: {e}"))?;

        let tick = epoch_tick(cfg.deadline);
        let deadline_ticks = cfg.deadline.as_nanos().div_ceil(tick.as_nanos()) as u64 + 1;
        let this = Arc::new(Engine {
            engine,
            linker,
            cfg: cfg.clone(),
            deadline_ticks,
            rules: RwLock::new(HashMap::new()),
            running: AtomicUsize::new(0),
            ticker: OnceLock::new(),
        });
        let weak: Weak<Engine> = Arc::downgrade(&this);
        let ticker = std::thread::Builder::new()
            .name("rule-epoch".into())
            .spawn(move || {
                loop {
                    let Some(engine) = weak.upgrade() else { return };
                    if engine.running.load(Ordering::SeqCst) == 0 {
                        drop(engine);
                        // Woken by the next evaluation (an unpark before the park is not
                        // lost); the timeout only lets the thread notice the engine is gone.
                        std::thread::park_timeout(Duration::from_secs(1));
                        continue;
                    }
                    drop(engine);
                    std::thread::sleep(tick);
                    match weak.upgrade() {
                        Some(e) => e.engine.increment_epoch(),
                        None => return,
                    }
                }
            })
            .map_err(|e| format!("cannot start the rule-epoch thread: {e}"))?;
        let _ = this.ticker.set(ticker.thread().clone());
        Ok(this)
    }

    /// Makes the table hold exactly `names`: new or changed files (by content hash) are
    /// compiled on the caller's thread, outside the lock, then swapped in one by one. A file
    /// that fails to load keeps the previous version serving when there is one.
    pub fn reload(&self, names: &[&str]) {
        let wanted: HashSet<&str> = names.iter().copied().collect();
        for name in &wanted {
            let current = self.slot(name);
            let path = self.cfg.dir.join(name);
            let (key, new_slot) = match read_rule(&path) {
                Err(error) => (error.clone(), Slot::Failed { hash: None, error }),
                Ok(bytes) => {
                    let hash = hash16(&bytes);
                    match &current {
                        Some(Slot::Ready { rule, rejected }) if rule.hash == hash => {
                            if rejected.is_some() {
                                // The serving version is back: forget the rejected one.
                                let rule = rule.clone();
                                self.write_table().insert(
                                    name.to_string(),
                                    Slot::Ready {
                                        rule,
                                        rejected: None,
                                    },
                                );
                            }
                            continue;
                        }
                        Some(Slot::Ready { rejected, .. }) if rejected.as_ref() == Some(&hash) => {
                            continue;
                        }
                        Some(Slot::Failed { hash: h, .. }) if h.as_ref() == Some(&hash) => {
                            continue;
                        }
                        _ => {}
                    }
                    let slot = match self.compile(name, &bytes, hash.clone()) {
                        Ok(rule) => {
                            log::info!(
                                "rule {name}: loaded {} ({} bytes, hash {}, compiled in {:.1} ms)",
                                path.display(),
                                rule.size,
                                rule.hash,
                                rule.compile_ms
                            );
                            Slot::Ready {
                                rule: Arc::new(rule),
                                rejected: None,
                            }
                        }
                        Err(error) => Slot::Failed {
                            hash: Some(hash.clone()),
                            error,
                        },
                    };
                    (hash, slot)
                }
            };
            let new_slot = match (new_slot, current) {
                (Slot::Failed { error, .. }, Some(Slot::Ready { rule, rejected })) => {
                    // The same broken file is reported once, not on every reload.
                    if rejected.as_ref() == Some(&key) {
                        continue;
                    }
                    log::error!(
                        "rule {name}: {error}; the previous version (hash {}) keeps serving",
                        rule.hash
                    );
                    Slot::Ready {
                        rule,
                        rejected: Some(key),
                    }
                }
                (Slot::Failed { hash, error }, current) => {
                    let repeated = matches!(&current,
                        Some(Slot::Failed { hash: h, error: e }) if *h == hash && *e == error);
                    if !repeated {
                        log::error!(
                            "rule {name}: {error}; targets using it record failure \"rule\""
                        );
                    }
                    Slot::Failed { hash, error }
                }
                (ready, _) => ready,
            };
            self.write_table().insert(name.to_string(), new_slot);
        }
        self.write_table()
            .retain(|name, _| wanted.contains(name.as_str()));
    }

    /// The load state of one rule: its hash when it serves, else the load error.
    pub fn loaded(&self, name: &str) -> Result<Arc<LoadedRule>, (Option<String>, String)> {
        match self.slot(name) {
            Some(Slot::Ready { rule, .. }) => Ok(rule),
            Some(Slot::Failed { hash, error }) => Err((hash, error)),
            None => Err((None, not_loaded(name))),
        }
    }

    /// Runs `name` on one input. The error carries the module hash when there is one.
    pub fn evaluate(
        &self,
        name: &str,
        input: &RuleInput<'_>,
    ) -> Result<RuleOutcome, (Option<String>, String)> {
        let start = Instant::now();
        let rule = self.loaded(name)?;
        let _running = Running::start(self);
        let (verdict, reason, extra) = self
            .run(&rule, input)
            .map_err(|e| (Some(rule.hash.clone()), e))?;
        Ok(RuleOutcome {
            verdict,
            reason,
            extra,
            hash: rule.hash.clone(),
            elapsed_ms: crate::util::ms(start.elapsed()),
        })
    }

    fn slot(&self, name: &str) -> Option<Slot> {
        let table = self.rules.read().unwrap_or_else(|p| p.into_inner());
        table.get(name).cloned()
    }

    fn write_table(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Slot>> {
        // A panic while holding the lock cannot leave the map half-written (insert/retain
        // are whole operations), so a poisoned lock is still usable.
        self.rules.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Compiles and checks one module against ABI v1.
    fn compile(&self, name: &str, bytes: &[u8], hash: String) -> Result<LoadedRule, String> {
        let start = Instant::now();
        check_format(bytes)?;
        let module = Module::new(&self.engine, bytes)
            .map_err(|e| format!("not a valid WebAssembly module: {}", error_text(&e)))?;

        let mut refused = Vec::new();
        for import in module.imports() {
            let is_abort = import.module() == "env"
                && import.name() == "abort"
                && matches!(import.ty(), ExternType::Func(f) if signature_is(&f, &[const { ValType::I32 }; 4], &[]));
            if !is_abort {
                refused.push(format!(
                    "{}.{} ({})",
                    import.module(),
                    import.name(),
                    kind(&import.ty())
                ));
            }
        }
        if !refused.is_empty() {
            return Err(format!(
                "imports {}: a rule may not import anything (ABI v1 links no host functions; only AssemblyScript's env.abort is accepted, and it traps)",
                refused.join(", ")
            ));
        }

        match module.get_export("memory") {
            Some(ExternType::Memory(m)) => {
                if m.is_64() || m.is_shared() {
                    return Err(
                        "exports a 64-bit or shared memory; ABI v1 needs a plain 32-bit `memory`"
                            .into(),
                    );
                }
                let initial = m.minimum().saturating_mul(65536);
                if initial > self.cfg.memory_limit as u64 {
                    return Err(format!(
                        "declares an initial memory of {}, above rules.memory_limit ({})",
                        size_text(initial as usize),
                        size_text(self.cfg.memory_limit)
                    ));
                }
            }
            Some(other) => {
                return Err(format!(
                    "exports `memory` as a {}, not a memory",
                    kind(&other)
                ));
            }
            None => return Err("does not export `memory` (ABI v1 needs it)".into()),
        }
        check_func(&module, "alloc", &[ValType::I32], &[ValType::I32], true)?;
        if module.get_export("evaluate").is_none() && module.get_export("evaluate_v2").is_some() {
            return Err(
                "exports only `evaluate_v2`; this sitewatch speaks ABI v1 (`evaluate`)".into(),
            );
        }
        check_func(
            &module,
            "evaluate",
            &[ValType::I32, ValType::I32],
            &[ValType::I32],
            true,
        )?;
        let has_initialize = check_func(&module, "_initialize", &[], &[], false)?;

        let pre = self
            .linker
            .instantiate_pre(&module)
            .map_err(|e| format!("cannot prepare the module: {}", error_text(&e)))?;
        Ok(LoadedRule {
            name: name.to_string(),
            hash,
            size: bytes.len(),
            compile_ms: crate::util::ms(start.elapsed()),
            pre,
            has_initialize,
        })
    }

    /// One evaluation in a fresh store: instantiate, `_initialize`, `alloc`, write the record,
    /// `evaluate`, read the output window.
    fn run(
        &self,
        rule: &LoadedRule,
        input: &RuleInput<'_>,
    ) -> Result<(Verdict, Option<String>, Option<serde_json::Value>), String> {
        let mut store = Store::new(
            &self.engine,
            StoreState {
                limiter: Limiter {
                    memory_limit: self.cfg.memory_limit,
                },
            },
        );
        store.limiter(|s| &mut s.limiter);
        store.set_epoch_deadline(self.deadline_ticks);
        store.epoch_deadline_trap();
        if let Some(fuel) = self.cfg.fuel {
            store
                .set_fuel(fuel)
                .map_err(|e| format!("cannot set fuel: {e}"))?;
        }

        let instance = rule
            .pre
            .instantiate(&mut store)
            .map_err(|e| self.trap_text(&e, "instantiation"))?;
        if rule.has_initialize {
            let init = instance
                .get_typed_func::<(), ()>(&mut store, "_initialize")
                .map_err(|e| format!("_initialize: {}", error_text(&e)))?;
            init.call(&mut store, ())
                .map_err(|e| self.trap_text(&e, "_initialize"))?;
        }
        let memory = instance
            .get_memory(&mut store, "memory")
            .ok_or("the instance has no `memory`")?;
        let alloc = instance
            .get_typed_func::<i32, i32>(&mut store, "alloc")
            .map_err(|e| format!("alloc: {}", error_text(&e)))?;
        let evaluate = instance
            .get_typed_func::<(i32, i32), i32>(&mut store, "evaluate")
            .map_err(|e| format!("evaluate: {}", error_text(&e)))?;

        let layout = Layout::of(input);
        let total = i32::try_from(layout.total).map_err(|_| {
            format!(
                "the record would be {} bytes, too large for a 32-bit rule",
                layout.total
            )
        })?;
        let ptr = alloc
            .call(&mut store, total)
            .map_err(|e| self.trap_text(&e, "alloc"))? as u32 as usize;
        if ptr == 0 {
            return Err(format!(
                "alloc({total}) returned 0 (out of memory in the rule)"
            ));
        }
        if !ptr.is_multiple_of(8) {
            return Err(format!(
                "alloc({total}) returned {ptr}, which is not 8-byte aligned (ABI v1)"
            ));
        }
        let end = ptr
            .checked_add(layout.total)
            .filter(|&end| end <= memory.data_size(&store))
            .ok_or_else(|| {
                format!(
                    "alloc({total}) returned {ptr}, but the memory ends at {}",
                    memory.data_size(&store)
                )
            })?;
        layout.write(&mut memory.data_mut(&mut store)[ptr..end], ptr, input);

        let code = evaluate
            .call(&mut store, (ptr as i32, total))
            .map_err(|e| self.trap_text(&e, "evaluate"))?;
        let verdict = match code {
            1 => Verdict::Up,
            0 => Verdict::Down,
            2 => Verdict::Unknown,
            other => {
                return Err(format!(
                    "evaluate returned {other}; ABI v1 allows 0 (down), 1 (up) or 2 (unknown)"
                ));
            }
        };

        // The window's place comes from what the host wrote, not from the header in guest
        // memory, which the rule may have overwritten.
        let data = memory.data(&store);
        let out_len_at = ptr + offset::OUT_LEN;
        let out_len = u32::from_le_bytes(
            data[out_len_at..out_len_at + 4]
                .try_into()
                .map_err(|_| "cannot read out_len")?,
        ) as usize;
        if out_len > OUTPUT_CAPACITY {
            return Err(format!(
                "out_len is {out_len}, larger than the output capacity ({OUTPUT_CAPACITY} bytes)"
            ));
        }
        let out_ptr = ptr + layout.out_offset;
        let (reason, extra) = parse_reason(&data[out_ptr..out_ptr + out_len])?;
        Ok((verdict, reason, extra))
    }

    /// Words a wasmtime error from a call as a rule error.
    fn trap_text(&self, e: &wasmtime::Error, stage: &str) -> String {
        if let Some(t) = e.downcast_ref::<HostTrap>() {
            return format!("{stage}: {t}");
        }
        if let Some(trap) = e.downcast_ref::<Trap>() {
            let what = match trap {
                Trap::Interrupt => format!(
                    "deadline of {} exceeded (rules.deadline)",
                    crate::util::format_duration(self.cfg.deadline)
                ),
                Trap::OutOfFuel => format!(
                    "fuel budget of {} exhausted (rules.fuel)",
                    self.cfg.fuel.unwrap_or(0)
                ),
                Trap::StackOverflow => format!(
                    "call stack exhausted (recursion too deep; the wasm stack is limited to {})",
                    size_text(MAX_WASM_STACK)
                ),
                Trap::UnreachableCodeReached => {
                    "`unreachable` executed (a panic or failed assertion in the rule)".to_string()
                }
                Trap::MemoryOutOfBounds => "out-of-bounds memory access".to_string(),
                other => other.to_string(),
            };
            return format!("trapped in {stage}: {what}");
        }
        format!("{stage} failed: {}", error_text(e))
    }
}

/// Where each part of the record goes inside the block `alloc` returned.
struct Layout {
    url: usize,
    headers: usize,
    headers_len: usize,
    body: usize,
    error: usize,
    out_offset: usize,
    total: usize,
}

impl Layout {
    fn of(input: &RuleInput<'_>) -> Layout {
        let headers_len: usize = input
            .headers
            .iter()
            .map(|(n, v)| n.len() + 2 + v.len() + 1)
            .sum();
        let url = RECORD_HEADER;
        let headers = url + input.url.len();
        let body = headers + headers_len;
        let error = body + input.body.len();
        let out_offset = error + input.error.map_or(0, str::len);
        Layout {
            url,
            headers,
            headers_len,
            body,
            error,
            out_offset,
            total: out_offset + OUTPUT_CAPACITY,
        }
    }

    /// Writes header and data into `buf` (exactly `total` bytes at guest address `base`).
    fn write(&self, buf: &mut [u8], base: usize, input: &RuleInput<'_>) {
        let mut flags = 0;
        if input.body_truncated {
            flags |= flag::BODY_TRUNCATED;
        }
        if input.tls {
            flags |= flag::TLS;
        }
        if input.error.is_some() {
            flags |= flag::TRANSPORT_ERROR;
        }
        let error = input.error.unwrap_or("");
        let fields: [(usize, usize); 14] = [
            (offset::ABI, ABI_VERSION as usize),
            (offset::STATUS, input.status as usize),
            (offset::ELAPSED_MS, input.elapsed_ms as usize),
            (offset::FLAGS, flags as usize),
            (offset::URL, base + self.url),
            (offset::URL + 4, input.url.len()),
            (offset::HEADERS, base + self.headers),
            (offset::HEADERS + 4, self.headers_len),
            (offset::BODY, base + self.body),
            (offset::BODY + 4, input.body.len()),
            (offset::ERROR, base + self.error),
            (offset::ERROR + 4, error.len()),
            (offset::OUT, base + self.out_offset),
            (offset::OUT + 4, OUTPUT_CAPACITY),
        ];
        buf[..RECORD_HEADER].fill(0);
        for (at, value) in fields {
            buf[at..at + 4].copy_from_slice(&(value as u32).to_le_bytes());
        }
        buf[self.url..self.headers].copy_from_slice(input.url.as_bytes());
        let mut at = self.headers;
        for (name, value) in input.headers {
            // Names lower-cased and line breaks flattened, so `name: value\n` always parses.
            for &b in name.as_bytes() {
                buf[at] = flatten(b.to_ascii_lowercase());
                at += 1;
            }
            buf[at..at + 2].copy_from_slice(b": ");
            at += 2;
            for &b in value.as_bytes() {
                buf[at] = flatten(b);
                at += 1;
            }
            buf[at] = b'\n';
            at += 1;
        }
        buf[self.body..self.error].copy_from_slice(input.body);
        buf[self.error..self.out_offset].copy_from_slice(error.as_bytes());
    }
}

fn flatten(b: u8) -> u8 {
    if b == b'\n' || b == b'\r' { b' ' } else { b }
}

/// The reason: empty → none; a JSON object → its `reason` field plus the other fields as
/// extra; anything else → the text itself. Non-UTF-8 is the rule's bug: a rule error.
pub fn parse_reason(bytes: &[u8]) -> Result<(Option<String>, Option<serde_json::Value>), String> {
    if bytes.is_empty() {
        return Ok((None, None));
    }
    let text = std::str::from_utf8(bytes).map_err(|e| {
        format!(
            "the reason is not valid UTF-8 (invalid byte at offset {} of {})",
            e.valid_up_to(),
            bytes.len()
        )
    })?;
    if text.trim_start().starts_with('{')
        && let Ok(serde_json::Value::Object(mut map)) = serde_json::from_str(text)
    {
        let reason = match map.remove("reason") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(s),
            Some(other) => Some(other.to_string()),
        };
        let extra = (!map.is_empty()).then_some(serde_json::Value::Object(map));
        return Ok((reason, extra));
    }
    Ok((Some(text.to_string()), None))
}

/// Reads a rule file, refusing huge ones before reading them.
fn read_rule(path: &Path) -> Result<Vec<u8>, String> {
    let meta =
        std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a file", path.display()));
    }
    if meta.len() > MAX_MODULE_BYTES {
        return Err(format!(
            "{} is {} bytes; rule modules are limited to {}",
            path.display(),
            meta.len(),
            size_text(MAX_MODULE_BYTES as usize)
        ));
    }
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// Refuses what is not a core wasm module or WAT text, with a message that says what it is.
fn check_format(bytes: &[u8]) -> Result<(), String> {
    if bytes.starts_with(b"\0asm") {
        if bytes.get(4..8) != Some(&[1, 0, 0, 0][..]) {
            return Err(
                "is a WebAssembly component or an unknown binary version; rules must be core modules (version 1)"
                    .into(),
            );
        }
        return Ok(());
    }
    if bytes.starts_with(b"\x7fELF") {
        return Err(
            "is a precompiled module (.cwasm); sitewatch never loads precompiled code, drop the .wasm instead"
                .into(),
        );
    }
    if let Ok(text) = std::str::from_utf8(bytes) {
        let t = text.trim_start();
        if t.starts_with('(') || t.starts_with(";;") {
            return Ok(());
        }
    }
    Err("is not a WebAssembly module (no \\0asm magic bytes, and not WAT text starting with `(module`)".into())
}

/// Checks an export's signature; `Ok(false)` when an optional export is absent.
fn check_func(
    module: &Module,
    name: &str,
    params: &[ValType],
    results: &[ValType],
    required: bool,
) -> Result<bool, String> {
    let want = format!("({}) -> ({})", types_text(params), types_text(results));
    match module.get_export(name) {
        None if required => Err(format!(
            "does not export the function `{name}` {want} (ABI v1 needs it)"
        )),
        None => Ok(false),
        Some(ExternType::Func(f)) => {
            if signature_is(&f, params, results) {
                Ok(true)
            } else {
                let params: Vec<ValType> = f.params().collect();
                let results: Vec<ValType> = f.results().collect();
                Err(format!(
                    "exports `{name}` as ({}) -> ({}); ABI v1 needs {want}",
                    types_text(&params),
                    types_text(&results)
                ))
            }
        }
        Some(other) => Err(format!(
            "exports `{name}` as a {}, not a function {want}",
            kind(&other)
        )),
    }
}

fn signature_is(f: &FuncType, params: &[ValType], results: &[ValType]) -> bool {
    let same = |a: &ValType, b: &ValType| ValType::eq(a, b);
    f.params().len() == params.len()
        && f.results().len() == results.len()
        && f.params().zip(params).all(|(a, b)| same(&a, b))
        && f.results().zip(results).all(|(a, b)| same(&a, b))
}

fn types_text(types: &[ValType]) -> String {
    types
        .iter()
        .map(|t| t.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn kind(ty: &ExternType) -> &'static str {
    match ty {
        ExternType::Func(_) => "function",
        ExternType::Global(_) => "global",
        ExternType::Table(_) => "table",
        ExternType::Memory(_) => "memory",
        ExternType::Tag(_) => "tag",
    }
}

/// The error and its causes on one line (wasmtime's WAT errors carry line and column).
fn error_text(e: &wasmtime::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        text.push_str(": ");
        text.push_str(&cause.to_string());
    }
    text.replace('\n', " ")
}

/// Reads an AssemblyScript string (UTF-16LE, byte length in the u32 before it) for the
/// abort message, bounded so a hostile pointer cannot make the host read much.
fn read_as_string(caller: &mut Caller<'_, StoreState>, ptr: i32) -> String {
    let Some(memory) = caller.get_export("memory").and_then(|e| e.into_memory()) else {
        return String::from("?");
    };
    let data = memory.data(&caller);
    let ptr = ptr as u32 as usize;
    let Some(len_bytes) = ptr.checked_sub(4).and_then(|at| data.get(at..ptr)) else {
        return String::from("?");
    };
    let len = u32::from_le_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]) as usize;
    let len = len.min(512) & !1;
    let Some(bytes) = data.get(ptr..ptr + len) else {
        return String::from("?");
    };
    let units: Vec<u16> = bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    String::from_utf16_lossy(&units)
}

/// First 16 hex digits of the SHA-256: names the module version in every record.
pub fn hash16(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// The ticker period: fine enough for the deadline, coarse enough to cost nothing.
fn epoch_tick(deadline: Duration) -> Duration {
    (deadline / 20).clamp(Duration::from_millis(1), Duration::from_millis(10))
}

pub(crate) fn not_loaded(name: &str) -> String {
    format!("rule {name:?} is not loaded (no target named it when the rules were last loaded)")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_reason(input: &[u8], reason: Option<&str>, extra: Option<serde_json::Value>) {
        let got = parse_reason(input).unwrap();
        assert_eq!(got, (reason.map(str::to_string), extra), "input {input:?}");
    }

    #[test]
    fn reasons() {
        check_reason(b"", None, None);
        check_reason(b"plain text", Some("plain text"), None);
        check_reason(b"{\"reason\":\"slow\"}", Some("slow"), None);
        check_reason(
            b"{\"reason\":\"slow\",\"ms\":350}",
            Some("slow"),
            Some(serde_json::json!({"ms": 350})),
        );
        check_reason(b"{\"ms\":1}", None, Some(serde_json::json!({"ms": 1})));
        check_reason(b"{\"reason\":7}", Some("7"), None);
        // Not a JSON object after all: kept as text.
        check_reason(b"{broken", Some("{broken"), None);
        check_reason(b"[1,2]", Some("[1,2]"), None);
    }

    #[test]
    fn non_utf8_reason_is_an_error() {
        let err = parse_reason(b"ok \xff\xfe").unwrap_err();
        assert!(err.contains("not valid UTF-8"), "{err}");
        assert!(err.contains("offset 3"), "{err}");
    }

    #[test]
    fn formats() {
        let check = |bytes: &[u8], ok: bool, needle: &str| {
            let got = check_format(bytes);
            assert_eq!(got.is_ok(), ok, "{bytes:?}: {got:?}");
            if let Err(e) = got {
                assert!(e.contains(needle), "{e}");
            }
        };
        check(b"\0asm\x01\0\0\0", true, "");
        check(b"  (module)", true, "");
        check(b";; comment\n(module)", true, "");
        check(b"\0asm\x0d\0\x01\0", false, "component");
        check(b"\x7fELF\x02\x01", false, "precompiled");
        check(b"hello", false, "not a WebAssembly module");
        check(b"\xff\xfe\x00", false, "not a WebAssembly module");
    }

    #[test]
    fn record_layout() {
        let headers = vec![("Content-Type".to_string(), "text/plain\r\nx".to_string())];
        let input = RuleInput {
            status: 200,
            elapsed_ms: 12,
            body_truncated: true,
            tls: false,
            url: "http://h/",
            headers: &headers,
            body: b"hi",
            error: None,
        };
        let layout = Layout::of(&input);
        let mut buf = vec![0xAA; layout.total];
        layout.write(&mut buf, 1024, &input);
        let u32_at = |at: usize| u32::from_le_bytes(buf[at..at + 4].try_into().unwrap());
        assert_eq!(u32_at(offset::ABI), 1);
        assert_eq!(u32_at(offset::STATUS), 200);
        assert_eq!(u32_at(offset::ELAPSED_MS), 12);
        assert_eq!(u32_at(offset::FLAGS), flag::BODY_TRUNCATED);
        assert_eq!(u32_at(offset::URL), 1024 + 64);
        assert_eq!(u32_at(offset::URL + 4), 9);
        let h = (u32_at(offset::HEADERS) - 1024) as usize;
        let hl = u32_at(offset::HEADERS + 4) as usize;
        assert_eq!(&buf[h..h + hl], b"content-type: text/plain  x\n");
        let b = (u32_at(offset::BODY) - 1024) as usize;
        assert_eq!(&buf[b..b + 2], b"hi");
        assert_eq!(u32_at(offset::ERROR + 4), 0);
        assert_eq!(u32_at(offset::OUT + 4), OUTPUT_CAPACITY as u32);
        assert_eq!(u32_at(offset::OUT_LEN), 0);
        assert_eq!(
            u32_at(offset::OUT) as usize - 1024 + OUTPUT_CAPACITY,
            layout.total
        );
    }

    #[test]
    fn hashes_are_16_hex_digits() {
        // SHA-256("") = e3b0c44298fc1c14...
        assert_eq!(hash16(b""), "e3b0c44298fc1c14");
    }
}
