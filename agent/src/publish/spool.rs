//! The on-disk spool: records the publisher could not deliver yet, kept in order until Kafka
//! acknowledges them.
//!
//! Layout: a directory of append-only segment files `00000000000000000042.spool`, oldest
//! first. Each record is one frame:
//!
//! ```text
//! u32 LE  payload length
//! u32 LE  CRC32C of the payload
//! payload: u8 version (1) | i64 LE timestamp ms | u32 LE key length | key | value
//! ```
//!
//! A crash can tear the last frame or leave garbage; a frame whose length or checksum does not
//! hold is skipped (logged, counted) and reading resumes at the next offset where a whole valid
//! frame starts, so one bad frame never costs more than itself. Segments written by an earlier
//! run are never appended to: a new run starts a new segment.
//!
//! Reading is peek-then-ack: [`Spool::peek`] returns records from the read position without
//! moving it; [`Spool::ack`] moves it after Kafka took them, deleting segments that are fully
//! acknowledged. The read position is not persisted inside a segment, so a restart re-sends the
//! acknowledged head of the first segment (at-least-once; the sink dedupes by `check_id`).
//!
//! Bounded size, policy when full: the oldest segment is deleted (its records counted as
//! dropped and logged as an error) to make room for new ones. For a monitor the newest
//! results matter most (they say what is down now) and a long outage should never make the
//! agent stop recording; refusing new records would instead lose exactly the present.

use std::collections::VecDeque;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::kafka::ProduceRecord;

/// Frame header: length + CRC.
const HEADER: usize = 8;
/// Payload bytes before the key: version, timestamp, key length.
const PAYLOAD_FIXED: usize = 1 + 8 + 4;
const VERSION: u8 = 1;
/// The largest record the spool takes (a check record is a few KiB).
pub const MAX_RECORD: usize = 1024 * 1024;
const EXT: &str = "spool";

/// A spool operation failed on disk. Names the path; never holds record contents.
#[derive(Debug)]
pub struct SpoolError {
    pub path: PathBuf,
    pub action: &'static str,
    pub error: io::Error,
}

impl fmt::Display for SpoolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spool {}: cannot {}: {}",
            self.path.display(),
            self.action,
            self.error
        )
    }
}

impl std::error::Error for SpoolError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// Where a peek ended: pass it to [`Spool::ack`] once Kafka has the records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpoolPos {
    seq: u64,
    offset: u64,
    /// Records of segment `seq` before `offset`.
    consumed: u64,
}

#[derive(Debug)]
struct Segment {
    seq: u64,
    bytes: u64,
    records: u64,
}

/// What appending did beyond storing the record.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct AppendOutcome {
    /// Older records deleted to make room (policy: drop oldest).
    pub dropped: u64,
}

pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    segment_max: u64,
    /// Oldest first; the last one is the one being written when `writer` is set.
    segments: VecDeque<Segment>,
    writer: Option<(u64, BufWriter<File>)>,
    next_seq: u64,
    /// Read position inside the front segment.
    read_offset: u64,
    read_consumed: u64,
    /// Damaged bytes skipped since open (torn tails, corrupt frames).
    pub skipped_bytes: u64,
}

impl Spool {
    /// Opens (creating) the spool in `dir`, scanning what an earlier run left.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Spool, SpoolError> {
        let err = |action, error| SpoolError {
            path: dir.to_path_buf(),
            action,
            error,
        };
        fs::create_dir_all(dir).map_err(|e| err("create the directory", e))?;
        let mut seqs = Vec::new();
        for entry in fs::read_dir(dir).map_err(|e| err("list the directory", e))? {
            let entry = entry.map_err(|e| err("list the directory", e))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if let Some(seq) = name
                .strip_suffix(&format!(".{EXT}"))
                .and_then(|s| s.parse::<u64>().ok())
            {
                seqs.push(seq);
            }
        }
        seqs.sort_unstable();
        let mut spool = Spool {
            dir: dir.to_path_buf(),
            max_bytes: max_bytes.max(64 * 1024),
            segment_max: (max_bytes / 8).clamp(16 * 1024, 4 * 1024 * 1024),
            segments: VecDeque::new(),
            writer: None,
            next_seq: seqs.last().map_or(1, |s| s + 1),
            read_offset: 0,
            read_consumed: 0,
            skipped_bytes: 0,
        };
        for seq in seqs {
            let path = spool.path(seq);
            let data = fs::read(&path).map_err(|e| SpoolError {
                path: path.clone(),
                action: "read",
                error: e,
            })?;
            let scan = parse_frames(&data, usize::MAX, usize::MAX);
            if scan.skipped > 0 {
                log::warn!(
                    target: "sitewatch::spool",
                    "{}: skipped {} damaged bytes (torn write or corruption); {} good records kept",
                    path.display(),
                    scan.skipped,
                    scan.records.len()
                );
                spool.skipped_bytes += scan.skipped as u64;
            }
            if scan.records.is_empty() {
                let _ = fs::remove_file(&path);
                continue;
            }
            spool.segments.push_back(Segment {
                seq,
                bytes: data.len() as u64,
                records: scan.records.len() as u64,
            });
        }
        if !spool.is_empty() {
            log::info!(
                target: "sitewatch::spool",
                "{}: {} records from an earlier run to replay",
                dir.display(),
                spool.len()
            );
        }
        Ok(spool)
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:020}.{EXT}"))
    }

    /// Records not yet acknowledged.
    pub fn len(&self) -> u64 {
        self.segments.iter().map(|s| s.records).sum::<u64>() - self.read_consumed
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes on disk.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }

    /// Appends one record. When the spool is full the oldest segment is deleted first.
    pub fn append(&mut self, rec: &ProduceRecord) -> Result<AppendOutcome, SpoolError> {
        let frame = encode_frame(rec);
        if frame.len() > MAX_RECORD + HEADER + PAYLOAD_FIXED {
            return Err(SpoolError {
                path: self.dir.clone(),
                action: "store a record that large",
                error: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{} bytes (max {MAX_RECORD})", frame.len()),
                ),
            });
        }
        let len = frame.len() as u64;
        let mut outcome = AppendOutcome::default();
        while self.bytes() + len > self.max_bytes {
            match self.drop_oldest()? {
                Some(n) => outcome.dropped += n,
                // Only the segment being written is left: close it so it can go next.
                None if self.writer.is_some() && !self.is_empty() => {
                    self.flush()?;
                    self.writer = None;
                }
                None => break,
            }
        }
        let need_new = match (&self.writer, self.segments.back()) {
            (Some((seq, _)), Some(last)) => *seq != last.seq || last.bytes + len > self.segment_max,
            _ => true,
        };
        if need_new {
            self.roll()?;
        }
        let (seq, w) = self.writer.as_mut().ok_or_else(|| SpoolError {
            path: self.dir.clone(),
            action: "open a segment",
            error: io::Error::other("no writer"),
        })?;
        let seq = *seq;
        w.write_all(&frame).map_err(|e| SpoolError {
            path: self.dir.join(format!("{seq:020}.{EXT}")),
            action: "write",
            error: e,
        })?;
        if let Some(last) = self.segments.back_mut() {
            last.bytes += len;
            last.records += 1;
        }
        Ok(outcome)
    }

    /// Closes the current segment and starts a new one.
    fn roll(&mut self) -> Result<(), SpoolError> {
        self.flush()?;
        let seq = self.next_seq;
        self.next_seq += 1;
        let path = self.path(seq);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| SpoolError {
                path: path.clone(),
                action: "create",
                error: e,
            })?;
        self.writer = Some((seq, BufWriter::with_capacity(64 * 1024, file)));
        self.segments.push_back(Segment {
            seq,
            bytes: 0,
            records: 0,
        });
        Ok(())
    }

    /// Deletes the oldest segment (policy when full). Returns the unacknowledged records it
    /// held, or `None` when only the segment being written is left.
    fn drop_oldest(&mut self) -> Result<Option<u64>, SpoolError> {
        let writing = self.writer.as_ref().map(|w| w.0);
        match self.segments.front() {
            Some(front) if Some(front.seq) != writing || self.segments.len() > 1 => {}
            _ => return Ok(None),
        }
        let front = match self.segments.pop_front() {
            Some(f) => f,
            None => return Ok(None),
        };
        if Some(front.seq) == writing {
            self.writer = None;
        }
        let lost = front.records - self.read_consumed;
        self.read_offset = 0;
        self.read_consumed = 0;
        let path = self.path(front.seq);
        fs::remove_file(&path).map_err(|e| SpoolError {
            path,
            action: "delete",
            error: e,
        })?;
        log::error!(
            target: "sitewatch::spool",
            "spool full ({} bytes max): dropped the {lost} oldest records",
            self.max_bytes
        );
        Ok(Some(lost))
    }

    /// Pushes buffered appends to the file (not fsync; see [`Spool::sync`]).
    pub fn flush(&mut self) -> Result<(), SpoolError> {
        if let Some((seq, w)) = &mut self.writer {
            let seq = *seq;
            w.flush().map_err(|e| SpoolError {
                path: self.dir.join(format!("{seq:020}.{EXT}")),
                action: "write",
                error: e,
            })?;
        }
        Ok(())
    }

    /// Flushes and fsyncs the current segment: what is appended survives a power loss.
    pub fn sync(&mut self) -> Result<(), SpoolError> {
        self.flush()?;
        if let Some((seq, w)) = &mut self.writer {
            let seq = *seq;
            w.get_ref().sync_data().map_err(|e| SpoolError {
                path: self.dir.join(format!("{seq:020}.{EXT}")),
                action: "fsync",
                error: e,
            })?;
        }
        Ok(())
    }

    /// Up to `max_records` records (and about `max_bytes`, at least one record) from the read
    /// position, oldest first, and the position after them. Does not move the read position.
    pub fn peek(
        &mut self,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<(Vec<ProduceRecord>, SpoolPos), SpoolError> {
        self.flush()?;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut pos = SpoolPos {
            seq: self.segments.front().map_or(0, |s| s.seq),
            offset: self.read_offset,
            consumed: self.read_consumed,
        };
        for (i, seg) in self.segments.iter().enumerate() {
            if out.len() >= max_records || bytes >= max_bytes {
                break;
            }
            let (start, consumed) = if i == 0 {
                (self.read_offset, self.read_consumed)
            } else {
                (0, 0)
            };
            if start >= seg.bytes {
                pos = SpoolPos {
                    seq: seg.seq,
                    offset: seg.bytes,
                    consumed: seg.records,
                };
                continue;
            }
            let path = self.path(seg.seq);
            let data = read_from(&path, start)?;
            let scan = parse_frames(&data, max_records - out.len(), max_bytes - bytes);
            bytes += scan.end;
            let n = scan.records.len() as u64;
            out.extend(scan.records);
            pos = SpoolPos {
                seq: seg.seq,
                offset: start + scan.end as u64,
                consumed: (consumed + n).min(seg.records),
            };
            if scan.end < data.len() {
                break; // stopped by a limit inside this segment
            }
        }
        Ok((out, pos))
    }

    /// Marks everything before `pos` as delivered; deletes segments that are done.
    pub fn ack(&mut self, pos: SpoolPos) -> Result<(), SpoolError> {
        let writing = self.writer.as_ref().map(|w| w.0);
        while let Some(front) = self.segments.front() {
            let done = front.seq < pos.seq || (front.seq == pos.seq && pos.offset >= front.bytes);
            if !done {
                if front.seq == pos.seq && pos.offset > self.read_offset {
                    self.read_offset = pos.offset;
                    self.read_consumed = pos.consumed;
                }
                break;
            }
            let seq = front.seq;
            self.segments.pop_front();
            self.read_offset = 0;
            self.read_consumed = 0;
            if Some(seq) == writing {
                self.writer = None;
            }
            let path = self.path(seq);
            fs::remove_file(&path).map_err(|e| SpoolError {
                path,
                action: "delete",
                error: e,
            })?;
        }
        Ok(())
    }
}

fn read_from(path: &Path, offset: u64) -> Result<Vec<u8>, SpoolError> {
    let err = |action, error| SpoolError {
        path: path.to_path_buf(),
        action,
        error,
    };
    let mut f = File::open(path).map_err(|e| err("open", e))?;
    f.seek(SeekFrom::Start(offset))
        .map_err(|e| err("seek", e))?;
    let mut data = Vec::new();
    f.read_to_end(&mut data).map_err(|e| err("read", e))?;
    Ok(data)
}

fn encode_frame(rec: &ProduceRecord) -> Vec<u8> {
    let mut payload = Vec::with_capacity(PAYLOAD_FIXED + rec.key.len() + rec.value.len());
    payload.push(VERSION);
    payload.extend_from_slice(&rec.timestamp_ms.to_le_bytes());
    payload.extend_from_slice(&(rec.key.len() as u32).to_le_bytes());
    payload.extend_from_slice(&rec.key);
    payload.extend_from_slice(&rec.value);
    let mut frame = Vec::with_capacity(HEADER + payload.len());
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
    frame.extend_from_slice(&payload);
    frame
}

/// The frame starting at `data[0]`, if a whole valid one does.
fn decode_frame(data: &[u8]) -> Option<(ProduceRecord, usize)> {
    if data.len() < HEADER + PAYLOAD_FIXED {
        return None;
    }
    let len = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) as usize;
    if !(PAYLOAD_FIXED..=MAX_RECORD + PAYLOAD_FIXED).contains(&len) || HEADER + len > data.len() {
        return None;
    }
    let payload = &data[HEADER..HEADER + len];
    // Cheap checks before the CRC, so scanning garbage for the next frame stays fast.
    if payload[0] != VERSION {
        return None;
    }
    let key_len = u32::from_le_bytes([payload[9], payload[10], payload[11], payload[12]]) as usize;
    if key_len > len - PAYLOAD_FIXED {
        return None;
    }
    let crc = u32::from_le_bytes([data[4], data[5], data[6], data[7]]);
    if crc32c::crc32c(payload) != crc {
        return None;
    }
    let mut ts = [0u8; 8];
    ts.copy_from_slice(&payload[1..9]);
    let key_end = PAYLOAD_FIXED + key_len;
    Some((
        ProduceRecord {
            key: payload[PAYLOAD_FIXED..key_end].to_vec(),
            value: payload[key_end..].to_vec(),
            timestamp_ms: i64::from_le_bytes(ts),
        },
        HEADER + len,
    ))
}

struct Scan {
    records: Vec<ProduceRecord>,
    /// Bytes consumed: up to the end of the last record taken, or the whole input when the
    /// scan ran to the end (including skipped garbage).
    end: usize,
    skipped: usize,
}

/// Reads frames until a limit or the end, skipping damaged bytes.
fn parse_frames(data: &[u8], max_records: usize, max_bytes: usize) -> Scan {
    let mut scan = Scan {
        records: Vec::new(),
        end: 0,
        skipped: 0,
    };
    let mut pos = 0;
    while pos < data.len() {
        if scan.records.len() >= max_records || (pos >= max_bytes && !scan.records.is_empty()) {
            scan.end = pos;
            return scan;
        }
        match decode_frame(&data[pos..]) {
            Some((rec, n)) => {
                scan.records.push(rec);
                pos += n;
            }
            None => {
                // Resync: the next offset where a whole valid frame starts.
                let next = (pos + 1..data.len())
                    .find(|&p| decode_frame(&data[p..]).is_some())
                    .unwrap_or(data.len());
                scan.skipped += next - pos;
                pos = next;
            }
        }
    }
    scan.end = data.len();
    scan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(i: usize) -> ProduceRecord {
        ProduceRecord {
            key: format!("target-{}", i % 7).into_bytes(),
            value: format!("{{\"check\":{i},\"pad\":\"{}\"}}", "x".repeat(i % 50)).into_bytes(),
            timestamp_ms: 1_700_000_000_000 + i as i64,
        }
    }

    struct Dir(PathBuf);
    impl Dir {
        fn new(tag: &str) -> Dir {
            let p =
                std::env::temp_dir().join(format!("sitewatch-spool-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&p);
            Dir(p)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn drain(s: &mut Spool) -> Vec<ProduceRecord> {
        let mut all = Vec::new();
        loop {
            let (recs, pos) = s.peek(37, 4096).unwrap();
            if recs.is_empty() {
                break;
            }
            all.extend(recs);
            s.ack(pos).unwrap();
        }
        all
    }

    fn segment_files(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn fifo_across_segments_and_restart() {
        let d = Dir::new("fifo");
        let mut s = Spool::open(&d.0, 1 << 20).unwrap();
        for i in 0..3000 {
            assert_eq!(s.append(&rec(i)).unwrap().dropped, 0);
        }
        assert_eq!(s.len(), 3000);
        assert!(segment_files(&d.0).len() > 1, "rolls segments");
        // Take some, then "crash" (drop without ack of the rest) and reopen.
        let (first, pos) = s.peek(100, usize::MAX).unwrap();
        assert_eq!(first, (0..100).map(rec).collect::<Vec<_>>());
        s.ack(pos).unwrap();
        assert_eq!(s.len(), 2900);
        s.sync().unwrap();
        drop(s);
        let mut s = Spool::open(&d.0, 1 << 20).unwrap();
        // The acked head of the first segment comes again (at-least-once); order holds.
        let all = drain(&mut s);
        let start = 3000 - all.len();
        assert!(start <= 100, "at most the acked head is replayed: {start}");
        assert_eq!(all, (start..3000).map(rec).collect::<Vec<_>>());
        assert!(s.is_empty());
        assert!(segment_files(&d.0).is_empty(), "acked segments deleted");
        // Appending after a full drain works and starts a new segment.
        s.append(&rec(5)).unwrap();
        assert_eq!(drain(&mut s), vec![rec(5)]);
    }

    /// `check(damage, expected records kept)`: 10 records in one segment, damaged by `damage`,
    /// reopened.
    fn check_recovery(tag: &str, damage: impl Fn(&mut Vec<u8>), expected: &[usize]) {
        let d = Dir::new(tag);
        let mut s = Spool::open(&d.0, 1 << 20).unwrap();
        for i in 0..10 {
            s.append(&rec(i)).unwrap();
        }
        s.sync().unwrap();
        drop(s);
        let file = segment_files(&d.0).pop().unwrap();
        let mut data = fs::read(&file).unwrap();
        damage(&mut data);
        fs::write(&file, &data).unwrap();
        let mut s = Spool::open(&d.0, 1 << 20).unwrap();
        assert_eq!(s.len(), expected.len() as u64, "{tag}");
        let got = drain(&mut s);
        assert_eq!(
            got,
            expected.iter().map(|&i| rec(i)).collect::<Vec<_>>(),
            "{tag}"
        );
    }

    fn frame_offsets() -> Vec<usize> {
        let mut offs = vec![0];
        for i in 0..10 {
            offs.push(offs[i] + encode_frame(&rec(i)).len());
        }
        offs
    }

    #[test]
    fn torn_tail_and_corrupt_frames_are_skipped() {
        let offs = frame_offsets();
        let all: Vec<usize> = (0..10).collect();
        // A torn last frame (crash mid-write): the nine before it survive.
        check_recovery("torn", |d| d.truncate(d.len() - 5), &all[..9]);
        // Only half a header left.
        check_recovery("torn-header", |d| d.truncate(offs[9] + 3), &all[..9]);
        // Trailing zeros (preallocated blocks after a crash).
        check_recovery("zeros", |d| d.extend([0u8; 100]), &all);
        // A flipped byte inside record 4's value: only record 4 is lost.
        let o = offs[4] + 30;
        check_recovery(
            "corrupt-middle",
            |d| d[o] ^= 0x55,
            &[0, 1, 2, 3, 5, 6, 7, 8, 9],
        );
        // A corrupt length field in record 2: resync finds record 3.
        let o = offs[2];
        check_recovery(
            "corrupt-length",
            |d| d[o..o + 4].copy_from_slice(&u32::MAX.to_le_bytes()),
            &[0, 1, 3, 4, 5, 6, 7, 8, 9],
        );
        // Garbage in front of everything.
        check_recovery(
            "garbage-head",
            |d| {
                let mut g = b"\x07garbage".to_vec();
                g.extend_from_slice(d);
                *d = g;
            },
            &all,
        );
    }

    #[test]
    fn full_spool_drops_oldest() {
        let d = Dir::new("full");
        // 64 KiB max → 64 KiB segments: the minimum, so it is full after about a segment.
        let mut s = Spool::open(&d.0, 64 * 1024).unwrap();
        let mut dropped = 0;
        let n = 5000;
        for i in 0..n {
            dropped += s.append(&rec(i)).unwrap().dropped;
        }
        assert!(dropped > 0);
        assert!(s.bytes() <= 64 * 1024, "{}", s.bytes());
        assert_eq!(s.len() + dropped, n as u64);
        // What is left is the newest, in order.
        let left = drain(&mut s);
        let start = n - left.len();
        assert_eq!(left, (start..n).map(rec).collect::<Vec<_>>());
    }

    #[test]
    fn oversized_record_is_refused() {
        let d = Dir::new("big");
        let mut s = Spool::open(&d.0, 1 << 30).unwrap();
        let big = ProduceRecord {
            key: b"k".to_vec(),
            value: vec![b'x'; MAX_RECORD + 10],
            timestamp_ms: 0,
        };
        let e = s.append(&big).unwrap_err().to_string();
        assert!(e.contains("that large"), "{e}");
        assert!(s.is_empty());
    }
}
