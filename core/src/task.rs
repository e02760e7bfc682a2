//! [`AbortOnDrop`]: a background task that ends with its owner.

use tokio::task::JoinHandle;

/// Aborts the task when dropped.
#[derive(Debug)]
pub struct AbortOnDrop(pub JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
