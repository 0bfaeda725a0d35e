//! Shared vocabulary (being written).
