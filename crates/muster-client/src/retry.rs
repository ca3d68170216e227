//! Sending a request again while the answer may change: a bounded exponential backoff
//! (`backon`), and only for errors [`ClientError::is_retryable`] calls retryable. A fatal
//! error is returned after one try.

use std::future::Future;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};

use crate::ClientError;

/// How often and how fast a retryable call is sent again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The wait before the first retry; each next wait doubles.
    pub first_delay: Duration,
    /// The longest wait between two tries.
    pub max_delay: Duration,
    /// Tries after the first (0: never retried).
    pub max_retries: usize,
}

impl RetryPolicy {
    /// A submission while the cluster elects a leader: 4 more tries, 200 ms apart and
    /// doubling (3 s in all, about one election).
    pub const SUBMISSION: RetryPolicy = RetryPolicy {
        first_delay: Duration::from_millis(200),
        max_delay: Duration::from_secs(60),
        max_retries: 4,
    };

    /// Sent once, never again.
    pub const NEVER: RetryPolicy = RetryPolicy {
        first_delay: Duration::ZERO,
        max_delay: Duration::ZERO,
        max_retries: 0,
    };

    /// The policy as a `backon` builder.
    pub fn backoff(&self) -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_min_delay(self.first_delay)
            .with_max_delay(self.max_delay)
            .with_max_times(self.max_retries)
    }
}

impl Default for RetryPolicy {
    fn default() -> RetryPolicy {
        RetryPolicy::SUBMISSION
    }
}

/// Runs `op` until it succeeds, fails fatally, or `policy` runs out of retries; the error
/// is the last one.
pub async fn retry<T, F, Fut>(policy: &RetryPolicy, op: F) -> Result<T, ClientError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ClientError>>,
{
    op.retry(policy.backoff())
        .when(ClientError::is_retryable)
        .await
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    const FAST: RetryPolicy = RetryPolicy {
        first_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(2),
        max_retries: 3,
    };

    #[tokio::test]
    async fn a_retryable_error_is_retried_a_bounded_number_of_times() {
        let calls = AtomicU32::new(0);
        let err = retry(&FAST, || {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>(ClientError::status(tonic::Status::unavailable("no leader"))) }
        })
        .await
        .unwrap_err();
        assert_eq!(
            (err.to_string(), calls.load(Ordering::SeqCst)),
            ("no leader".into(), 1 + FAST.max_retries as u32)
        );
    }

    #[tokio::test]
    async fn a_fatal_error_is_not_retried() {
        let calls = AtomicU32::new(0);
        let err = retry(&FAST, || {
            calls.fetch_add(1, Ordering::SeqCst);
            async {
                Err::<(), _>(ClientError::status(tonic::Status::permission_denied(
                    "not yours",
                )))
            }
        })
        .await
        .unwrap_err();
        assert_eq!(err.code(), Some(tonic::Code::PermissionDenied));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_retry_that_lands_returns_its_answer() {
        let calls = AtomicU32::new(0);
        let got = retry(&FAST, || {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < 2 {
                    Err(ClientError::Unreachable {
                        tried: "http://127.0.0.1:1 (refused)".into(),
                    })
                } else {
                    Ok(n)
                }
            }
        })
        .await
        .unwrap();
        assert_eq!((got, calls.load(Ordering::SeqCst)), (2, 3));
    }

    #[tokio::test]
    async fn never_sends_once() {
        let calls = AtomicU32::new(0);
        let _ = retry(&RetryPolicy::NEVER, || {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>(ClientError::status(tonic::Status::unavailable("down"))) }
        })
        .await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
