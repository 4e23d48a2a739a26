//! The WASM rule engine (wasmtime): compile once, a fresh store per evaluation, epoch deadline,
//! memory limit, no imports. See `rules/README.md` for the ABI.

/// Compiled rules and the engine they run on.
pub struct Engine {}
