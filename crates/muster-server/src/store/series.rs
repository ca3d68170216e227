//! The metric series store: per run, per metric, the `(step, value)` points the run logged
//! (muster-core's [`Series`]), with the run's count of malformed lines and the last error.
//! Not the Raft log: points go to an append-only file per run under `<data>/metrics/`, and
//! a run's whole metrics log is sealed into a replicated blob when a rank of it ends
//! (`crate::effects::seal_metrics`), as logs are.
//!
//! Two byte streams feed a run's metrics, each per attempt and rank and each with the
//! resumable offsets of the log protocol: the run's `MUSTER_METRICS_FILE` (JSON lines the
//! agent ships as `MetricData`) and its log (stdout lines `##muster[metric] ...`, parsed
//! from the log bytes the leader already receives). A feed carries the offset it starts
//! at; overlaps are trimmed and a gap is answered with the offset to resume from, so after
//! a restart or a failover the agent resends what this server lacks, and no line is
//! counted twice. Incomplete last lines wait for their newline.
//!
//! The file of a run is a sequence of frames (`u32` little-endian length, then ops); one
//! frame is one feed: the names it introduced, its points, the malformed count, and the
//! stream's new position, so a crash mid-write loses (and later re-reads) a whole feed or
//! nothing. The sealed blob is the same format compacted into one frame (each series in
//! [`Series::encode`]'s ~9 bytes per point).
//!
//! Memory is bounded: runs are loaded on demand and the least recently used are dropped
//! (they stay on disk) beyond [`MAX_RUNS`] runs or [`MAX_POINTS`] points.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use muster_core::State;
use muster_core::metrics::{
    MAX_LINE_BYTES, MetricLineError, MetricPoint, MetricsLog, Series, parse_json_line,
    parse_stdout_line,
};
use muster_core::state::SealedMetrics;
use tokio::sync::watch;

use super::blobs::BlobStore;

/// At most this many runs' series are held in memory.
pub const MAX_RUNS: usize = 256;
/// At most this many runs are known in memory at all: beyond [`MAX_RUNS`] a run keeps only
/// what taking more points needs (stream positions, names, last steps: a few hundred bytes),
/// so many runs logging at once append to their files without reloading their series.
pub const MAX_ENTRIES: usize = 16_384;
/// At most about this many points are held in memory (16 bytes each), the most recently
/// used run always included.
pub const MAX_POINTS: usize = 4_000_000;

const OP_NAME: u8 = 1;
const OP_POINT: u8 = 2;
const OP_MALFORMED: u8 = 3;
const OP_STREAM: u8 = 4;
const OP_SERIES: u8 = 5;

/// Which bytes of a run feed its metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Stream {
    /// The `MUSTER_METRICS_FILE` of an attempt's rank (JSON lines).
    File {
        /// The attempt.
        attempt: u32,
        /// The rank.
        rank: u32,
    },
    /// The log of an attempt's rank (stdout metric lines; other lines are ignored).
    Stdout {
        /// The attempt.
        attempt: u32,
        /// The rank.
        rank: u32,
    },
}

impl Stream {
    fn parts(self) -> (u8, u32, u32) {
        match self {
            Stream::File { attempt, rank } => (0, attempt, rank),
            Stream::Stdout { attempt, rank } => (1, attempt, rank),
        }
    }

    fn from_parts(kind: u8, attempt: u32, rank: u32) -> Option<Stream> {
        match kind {
            0 => Some(Stream::File { attempt, rank }),
            1 => Some(Stream::Stdout { attempt, rank }),
            _ => None,
        }
    }
}

/// The result of a feed.
#[derive(Debug, PartialEq, Eq)]
pub enum Feed {
    /// Taken; the stream is now this long (complete lines plus a waiting partial line).
    Stored(u64),
    /// The data starts past what this server has: resend from this offset.
    Gap(u64),
}

#[derive(Debug, Default, Clone)]
struct Position {
    /// Bytes consumed as complete lines.
    consumed: u64,
    /// An incomplete last line, waiting for its newline (not persisted).
    partial: Vec<u8>,
    /// Inside an overlong line (already counted): skip to its newline.
    discarding: bool,
}

#[derive(Debug, Default)]
struct RunEntry {
    log: MetricsLog,
    /// The id of each name in this run's file.
    names: HashMap<String, u64>,
    streams: BTreeMap<Stream, Position>,
    /// Points plus malformed lines.
    lines: u64,
    /// Points held in `log` (none when hollow).
    points: usize,
    /// The series were dropped from memory (the file has them): taking points goes on,
    /// reading reloads.
    hollow: bool,
    /// The last step of each metric (a point without a step gets the next one).
    last_step: HashMap<String, u64>,
    file: Option<File>,
    used: u64,
}

#[derive(Debug, Default)]
struct Inner {
    runs: HashMap<String, RunEntry>,
    clock: u64,
    points: usize,
}

/// The series store (one per server).
#[derive(Debug)]
pub struct SeriesStore {
    root: PathBuf,
    state: Arc<RwLock<State>>,
    blobs: BlobStore,
    inner: Mutex<Inner>,
    changed: watch::Sender<u64>,
}

/// One frame being built.
#[derive(Default)]
struct Frame(Vec<u8>);

impl Frame {
    fn name(&mut self, name: &str) {
        self.0.push(OP_NAME);
        put_varint(&mut self.0, name.len() as u64);
        self.0.extend_from_slice(name.as_bytes());
    }
    fn point(&mut self, id: u64, step: u64, value: f64) {
        self.0.push(OP_POINT);
        put_varint(&mut self.0, id);
        put_varint(&mut self.0, step);
        self.0.extend_from_slice(&value.to_le_bytes());
    }
    fn malformed(&mut self, count: u64, last_error: Option<&str>) {
        self.0.push(OP_MALFORMED);
        put_varint(&mut self.0, count);
        let e = last_error.unwrap_or("");
        put_varint(&mut self.0, e.len() as u64);
        self.0.extend_from_slice(e.as_bytes());
    }
    fn stream(&mut self, s: Stream, p: &Position) {
        let (kind, attempt, rank) = s.parts();
        self.0.push(OP_STREAM);
        self.0.push(kind);
        put_varint(&mut self.0, attempt.into());
        put_varint(&mut self.0, rank.into());
        put_varint(&mut self.0, p.consumed);
        self.0.push(u8::from(p.discarding));
    }
    fn series(&mut self, id: u64, s: &Series) {
        let enc = s.encode();
        self.0.push(OP_SERIES);
        put_varint(&mut self.0, id);
        put_varint(&mut self.0, enc.len() as u64);
        self.0.extend_from_slice(&enc);
    }
    fn finish(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.0.len() + 4);
        out.extend_from_slice(&(self.0.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.0);
        out
    }
}

/// Decodes a run's file (or sealed blob): the entry and the length of its whole frames
/// (a torn last frame, from a crash mid-write, is left out).
fn decode(bytes: &[u8]) -> Result<(RunEntry, usize), String> {
    let mut e = RunEntry::default();
    let mut ids: Vec<String> = Vec::new();
    let mut at = 0usize;
    while let Some(head) = bytes.get(at..at + 4) {
        let len = u32::from_le_bytes(head.try_into().expect("4 bytes")) as usize;
        let Some(mut f) = bytes.get(at + 4..at + 4 + len) else {
            break;
        };
        while let Some((&op, rest)) = f.split_first() {
            f = rest;
            match op {
                OP_NAME => {
                    let n = get_varint(&mut f)? as usize;
                    let name = take(&mut f, n)?;
                    let name = String::from_utf8(name.to_vec()).map_err(|e| e.to_string())?;
                    e.names.insert(name.clone(), ids.len() as u64);
                    ids.push(name);
                }
                OP_POINT => {
                    let id = get_varint(&mut f)? as usize;
                    let step = get_varint(&mut f)?;
                    let v = f64::from_le_bytes(take(&mut f, 8)?.try_into().expect("8"));
                    let name = ids.get(id).ok_or("point of an unknown name")?;
                    e.log
                        .series
                        .entry(name.clone())
                        .or_default()
                        .push(Some(step), v);
                    e.last_step.insert(name.clone(), step);
                    e.points += 1;
                }
                OP_SERIES => {
                    let id = get_varint(&mut f)? as usize;
                    let n = get_varint(&mut f)? as usize;
                    let s = Series::decode(take(&mut f, n)?).map_err(|e| e.to_string())?;
                    let name = ids.get(id).ok_or("series of an unknown name")?;
                    let into = e.log.series.entry(name.clone()).or_default();
                    e.points += s.len();
                    for &(step, v) in s.points() {
                        into.push(Some(step), v);
                    }
                    if let Some((step, _)) = s.last() {
                        e.last_step.insert(name.clone(), step);
                    }
                }
                OP_MALFORMED => {
                    e.log.malformed = get_varint(&mut f)?;
                    let n = get_varint(&mut f)? as usize;
                    let err = take(&mut f, n)?;
                    e.log.last_error = (n > 0).then(|| String::from_utf8_lossy(err).into_owned());
                }
                OP_STREAM => {
                    let kind = take(&mut f, 1)?[0];
                    let attempt = get_varint(&mut f)? as u32;
                    let rank = get_varint(&mut f)? as u32;
                    let consumed = get_varint(&mut f)?;
                    let discarding = take(&mut f, 1)?[0] != 0;
                    let s = Stream::from_parts(kind, attempt, rank).ok_or("unknown stream")?;
                    e.streams.insert(
                        s,
                        Position {
                            consumed,
                            partial: Vec::new(),
                            discarding,
                        },
                    );
                }
                other => return Err(format!("unknown op {other}")),
            }
        }
        at += 4 + len;
    }
    e.lines = e.points as u64 + e.log.malformed;
    Ok((e, at))
}

fn take<'a>(f: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
    if f.len() < n {
        return Err("truncated".into());
    }
    let (a, b) = f.split_at(n);
    *f = b;
    Ok(a)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(bytes: &mut &[u8]) -> Result<u64, String> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = bytes.split_first().ok_or("truncated varint")?;
        *bytes = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("varint longer than 10 bytes".into())
}

impl RunEntry {
    fn id(&mut self, name: &str, frame: &mut Frame) -> u64 {
        if let Some(id) = self.names.get(name) {
            return *id;
        }
        let id = self.names.len() as u64;
        self.names.insert(name.to_string(), id);
        frame.name(name);
        id
    }

    fn note(
        &mut self,
        parsed: Result<Option<MetricPoint>, MetricLineError>,
        frame: &mut Frame,
        malformed: &mut bool,
    ) {
        match parsed {
            Ok(Some(p)) => {
                let id = self.id(&p.name, frame);
                // As `Series::push` numbers a point without a step.
                let step = p.step.unwrap_or_else(|| {
                    self.last_step
                        .get(&p.name)
                        .map_or(0, |s| s.saturating_add(1))
                });
                frame.point(id, step, p.value);
                if !self.hollow {
                    self.log
                        .series
                        .entry(p.name.clone())
                        .or_default()
                        .push(Some(step), p.value);
                    self.points += 1;
                }
                self.last_step.insert(p.name, step);
                self.lines += 1;
            }
            Ok(None) => {}
            Err(e) => {
                self.log.malformed += 1;
                self.log.last_error = Some(e.message);
                self.lines += 1;
                *malformed = true;
            }
        }
    }

    fn line(&mut self, stream: Stream, line: &[u8], frame: &mut Frame, malformed: &mut bool) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let text = String::from_utf8_lossy(line);
        match stream {
            Stream::File { .. } => self.note(parse_json_line(&text), frame, malformed),
            Stream::Stdout { .. } => {
                if let Some(parsed) = parse_stdout_line(&text) {
                    self.note(parsed.map(Some), frame, malformed);
                }
            }
        }
    }

    /// Takes new bytes of a stream (already trimmed to start where it ends); with `flush`,
    /// a last line without a newline counts as complete (the rank ended).
    fn take_bytes(&mut self, stream: Stream, data: &[u8], flush: bool) -> Vec<u8> {
        let mut frame = Frame::default();
        let mut malformed = false;
        let mut pos = self.streams.remove(&stream).unwrap_or_default();
        let mut rest = data;
        while !rest.is_empty() {
            match rest.iter().position(|b| *b == b'\n') {
                Some(i) => {
                    let (line, after) = (&rest[..i], &rest[i + 1..]);
                    pos.consumed += (pos.partial.len() + i + 1) as u64;
                    if pos.discarding {
                        pos.discarding = false;
                        pos.partial.clear();
                    } else if pos.partial.is_empty() {
                        self.line(stream, line, &mut frame, &mut malformed);
                    } else {
                        let mut whole = std::mem::take(&mut pos.partial);
                        whole.extend_from_slice(line);
                        self.line(stream, &whole, &mut frame, &mut malformed);
                    }
                    rest = after;
                }
                None => {
                    pos.partial.extend_from_slice(rest);
                    rest = &[];
                    if pos.discarding {
                        pos.consumed += pos.partial.len() as u64;
                        pos.partial.clear();
                    } else if pos.partial.len() > MAX_LINE_BYTES {
                        // An overlong line: judged (malformed if a metric line) once, the
                        // rest of it skipped up to its newline.
                        let whole = std::mem::take(&mut pos.partial);
                        pos.consumed += whole.len() as u64;
                        self.line(stream, &whole, &mut frame, &mut malformed);
                        pos.discarding = true;
                    }
                }
            }
        }
        if flush && !pos.partial.is_empty() {
            let whole = std::mem::take(&mut pos.partial);
            pos.consumed += whole.len() as u64;
            if !pos.discarding {
                self.line(stream, &whole, &mut frame, &mut malformed);
            }
        }
        if flush {
            pos.discarding = false;
        }
        if malformed {
            frame.malformed(self.log.malformed, self.log.last_error.as_deref());
        }
        frame.stream(stream, &pos);
        self.streams.insert(stream, pos);
        frame.finish()
    }

    /// The whole entry as one frame (the sealed form).
    fn compact(&self) -> Vec<u8> {
        let mut frame = Frame::default();
        let mut ids = BTreeMap::new();
        for (i, name) in self.log.series.keys().enumerate() {
            frame.name(name);
            ids.insert(name.as_str(), i as u64);
        }
        for (name, s) in &self.log.series {
            frame.series(ids[name.as_str()], s);
        }
        frame.malformed(self.log.malformed, self.log.last_error.as_deref());
        for (s, p) in &self.streams {
            let mut p = p.clone();
            p.consumed += p.partial.len() as u64;
            frame.stream(*s, &p);
        }
        frame.finish()
    }
}

impl SeriesStore {
    /// Opens (creating) the store under `root`; `state` and `blobs` let it load an ended
    /// run's metrics from its sealed blob when this server has no file of them.
    pub fn open(
        root: PathBuf,
        state: Arc<RwLock<State>>,
        blobs: BlobStore,
    ) -> io::Result<SeriesStore> {
        std::fs::create_dir_all(&root)?;
        Ok(SeriesStore {
            root,
            state,
            blobs,
            inner: Mutex::new(Inner::default()),
            changed: watch::channel(0).0,
        })
    }

    fn path(&self, run: &str) -> PathBuf {
        self.root.join(format!("{run}.metrics"))
    }

    /// A receiver that changes whenever any run's metrics change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The run's sealed metrics with the most lines, if any attempt has some.
    pub fn sealed(&self, run: &str) -> Option<SealedMetrics> {
        let state = self.state.read().expect("state lock");
        state
            .runs
            .get(run)?
            .attempts
            .iter()
            .filter_map(|a| a.metrics.clone())
            .max_by_key(|m| m.lines)
    }

    /// Runs `f` on a run's entry, loading it first (from its file, or from its sealed
    /// blob when that is local and holds more), and drops the least recently used runs
    /// beyond the memory bounds.
    /// With `full`, the run's series are loaded too (a hollow run is reloaded).
    fn with_entry<R>(
        &self,
        run: &str,
        full: bool,
        f: impl FnOnce(&mut RunEntry, &Path) -> R,
    ) -> io::Result<R> {
        let sealed = self.sealed(run);
        let mut inner = self.inner.lock().expect("series lock");
        inner.clock += 1;
        let clock = inner.clock;
        let stale = match (inner.runs.get(run), &sealed) {
            (Some(e), _) if full && e.hollow => true,
            (Some(e), Some(s)) => e.lines < s.lines && self.blobs.has(&s.sha256),
            (Some(_), None) => false,
            (None, _) => true,
        };
        if stale {
            let old = inner.runs.remove(run);
            let mut entry = self.load(run, sealed.as_ref())?;
            if let Some(old) = old {
                inner.points -= old.points;
                // Waiting partial lines are not in the file: keep them.
                for (s, p) in old.streams {
                    if let Some(q) = entry.streams.get_mut(&s)
                        && q.consumed == p.consumed
                    {
                        *q = p;
                    }
                }
            }
            inner.points += entry.points;
            inner.runs.insert(run.to_string(), entry);
        }
        let path = self.path(run);
        let entry = inner.runs.get_mut(run).expect("loaded above");
        entry.used = clock;
        let before = entry.points;
        let r = f(entry, &path);
        let after = entry.points;
        inner.points = inner.points + after - before;
        self.evict(&mut inner, run);
        Ok(r)
    }

    fn load(&self, run: &str, sealed: Option<&SealedMetrics>) -> io::Result<RunEntry> {
        let path = self.path(run);
        let mut bytes = Vec::new();
        match File::open(&path) {
            Ok(mut f) => {
                f.read_to_end(&mut bytes)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let (mut entry, good) = decode(&bytes).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        })?;
        if let Some(s) = sealed
            && entry.lines < s.lines
            && self.blobs.has(&s.sha256)
        {
            // The sealed blob (from whichever leader took the run's metrics) holds more
            // than this server's file: it replaces the file.
            let blob = self.blobs.get(&s.sha256).map_err(io::Error::other)?;
            let (from_blob, n) = decode(&blob).map_err(|e| {
                io::Error::new(io::ErrorKind::InvalidData, format!("sealed metrics: {e}"))
            })?;
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, &blob[..n])?;
            std::fs::rename(&tmp, &path)?;
            return Ok(from_blob);
        }
        if good < bytes.len() {
            // A torn last frame (a crash mid-write): drop it; its bytes are fed again.
            OpenOptions::new()
                .write(true)
                .open(&path)?
                .set_len(good as u64)?;
        }
        entry.file = None;
        Ok(entry)
    }

    fn evict(&self, inner: &mut Inner, keep: &str) {
        // Least recently used runs first give up their series (they stay on disk)...
        loop {
            let full = inner.runs.values().filter(|e| !e.hollow).count();
            if full <= MAX_RUNS && (inner.points <= MAX_POINTS || full <= 1) {
                break;
            }
            let Some(victim) = inner
                .runs
                .iter_mut()
                .filter(|(k, e)| !e.hollow && k.as_str() != keep)
                .min_by_key(|(_, e)| e.used)
                .map(|(_, e)| e)
            else {
                break;
            };
            let freed = victim.points;
            victim.log.series = BTreeMap::new();
            victim.points = 0;
            victim.hollow = true;
            inner.points -= freed;
        }
        // ...then, beyond MAX_ENTRIES, are forgotten (a waiting partial line is resent).
        while inner.runs.len() > MAX_ENTRIES {
            let Some(victim) = inner
                .runs
                .iter()
                .filter(|(k, _)| k.as_str() != keep)
                .min_by_key(|(_, e)| e.used)
                .map(|(k, _)| k.clone())
            else {
                return;
            };
            if let Some(e) = inner.runs.remove(&victim) {
                inner.points -= e.points;
            }
        }
    }

    /// Where a stream's bytes end on this server (complete lines and a waiting partial
    /// line): the offset to resume it from.
    pub fn stream_len(&self, run: &str, stream: Stream) -> io::Result<u64> {
        self.with_entry(run, false, |e, _| {
            e.streams
                .get(&stream)
                .map_or(0, |p| p.consumed + p.partial.len() as u64)
        })
    }

    /// Feeds a stream's bytes, which start at `offset`.
    pub fn feed(&self, run: &str, stream: Stream, offset: u64, data: &[u8]) -> io::Result<Feed> {
        self.feed_inner(run, stream, offset, data, false)
    }

    /// The rank ended and its stream is complete: a last line without a newline counts.
    pub fn finish(&self, run: &str, stream: Stream) -> io::Result<()> {
        let len = self.stream_len(run, stream)?;
        self.feed_inner(run, stream, len, &[], true).map(|_| ())
    }

    fn feed_inner(
        &self,
        run: &str,
        stream: Stream,
        offset: u64,
        data: &[u8],
        flush: bool,
    ) -> io::Result<Feed> {
        let r = self.with_entry(run, false, |e, path| -> io::Result<Feed> {
            let pos = e.streams.get(&stream).cloned().unwrap_or_default();
            let have = pos.consumed + pos.partial.len() as u64;
            if offset > have {
                return Ok(Feed::Gap(have));
            }
            let skip = (have - offset) as usize;
            let flushing = flush && !pos.partial.is_empty();
            if skip >= data.len() && !flushing {
                return Ok(Feed::Stored(have));
            }
            let new = data.get(skip..).unwrap_or(&[]);
            let frame = e.take_bytes(stream, new, flush);
            if e.file.is_none() {
                e.file = Some(OpenOptions::new().create(true).append(true).open(path)?);
            }
            e.file.as_mut().expect("opened").write_all(&frame)?;
            Ok(Feed::Stored(have + new.len() as u64))
        })??;
        self.changed.send_modify(|n| *n += 1);
        Ok(r)
    }

    /// One metric's series of a run (`None`: the run logged no such metric here).
    pub fn series(&self, run_id: &str, name: &str) -> Option<Series> {
        self.with_entry(run_id, true, |e, _| e.log.series.get(name).cloned())
            .ok()
            .flatten()
    }

    /// The last value of each metric of a run.
    pub fn last_values(&self, run_id: &str) -> BTreeMap<String, f64> {
        self.with_entry(run_id, true, |e, _| {
            e.log
                .last_values()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect()
        })
        .unwrap_or_default()
    }

    /// Runs `f` on a run's whole metrics log (keep it short: the store is locked).
    pub fn with_log<R>(&self, run_id: &str, f: impl FnOnce(&MetricsLog) -> R) -> io::Result<R> {
        self.with_entry(run_id, true, |e, _| f(&e.log))
    }

    /// The run's metrics in the sealed form, with the lines it accounts for; `None` when
    /// the run logged nothing (no line at all).
    pub fn compact(&self, run_id: &str) -> io::Result<Option<(Vec<u8>, u64)>> {
        self.with_entry(run_id, true, |e, _| {
            (e.lines > 0 || !e.streams.is_empty()).then(|| (e.compact(), e.lines))
        })
    }

    /// Runs whose series are held in memory now, and their points.
    pub fn resident(&self) -> (usize, usize) {
        let inner = self.inner.lock().expect("series lock");
        (
            inner.runs.values().filter(|e| !e.hollow).count(),
            inner.points,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &Path) -> SeriesStore {
        let blobs = BlobStore::open(dir.join("blobs")).unwrap();
        SeriesStore::open(dir.join("metrics"), Default::default(), blobs).unwrap()
    }

    const FILE: Stream = Stream::File {
        attempt: 1,
        rank: 0,
    };
    const OUT: Stream = Stream::Stdout {
        attempt: 1,
        rank: 0,
    };

    #[test]
    fn feeds_trim_overlaps_wait_for_newlines_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let a = b"{\"name\":\"loss\",\"value\":0.5,\"step\":1}\n{\"name\":\"loss\",\"val";
        assert_eq!(
            s.feed("r", FILE, 0, a).unwrap(),
            Feed::Stored(a.len() as u64)
        );
        assert_eq!(s.series("r", "loss").unwrap().points(), &[(1, 0.5)]);
        // A retransmission overlapping what is here adds nothing; a gap is refused.
        assert_eq!(
            s.feed("r", FILE, 0, &a[..10]).unwrap(),
            Feed::Stored(a.len() as u64)
        );
        assert_eq!(
            s.feed("r", FILE, 999, b"x").unwrap(),
            Feed::Gap(a.len() as u64)
        );
        let b = b"ue\":0.25}\nnot json\n";
        s.feed("r", FILE, a.len() as u64, b).unwrap();
        let out = b"hello\n##muster[metric] name=acc value=0.9 step=3\n##muster[metric] oops\n##muster[metric] name=acc value=1";
        s.feed("r", OUT, 0, out).unwrap();
        assert_eq!(
            s.series("r", "loss").unwrap().points(),
            &[(1, 0.5), (2, 0.25)]
        );
        assert_eq!(s.series("r", "acc").unwrap().points(), &[(3, 0.9)]);
        s.finish("r", OUT).unwrap();
        assert_eq!(
            s.series("r", "acc").unwrap().points(),
            &[(3, 0.9), (4, 1.0)]
        );
        let (malformed, err) = s
            .with_log("r", |l| (l.malformed, l.last_error.clone()))
            .unwrap();
        assert_eq!(malformed, 2);
        assert!(err.is_some());
        let last = s.last_values("r");
        assert_eq!(last["loss"], 0.25);
        assert_eq!(last["acc"], 1.0);

        // A new store over the same files: the same points, streams resume where they were.
        let (compact, lines) = s.compact("r").unwrap().unwrap();
        assert_eq!(lines, 6);
        drop(s);
        let s = store(dir.path());
        assert_eq!(
            s.series("r", "loss").unwrap().points(),
            &[(1, 0.5), (2, 0.25)]
        );
        assert_eq!(s.stream_len("r", FILE).unwrap(), (a.len() + b.len()) as u64);
        assert_eq!(s.with_log("r", |l| l.malformed).unwrap(), 2);
        // The compact form decodes to the same metrics.
        let (e, n) = decode(&compact).unwrap();
        assert_eq!(n, compact.len());
        assert_eq!(e.log, s.with_log("r", Clone::clone).unwrap());
        assert_eq!(e.streams[&FILE].consumed, (a.len() + b.len()) as u64);
    }

    #[test]
    fn a_torn_frame_is_dropped_and_fed_again() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let line = |v: u32| format!("{{\"name\":\"a\",\"value\":{v}}}\n").into_bytes();
        let n = line(1).len() as u64;
        s.feed("r", FILE, 0, &line(1)).unwrap();
        s.feed("r", FILE, n, &line(2)).unwrap();
        drop(s);
        let path = dir.path().join("metrics/r.metrics");
        let len = std::fs::metadata(&path).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 3)
            .unwrap();
        let s = store(dir.path());
        assert_eq!(s.series("r", "a").unwrap().len(), 1);
        assert_eq!(s.stream_len("r", FILE).unwrap(), n);
        s.feed("r", FILE, n, &line(2)).unwrap();
        assert_eq!(
            s.series("r", "a").unwrap().values().collect::<Vec<_>>(),
            [1.0, 2.0]
        );
    }

    #[test]
    fn overlong_lines_count_once_and_memory_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let long = vec![b'x'; MAX_LINE_BYTES + 10];
        s.feed("r", FILE, 0, &long).unwrap();
        s.feed(
            "r",
            FILE,
            long.len() as u64,
            b"yyy\n{\"name\":\"a\",\"value\":1}\n",
        )
        .unwrap();
        assert_eq!(s.with_log("r", |l| l.malformed).unwrap(), 1);
        assert_eq!(s.series("r", "a").unwrap().len(), 1);
        for i in 0..MAX_RUNS + 10 {
            s.feed(
                &format!("run{i}"),
                FILE,
                0,
                b"{\"name\":\"a\",\"value\":1}\n",
            )
            .unwrap();
        }
        assert!(s.resident().0 <= MAX_RUNS);
        // A run whose series were dropped still takes points (a step-less one numbered
        // after the last) and keeps a waiting partial line; reading reloads it from disk.
        let line = b"{\"name\":\"a\",\"value\":1}\n";
        let n = line.len() as u64;
        assert_eq!(s.stream_len("run0", FILE).unwrap(), n);
        let partial = b"{\"name\":\"a\",";
        let k = partial.len() as u64;
        s.feed("run0", FILE, n, b"{\"name\":\"a\",\"value\":2}\n")
            .unwrap();
        s.feed("run0", FILE, 2 * n, partial).unwrap();
        assert_eq!(s.stream_len("run0", FILE).unwrap(), 2 * n + k);
        assert!(s.resident().0 <= MAX_RUNS);
        assert_eq!(
            s.series("run0", "a").unwrap().points(),
            &[(0, 1.0), (1, 2.0)]
        );
        s.feed("run0", FILE, 2 * n + k, b"\"value\":3}\n").unwrap();
        assert_eq!(
            s.series("run0", "a").unwrap().points(),
            &[(0, 1.0), (1, 2.0), (2, 3.0)]
        );
        assert_eq!(s.series("r", "a").unwrap().len(), 1);
    }
}
