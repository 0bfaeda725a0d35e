//! The conformance suite against the in-memory store.

ha_election::lease_store_conformance!(async { (ha_election::MemoryLeaseStore::new(), ()) });
