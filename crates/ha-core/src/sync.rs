//! [`lock`]: taking a std mutex whose data every holder leaves consistent.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `mutex`, ignoring poisoning: for data that every critical section leaves whole even
/// if it panics halfway, so a panic elsewhere must not spread to every later user.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
