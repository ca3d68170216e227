//! Per-caller upload limits: how many uploads one token may have open at once, and how
//! fast its uploads may go together (a token bucket; an upload past the rate is paced,
//! not failed). Servers copying blobs to their peers are not limited (replication must
//! not fall behind a user); users and agents are, each token on its own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::Status;

/// The limits, from `ServerConfig`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct UploadLimits {
    /// Uploads one caller may have open at once.
    pub concurrent: u32,
    /// Bytes per second one caller's uploads may add up to (0: no limit).
    pub bytes_per_sec: u64,
    /// How far ahead of the rate a caller may go (the bucket's size).
    pub burst_bytes: u64,
}

#[derive(Debug)]
struct Bucket {
    open: u32,
    tokens: f64,
    at: Instant,
}

/// The state of every caller's uploads.
#[derive(Debug)]
pub(crate) struct Uploads {
    limits: UploadLimits,
    callers: Mutex<HashMap<String, Bucket>>,
}

/// An open upload's slot; dropping it frees the slot.
#[derive(Debug)]
pub(crate) struct Slot {
    uploads: Arc<Uploads>,
    caller: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut callers = self.uploads.callers.lock().expect("uploads lock");
        if let Some(b) = callers.get_mut(&self.caller) {
            b.open = b.open.saturating_sub(1);
        }
    }
}

impl Uploads {
    /// No upload open yet.
    pub fn new(limits: UploadLimits) -> Arc<Uploads> {
        Arc::new(Uploads {
            limits,
            callers: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for one more upload of `caller`, or RESOURCE_EXHAUSTED naming the limit.
    pub fn open(self: &Arc<Self>, caller: &str) -> Result<Slot, Status> {
        let mut callers = self.callers.lock().expect("uploads lock");
        let bucket = callers.entry(caller.to_string()).or_insert(Bucket {
            open: 0,
            tokens: self.limits.burst_bytes as f64,
            at: Instant::now(),
        });
        if bucket.open >= self.limits.concurrent {
            return Err(Status::resource_exhausted(format!(
                "{caller} already has {} uploads open, the most one caller may (--max-uploads-per-caller): wait for one to finish",
                bucket.open
            )));
        }
        bucket.open += 1;
        Ok(Slot {
            uploads: self.clone(),
            caller: caller.to_string(),
        })
    }

    /// How long `slot`'s caller must wait before sending `bytes` more, to stay within the
    /// rate; takes the bytes from the bucket.
    pub fn pace(&self, slot: &Slot, bytes: u64) -> Duration {
        if self.limits.bytes_per_sec == 0 {
            return Duration::ZERO;
        }
        let mut callers = self.callers.lock().expect("uploads lock");
        let Some(b) = callers.get_mut(&slot.caller) else {
            return Duration::ZERO;
        };
        let now = Instant::now();
        let rate = self.limits.bytes_per_sec as f64;
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * rate)
            .min(self.limits.burst_bytes as f64);
        b.at = now;
        b.tokens -= bytes as f64;
        if b.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-b.tokens / rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(concurrent: u32, rate: u64, burst: u64) -> UploadLimits {
        UploadLimits {
            concurrent,
            bytes_per_sec: rate,
            burst_bytes: burst,
        }
    }

    #[test]
    fn a_caller_has_at_most_its_uploads_open_and_a_closed_one_frees_its_slot() {
        let u = Uploads::new(limits(2, 0, 0));
        let a = u.open("user:alice").unwrap();
        let _b = u.open("user:alice").unwrap();
        let err = u.open("user:alice").unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert!(
            err.message().contains("already has 2 uploads open"),
            "{err:?}"
        );
        // Another caller is not affected.
        let _c = u.open("user:bob").unwrap();
        drop(a);
        assert!(u.open("user:alice").is_ok());
    }

    #[test]
    fn uploads_past_the_burst_are_paced_to_the_rate() {
        let u = Uploads::new(limits(4, 1_000_000, 2_000_000));
        let slot = u.open("agent:n1").unwrap();
        assert_eq!(u.pace(&slot, 1_500_000), Duration::ZERO, "within the burst");
        let wait = u.pace(&slot, 1_500_000);
        // 1 MB over the bucket at 1 MB/s: about a second.
        assert!(
            wait > Duration::from_millis(900) && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        let unlimited = Uploads::new(limits(4, 0, 0));
        let s = unlimited.open("x").unwrap();
        assert_eq!(unlimited.pace(&s, u64::MAX / 2), Duration::ZERO);
    }
}
