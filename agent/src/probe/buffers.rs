//! Connection buffers for ureq that are reused instead of zeroed.
//!
//! ureq's `LazyBuffers` allocates its input and output buffers with `vec![0; n]` for every
//! connection, and a check makes a fresh connection: zeroing those ~100 KB was the largest
//! user-space cost per check left after the first profile (38% of instructions were `memset`;
//! bench/README.md). [`PooledBuffers`] has the same semantics as `LazyBuffers` but takes its
//! two `Vec`s from a process-wide free list and gives them back when the connection is
//! dropped. Only the bytes a read or a write reported are ever looked at, so what an earlier
//! connection left in a reused buffer is never interpreted.
//!
//! The free list is shared, not per thread, so that [`release_pooled`] can empty it between
//! rounds: a pair is ~100 KB, and per-thread lists kept one or two pairs resident for every
//! worker the pool ever started (16 by default), ~2 MB of an idle agent's memory.

use std::sync::Mutex;

use ureq::unversioned::transport::Buffers;

/// Buffer pairs kept at most: enough for every connection of a busy round (the default
/// concurrency is 16; a redirect holds two connections for a moment). A pair beyond it is freed.
const KEEP: usize = 32;

/// An input and an output buffer.
type Pair = (Vec<u8>, Vec<u8>);

/// A free list of buffer pairs. The process has one ([`POOL`]); tests make their own.
pub struct BufferPool {
    free: Mutex<Vec<Pair>>,
}

impl BufferPool {
    pub const fn new() -> BufferPool {
        BufferPool {
            free: Mutex::new(Vec::new()),
        }
    }

    fn take(&self) -> Option<Pair> {
        self.free.lock().ok()?.pop()
    }

    fn give(&self, pair: Pair) {
        if let Ok(mut free) = self.free.lock()
            && free.len() < KEEP
        {
            free.push(pair);
        }
    }

    /// Frees every pair held.
    pub fn release(&self) {
        let pairs = match self.free.lock() {
            Ok(mut free) => std::mem::take(&mut *free),
            Err(_) => return,
        };
        drop(pairs);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.free.lock().map_or(0, |f| f.len())
    }
}

impl Default for BufferPool {
    fn default() -> BufferPool {
        BufferPool::new()
    }
}

static POOL: BufferPool = BufferPool::new();

/// Frees every pooled pair. The scheduler calls it when a round is over, before it hands freed
/// heap back to the kernel; the next round's first connections allocate again (one ~100 KB
/// allocation each, not zeroed per check: `resize` fills only what it adds).
pub fn release_pooled() {
    POOL.release();
}

/// `LazyBuffers` semantics over reused memory. Nothing is taken from the pool until first use.
pub struct PooledBuffers {
    pool: &'static BufferPool,
    input_size: usize,
    output_size: usize,
    /// `input[consumed..filled]` is unread data; `input[filled..]` is free space.
    input: Vec<u8>,
    filled: usize,
    consumed: usize,
    output: Vec<u8>,
    /// Whether the last `input_consume` consumed anything (see `Buffers::can_use_input`).
    progress: bool,
    taken: bool,
}

impl PooledBuffers {
    pub fn new(input_size: usize, output_size: usize) -> PooledBuffers {
        PooledBuffers::with_pool(&POOL, input_size, output_size)
    }

    pub fn with_pool(
        pool: &'static BufferPool,
        input_size: usize,
        output_size: usize,
    ) -> PooledBuffers {
        PooledBuffers {
            pool,
            input_size: input_size.max(1),
            output_size: output_size.max(1),
            input: Vec::new(),
            filled: 0,
            consumed: 0,
            output: Vec::new(),
            progress: false,
            taken: false,
        }
    }

    fn ensure_allocation(&mut self) {
        if !self.taken {
            self.taken = true;
            if let Some((input, output)) = self.pool.take() {
                self.input = input;
                self.output = output;
            }
        }
        // `resize` only writes the bytes it adds: a reused buffer of the right size costs
        // nothing here.
        if self.output.len() < self.output_size {
            self.output.resize(self.output_size, 0);
        }
        if self.input.len() < self.input_size {
            self.input.resize(self.input_size, 0);
        }
    }

    /// As ureq's `ConsumeBuf`: reclaim consumed space at the front.
    fn maybe_shift(&mut self) {
        if self.consumed == 0 {
            return;
        }
        if self.consumed == self.filled {
            self.consumed = 0;
            self.filled = 0;
        } else if self.filled > self.input.len() / 2 {
            self.input.copy_within(self.consumed..self.filled, 0);
            self.filled -= self.consumed;
            self.consumed = 0;
        }
    }

    fn free_mut(&mut self) -> &mut [u8] {
        self.maybe_shift();
        &mut self.input[self.filled..]
    }
}

impl Drop for PooledBuffers {
    fn drop(&mut self) {
        if self.input.capacity() == 0 && self.output.capacity() == 0 {
            return;
        }
        let pair = (
            std::mem::take(&mut self.input),
            std::mem::take(&mut self.output),
        );
        self.pool.give(pair);
    }
}

impl Buffers for PooledBuffers {
    fn output(&mut self) -> &mut [u8] {
        self.ensure_allocation();
        &mut self.output
    }

    fn input(&self) -> &[u8] {
        &self.input[self.consumed..self.filled]
    }

    fn input_append_buf(&mut self) -> &mut [u8] {
        self.ensure_allocation();
        self.free_mut()
    }

    fn input_appended(&mut self, amount: usize) {
        self.filled += amount;
        assert!(self.filled <= self.input.len());
    }

    fn input_consume(&mut self, amount: usize) {
        self.progress = amount > 0;
        self.consumed += amount;
        assert!(self.consumed <= self.filled);
    }

    fn tmp_and_output(&mut self) -> (&mut [u8], &mut [u8]) {
        self.ensure_allocation();
        // As LazyBuffers: the request body is read into free input space; make room for it.
        const MIN_TMP_SIZE: usize = 10 * 1024;
        self.maybe_shift();
        let free = self.input.len() - self.filled;
        if free < MIN_TMP_SIZE {
            let len = self.input.len() + MIN_TMP_SIZE - free;
            self.input.resize(len, 0);
        }
        (&mut self.input[self.filled..], &mut self.output)
    }

    fn can_use_input(&self) -> bool {
        self.filled > self.consumed && self.progress
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_is_filled_consumed_and_shifted_like_ureqs_buffers() {
        let mut b = PooledBuffers::new(8, 4);
        assert_eq!(b.output().len(), 4);
        let free = b.input_append_buf();
        assert_eq!(free.len(), 8);
        free[..5].copy_from_slice(b"hello");
        b.input_appended(5);
        assert_eq!(b.input(), b"hello");
        assert!(!b.can_use_input(), "nothing consumed yet: read more first");
        b.input_consume(2);
        assert!(b.can_use_input());
        assert_eq!(b.input(), b"llo");
        // More than half filled with 2 consumed: the rest moves to the front.
        assert_eq!(b.input_append_buf().len(), 5);
        assert_eq!(b.input(), b"llo");
        b.input_consume(3);
        assert_eq!(b.input(), b"");
        assert_eq!(
            b.input_append_buf().len(),
            8,
            "all consumed: the whole buffer is free"
        );
        let (tmp, out) = b.tmp_and_output();
        assert!(tmp.len() >= 10 * 1024, "room for a request body chunk");
        assert_eq!(out.len(), 4);
    }

    #[test]
    fn a_dropped_connections_buffers_are_reused_without_their_old_bytes_showing() {
        // A pool of its own: other tests' connections use the process's.
        let pool: &'static BufferPool = Box::leak(Box::new(BufferPool::new()));
        let mut first = PooledBuffers::with_pool(pool, 64, 32);
        first.input_append_buf()[..6].copy_from_slice(b"secret");
        first.input_appended(6);
        let ptr = first.input.as_ptr();
        drop(first);
        assert_eq!(pool.len(), 1, "the pair went back to the pool");
        let mut second = PooledBuffers::with_pool(pool, 64, 32);
        assert_eq!(second.input(), b"", "no data before a read");
        assert_eq!(second.input_append_buf().len(), 64);
        assert_eq!(
            second.input.as_ptr(),
            ptr,
            "the same memory, not a new allocation"
        );
        second.input_append_buf()[..2].copy_from_slice(b"ok");
        second.input_appended(2);
        assert_eq!(second.input(), b"ok");
        drop(second);
        // Between rounds the pool lets go of everything; the next connection allocates.
        pool.release();
        assert_eq!(pool.len(), 0);
        let mut third = PooledBuffers::with_pool(pool, 64, 32);
        assert_eq!(third.input_append_buf().len(), 64);
        assert_eq!(third.input(), b"");
    }

    #[test]
    fn the_pool_keeps_at_most_its_cap() {
        let pool: &'static BufferPool = Box::leak(Box::new(BufferPool::new()));
        let mut open: Vec<PooledBuffers> = (0..KEEP + 3)
            .map(|_| PooledBuffers::with_pool(pool, 16, 16))
            .collect();
        for b in &mut open {
            b.output();
        }
        drop(open);
        assert_eq!(pool.len(), KEEP);
    }
}
