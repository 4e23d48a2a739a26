//! RecordBatch v2 (magic 2), the on-wire form of Kafka records: encoding for Produce and
//! decoding of Fetch responses.
//!
//! Written here rather than taken from `kafka_protocol::records` because the decoder must
//! treat the bytes as hostile: it never allocates by a count the broker sent, bounds the
//! decompressed size of a gzip batch, skips the partial batch a broker may put at the end of a
//! fetch, and names the exact problem (bad CRC, legacy format, unknown compression) instead of
//! failing on a generic buffer underflow.

use std::io::{Read, Write};

use super::KafkaError;

/// Magic byte of the only record format we speak.
const MAGIC_V2: i8 = 2;
/// Bytes of the batch header up to and including the record count.
const BATCH_HEADER_LEN: usize = 61;
/// Attribute bits.
const ATTR_COMPRESSION_MASK: i16 = 0x07;
const ATTR_LOG_APPEND_TIME: i16 = 1 << 3;
const ATTR_CONTROL: i16 = 1 << 5;
/// A decompressed batch larger than this is refused (gzip bomb guard).
pub const MAX_DECOMPRESSED: usize = 64 * 1024 * 1024;

/// Record compression we can write and read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    None,
    Gzip,
}

/// One record to encode: borrowed so the producer encodes straight from its queue.
#[derive(Clone, Copy, Debug)]
pub struct RecordRef<'a> {
    pub key: &'a [u8],
    /// `None` is a null value: a tombstone, which compaction turns into "key removed".
    pub value: Option<&'a [u8]>,
    pub timestamp_ms: i64,
}

/// A record read from a fetch, with its absolute offset: what the decoder makes and what
/// [`super::Client::fetch`] returns, one type from the wire to the sink.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchedRecord {
    pub offset: i64,
    pub timestamp_ms: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
}

/// Encodes `records` as one RecordBatch v2 with base offset 0 (the broker assigns offsets),
/// no producer id (not idempotent) and create-time timestamps.
pub fn encode_batch(records: &[RecordRef<'_>], codec: Codec) -> Result<Vec<u8>, KafkaError> {
    if records.is_empty() {
        return Err(KafkaError::Protocol("encode: empty record batch".into()));
    }
    let base_ts = records.iter().map(|r| r.timestamp_ms).min().unwrap_or(0);
    let max_ts = records.iter().map(|r| r.timestamp_ms).max().unwrap_or(0);
    let mut body = Vec::with_capacity(
        records
            .iter()
            .map(|r| r.key.len() + r.value.map_or(0, <[u8]>::len) + 16)
            .sum(),
    );
    for (i, r) in records.iter().enumerate() {
        let mut rec = Vec::with_capacity(r.key.len() + r.value.map_or(0, <[u8]>::len) + 16);
        rec.push(0u8); // record attributes (unused)
        put_varlong(&mut rec, r.timestamp_ms - base_ts);
        put_varlong(&mut rec, i as i64);
        put_varlong(&mut rec, r.key.len() as i64);
        rec.extend_from_slice(r.key);
        match r.value {
            Some(v) => {
                put_varlong(&mut rec, v.len() as i64);
                rec.extend_from_slice(v);
            }
            None => put_varlong(&mut rec, -1),
        }
        put_varlong(&mut rec, 0); // no headers
        put_varlong(&mut body, rec.len() as i64);
        body.extend_from_slice(&rec);
    }
    let (body, codec_bits) = match codec {
        Codec::None => (body, 0i16),
        Codec::Gzip => {
            let mut enc = flate2::write::GzEncoder::new(
                Vec::with_capacity(body.len() / 2),
                flate2::Compression::fast(),
            );
            enc.write_all(&body)
                .and_then(|_| enc.finish())
                .map(|b| (b, 1i16))
                .map_err(|e| KafkaError::Protocol(format!("gzip: {e}")))?
        }
    };
    let count = i32::try_from(records.len())
        .map_err(|_| KafkaError::Protocol("encode: too many records".into()))?;
    let mut out = Vec::with_capacity(BATCH_HEADER_LEN + body.len());
    out.extend_from_slice(&0i64.to_be_bytes()); // base offset
    out.extend_from_slice(&0i32.to_be_bytes()); // batch length, filled below
    out.extend_from_slice(&(-1i32).to_be_bytes()); // partition leader epoch
    out.push(MAGIC_V2 as u8);
    out.extend_from_slice(&0u32.to_be_bytes()); // crc, filled below
    let crc_from = out.len();
    out.extend_from_slice(&codec_bits.to_be_bytes()); // attributes
    out.extend_from_slice(&(count - 1).to_be_bytes()); // last offset delta
    out.extend_from_slice(&base_ts.to_be_bytes());
    out.extend_from_slice(&max_ts.to_be_bytes());
    out.extend_from_slice(&(-1i64).to_be_bytes()); // producer id
    out.extend_from_slice(&(-1i16).to_be_bytes()); // producer epoch
    out.extend_from_slice(&(-1i32).to_be_bytes()); // base sequence
    out.extend_from_slice(&count.to_be_bytes());
    out.extend_from_slice(&body);
    let batch_len = i32::try_from(out.len() - 12)
        .map_err(|_| KafkaError::Protocol("encode: batch larger than 2 GiB".into()))?;
    out[8..12].copy_from_slice(&batch_len.to_be_bytes());
    let crc = crc32c::crc32c(&out[crc_from..]);
    out[17..21].copy_from_slice(&crc.to_be_bytes());
    Ok(out)
}

/// Decodes every complete batch in `data` (the `records` field of one fetched partition),
/// returning records with offset ≥ `from_offset` in order. Control batches (transaction
/// markers) are skipped. A truncated last batch is normal (the broker cuts at max bytes) and is
/// ignored; the returned `next_offset` says where the following fetch should start.
pub fn decode_batches(data: &[u8], from_offset: i64) -> Result<Decoded, KafkaError> {
    let mut out = Decoded {
        records: Vec::new(),
        next_offset: from_offset,
    };
    let mut pos = 0usize;
    while data.len() - pos >= 17 {
        let base_offset = be_i64(&data[pos..]);
        let batch_len = be_i32(&data[pos + 8..]);
        if batch_len < 0 {
            return Err(bad(format!(
                "record batch at offset {base_offset} has negative length {batch_len}"
            )));
        }
        let magic = data[pos + 16] as i8;
        if magic != MAGIC_V2 {
            return Err(KafkaError::Protocol(format!(
                "record batch at offset {base_offset} uses the legacy message format v{magic}; \
                 only RecordBatch v2 (Kafka 0.11+) is supported"
            )));
        }
        let end = pos + 12 + batch_len as usize;
        if end > data.len() {
            break; // partial batch at the end of the fetch
        }
        decode_one(&data[pos..end], from_offset, &mut out)?;
        pos = end;
    }
    Ok(out)
}

/// Records of one fetch, and the offset to fetch next.
#[derive(Debug, Default)]
pub struct Decoded {
    pub records: Vec<FetchedRecord>,
    /// One past the last offset covered by a complete batch (records or control).
    pub next_offset: i64,
}

fn bad(msg: String) -> KafkaError {
    KafkaError::Protocol(format!("corrupt fetch data: {msg}"))
}

fn decode_one(batch: &[u8], from_offset: i64, out: &mut Decoded) -> Result<(), KafkaError> {
    if batch.len() < BATCH_HEADER_LEN {
        return Err(bad(format!("record batch of {} bytes", batch.len())));
    }
    let base_offset = be_i64(batch);
    let stored_crc = u32::from_be_bytes([batch[17], batch[18], batch[19], batch[20]]);
    let crc = crc32c::crc32c(&batch[21..]);
    if crc != stored_crc {
        return Err(bad(format!(
            "record batch at offset {base_offset}: CRC mismatch (stored {stored_crc:08x}, computed {crc:08x})"
        )));
    }
    let attributes = i16::from_be_bytes([batch[21], batch[22]]);
    let last_offset_delta = be_i32(&batch[23..]);
    let base_ts = be_i64(&batch[27..]);
    let max_ts = be_i64(&batch[35..]);
    let count = be_i32(&batch[57..]);
    let last = base_offset.saturating_add(i64::from(last_offset_delta));
    out.next_offset = out.next_offset.max(last.saturating_add(1));
    if attributes & ATTR_CONTROL != 0 || last < from_offset {
        return Ok(());
    }
    let raw = &batch[BATCH_HEADER_LEN..];
    let inflated;
    let body: &[u8] = match attributes & ATTR_COMPRESSION_MASK {
        0 => raw,
        1 => {
            let mut buf = Vec::new();
            flate2::read::GzDecoder::new(raw)
                .take(MAX_DECOMPRESSED as u64 + 1)
                .read_to_end(&mut buf)
                .map_err(|e| bad(format!("batch at offset {base_offset}: gzip: {e}")))?;
            if buf.len() > MAX_DECOMPRESSED {
                return Err(bad(format!(
                    "batch at offset {base_offset} inflates past {MAX_DECOMPRESSED} bytes"
                )));
            }
            inflated = buf;
            &inflated
        }
        c => {
            let name = match c {
                2 => "snappy",
                3 => "lz4",
                4 => "zstd",
                _ => "unknown",
            };
            return Err(KafkaError::Protocol(format!(
                "record batch at offset {base_offset} is compressed with {name} (codec {c}); \
                 only none and gzip are supported"
            )));
        }
    };
    let log_append = attributes & ATTR_LOG_APPEND_TIME != 0;
    let mut r = Reader { buf: body, pos: 0 };
    for _ in 0..count.max(0) {
        let len = r.varint()?;
        if len < 0 || len as usize > r.remaining() {
            return Err(bad(format!(
                "batch at offset {base_offset}: record length {len}"
            )));
        }
        let end = r.pos + len as usize;
        let mut rec = Reader {
            buf: &r.buf[..end],
            pos: r.pos,
        };
        rec.take(1)?; // attributes
        let ts_delta = rec.varint()?;
        let offset_delta = rec.varint()?;
        let key = rec.bytes()?;
        let value = rec.bytes()?;
        // Headers are not part of our records; skip them but validate their framing.
        let headers = rec.varint()?;
        for _ in 0..headers.max(0) {
            rec.bytes()?;
            rec.bytes()?;
        }
        r.pos = end;
        let offset = base_offset.saturating_add(offset_delta);
        if offset < from_offset {
            continue;
        }
        out.records.push(FetchedRecord {
            offset,
            timestamp_ms: if log_append {
                max_ts
            } else {
                base_ts.saturating_add(ts_delta)
            },
            key: key.map(<[u8]>::to_vec),
            value: value.map(<[u8]>::to_vec),
        });
    }
    Ok(())
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], KafkaError> {
        if n > self.remaining() {
            return Err(bad("record runs past its batch".into()));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    /// Zigzag varint (up to 64 bits).
    fn varint(&mut self) -> Result<i64, KafkaError> {
        let mut v: u64 = 0;
        for shift in (0..70).step_by(7) {
            let b = self.take(1)?[0];
            v |= u64::from(b & 0x7f) << shift.min(63);
            if b & 0x80 == 0 {
                return Ok(((v >> 1) as i64) ^ -((v & 1) as i64));
            }
        }
        Err(bad("varint longer than 10 bytes".into()))
    }

    /// A varint length followed by that many bytes; -1 means null.
    fn bytes(&mut self) -> Result<Option<&'a [u8]>, KafkaError> {
        let len = self.varint()?;
        if len < 0 {
            return Ok(None);
        }
        usize::try_from(len)
            .map_err(|_| bad("length overflow".into()))
            .and_then(|n| self.take(n))
            .map(Some)
    }
}

/// Zigzag varint as used by RecordBatch v2.
pub fn put_varlong(out: &mut Vec<u8>, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

fn be_i64(b: &[u8]) -> i64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    i64::from_be_bytes(a)
}

fn be_i32(b: &[u8]) -> i32 {
    i32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recs(n: usize) -> Vec<(Vec<u8>, Vec<u8>, i64)> {
        (0..n)
            .map(|i| {
                (
                    format!("k{i}").into_bytes(),
                    format!("value number {i}").repeat(i % 5 + 1).into_bytes(),
                    1_700_000_000_000 + (i as i64 % 7),
                )
            })
            .collect()
    }

    fn encode(rs: &[(Vec<u8>, Vec<u8>, i64)], codec: Codec, base: i64) -> Vec<u8> {
        let refs: Vec<RecordRef<'_>> = rs
            .iter()
            .map(|(k, v, t)| RecordRef {
                key: k,
                value: Some(v),
                timestamp_ms: *t,
            })
            .collect();
        let mut b = encode_batch(&refs, codec).unwrap();
        // Pretend the broker assigned `base` (the CRC does not cover the base offset).
        b[..8].copy_from_slice(&base.to_be_bytes());
        b
    }

    #[test]
    fn round_trip_plain_and_gzip_with_partial_tail() {
        for codec in [Codec::None, Codec::Gzip] {
            let a = recs(50);
            let b = recs(30);
            let mut data = encode(&a, codec, 100);
            data.extend(encode(&b, codec, 150));
            let full = decode_batches(&data, 0).unwrap();
            assert_eq!(full.records.len(), 80);
            assert_eq!(full.next_offset, 180);
            for (i, r) in full.records.iter().enumerate() {
                let (k, v, t) = if i < 50 { &a[i] } else { &b[i - 50] };
                assert_eq!(r.offset, 100 + i as i64);
                assert_eq!(r.key.as_deref(), Some(&k[..]));
                assert_eq!(r.value.as_deref(), Some(&v[..]));
                assert_eq!(r.timestamp_ms, *t);
            }
            // From the middle of the first batch: earlier records are filtered out.
            let mid = decode_batches(&data, 140).unwrap();
            assert_eq!(mid.records.first().map(|r| r.offset), Some(140));
            assert_eq!(mid.records.len(), 40);
            // A cut in the second batch: only the first batch, next offset after it.
            let cut = decode_batches(&data[..data.len() - 5], 0).unwrap();
            assert_eq!(cut.records.len(), 50);
            assert_eq!(cut.next_offset, 150);
        }
    }

    /// `check(bytes, expected error substring)`.
    fn check_err(data: &[u8], expected: &str) {
        let err = decode_batches(data, 0).unwrap_err().to_string();
        assert!(err.contains(expected), "got {err:?}, want {expected:?}");
    }

    #[test]
    fn hostile_batches_are_clear_errors() {
        let good = encode(&recs(3), Codec::None, 0);
        let mut flipped = good.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0xff;
        check_err(&flipped, "CRC mismatch");
        let mut legacy = good.clone();
        legacy[16] = 1;
        check_err(&legacy, "legacy message format v1");
        let mut neg = good.clone();
        neg[8..12].copy_from_slice(&(-5i32).to_be_bytes());
        check_err(&neg, "negative length");
        // A huge record count with valid CRC must not allocate or loop past the data.
        let mut big = good.clone();
        big[57..61].copy_from_slice(&i32::MAX.to_be_bytes());
        let crc = crc32c::crc32c(&big[21..]);
        big[17..21].copy_from_slice(&crc.to_be_bytes());
        check_err(&big, "runs past its batch");
        // Snappy attribute.
        let mut snappy = good;
        snappy[22] |= 2;
        let crc = crc32c::crc32c(&snappy[21..]);
        snappy[17..21].copy_from_slice(&crc.to_be_bytes());
        check_err(&snappy, "snappy");
    }

    #[test]
    fn varints() {
        for v in [0i64, 1, -1, 63, -64, 64, 300, -300, i64::MAX, i64::MIN] {
            let mut b = Vec::new();
            put_varlong(&mut b, v);
            let mut r = Reader { buf: &b, pos: 0 };
            assert_eq!(r.varint().unwrap(), v);
            assert_eq!(r.remaining(), 0);
        }
    }
}
