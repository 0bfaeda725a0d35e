//! `EventBus`: a cloneable broadcast channel of [`HaEvent`]s that never blocks its publishers.

use tokio::sync::broadcast;

use crate::event::HaEvent;
use crate::metric;

/// The number of events a subscriber may fall behind before it starts missing some.
pub const DEFAULT_CAPACITY: usize = 1024;

/// A cloneable handle to the event bus.
///
/// Publishing never waits: the bus keeps the newest `capacity` events, and a subscriber that
/// falls further behind is told how many it missed ([`RecvError::Lagged`]) and then continues
/// with the oldest event still kept. A slow dashboard can therefore never stall a failover.
#[derive(Clone, Debug)]
pub struct EventBus {
    sender: broadcast::Sender<HaEvent>,
}

impl EventBus {
    /// A bus that keeps at least the newest `capacity` events for slow subscribers (the
    /// buffer may be rounded up to a power of two).
    ///
    /// # Panics
    /// If `capacity` is zero (a bus that keeps nothing cannot deliver anything).
    pub fn new(capacity: usize) -> Self {
        assert!(capacity > 0, "EventBus capacity must be at least 1");
        let (sender, _) = broadcast::channel(capacity);
        Self { sender }
    }

    /// Sends `event` to every current subscriber and returns how many there are.
    ///
    /// Never blocks and never fails: with no subscribers the event is dropped (and counted in
    /// the `ha_events_published_total` metric like any other).
    pub fn publish(&self, event: HaEvent) -> usize {
        let name = event.name();
        tracing::debug!(event = name, node = %event.node(), "publish");
        metrics::counter!(metric::EVENTS_PUBLISHED_TOTAL, "event" => name).increment(1);
        self.sender.send(event).unwrap_or(0)
    }

    /// A new subscriber that receives every event published from now on.
    pub fn subscribe(&self) -> EventSubscriber {
        EventSubscriber {
            receiver: self.sender.subscribe(),
        }
    }

    /// How many subscribers are listening.
    pub fn subscriber_count(&self) -> usize {
        self.sender.receiver_count()
    }
}

impl Default for EventBus {
    fn default() -> Self {
        Self::new(DEFAULT_CAPACITY)
    }
}

/// Why [`EventSubscriber::recv`] returned no event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecvError {
    /// This subscriber fell behind and `missed` events were dropped for it; the next call
    /// returns the oldest event still kept.
    #[error("event subscriber lagged and missed {missed} events")]
    Lagged {
        /// How many events this subscriber will never see.
        missed: u64,
    },
    /// Every [`EventBus`] handle was dropped and all kept events were received.
    #[error("event bus closed")]
    Closed,
}

/// Why [`EventSubscriber::try_recv`] returned no event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TryRecvError {
    /// No event is waiting.
    #[error("no event waiting")]
    Empty,
    /// As [`RecvError::Lagged`].
    #[error("event subscriber lagged and missed {missed} events")]
    Lagged {
        /// How many events this subscriber will never see.
        missed: u64,
    },
    /// As [`RecvError::Closed`].
    #[error("event bus closed")]
    Closed,
}

/// One subscription to an [`EventBus`].
#[derive(Debug)]
pub struct EventSubscriber {
    receiver: broadcast::Receiver<HaEvent>,
}

impl EventSubscriber {
    /// Waits for the next event.
    pub async fn recv(&mut self) -> Result<HaEvent, RecvError> {
        match self.receiver.recv().await {
            Ok(event) => Ok(event),
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                note_lag(missed);
                Err(RecvError::Lagged { missed })
            }
            Err(broadcast::error::RecvError::Closed) => Err(RecvError::Closed),
        }
    }

    /// Takes the next event if one is waiting.
    pub fn try_recv(&mut self) -> Result<HaEvent, TryRecvError> {
        match self.receiver.try_recv() {
            Ok(event) => Ok(event),
            Err(broadcast::error::TryRecvError::Empty) => Err(TryRecvError::Empty),
            Err(broadcast::error::TryRecvError::Lagged(missed)) => {
                note_lag(missed);
                Err(TryRecvError::Lagged { missed })
            }
            Err(broadcast::error::TryRecvError::Closed) => Err(TryRecvError::Closed),
        }
    }
}

fn note_lag(missed: u64) {
    tracing::warn!(missed, "event subscriber lagged; events dropped for it");
    metrics::counter!(metric::EVENTS_MISSED_TOTAL).increment(missed);
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use proptest::prelude::*;

    use super::*;
    use crate::id::NodeId;
    use crate::status::Status;

    fn event(n: usize) -> HaEvent {
        HaEvent::HealthChanged {
            at: SystemTime::now(),
            node: NodeId::new("n"),
            component: format!("c{n}"),
            from: Status::Healthy,
            to: Status::Degraded,
            cause: None,
        }
    }

    fn component(e: &HaEvent) -> &str {
        match e {
            HaEvent::HealthChanged { component, .. } => component,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn every_subscriber_gets_every_event_in_order() {
        let bus = EventBus::new(16);
        let mut a = bus.subscribe();
        let mut b = bus.clone().subscribe();
        assert_eq!(bus.publish(event(1)), 2);
        bus.publish(event(2));
        for sub in [&mut a, &mut b] {
            assert_eq!(component(&sub.recv().await.unwrap()), "c1");
            assert_eq!(component(&sub.recv().await.unwrap()), "c2");
            assert_eq!(sub.try_recv(), Err(TryRecvError::Empty));
        }
    }

    #[tokio::test]
    async fn lagging_subscriber_learns_how_many_it_missed_then_continues() {
        let bus = EventBus::new(4);
        let mut slow = bus.subscribe();
        for n in 0..10 {
            bus.publish(event(n));
        }
        assert_eq!(slow.recv().await, Err(RecvError::Lagged { missed: 6 }));
        for n in 6..10 {
            assert_eq!(component(&slow.recv().await.unwrap()), format!("c{n}"));
        }
    }

    #[test]
    fn publisher_never_blocks_on_a_subscriber_that_never_reads() {
        // If publish could wait for room, this would hang: capacity 1, one idle subscriber.
        let bus = EventBus::new(1);
        let _idle = bus.subscribe();
        for n in 0..100_000 {
            assert_eq!(bus.publish(event(n)), 1);
        }
    }

    #[test]
    fn publishing_without_subscribers_is_fine() {
        assert_eq!(EventBus::default().publish(event(0)), 0);
    }

    #[tokio::test]
    async fn closed_after_the_last_handle_is_dropped() {
        let bus = EventBus::new(4);
        let mut sub = bus.subscribe();
        bus.publish(event(0));
        drop(bus);
        assert!(sub.recv().await.is_ok(), "kept events are still delivered");
        assert_eq!(sub.recv().await, Err(RecvError::Closed));
    }

    proptest! {
        #[test]
        fn received_plus_missed_equals_published(capacity in 1usize..32, published in 0usize..200) {
            let bus = EventBus::new(capacity);
            let mut sub = bus.subscribe();
            for n in 0..published {
                bus.publish(event(n));
            }
            drop(bus);
            let (mut received, mut missed, mut last) = (0u64, 0u64, None::<usize>);
            loop {
                match sub.try_recv() {
                    Ok(e) => {
                        let n: usize = component(&e)[1..].parse().unwrap();
                        // Order is kept: indices strictly increase.
                        prop_assert!(last.is_none_or(|l| n > l));
                        last = Some(n);
                        received += 1;
                    }
                    Err(TryRecvError::Lagged { missed: m }) => missed += m,
                    Err(TryRecvError::Closed) => break,
                    Err(TryRecvError::Empty) => prop_assert!(false, "bus dropped, yet empty"),
                }
            }
            prop_assert_eq!(received + missed, published as u64);
            // At least `capacity` newest events are kept (tokio may round the buffer up).
            prop_assert!(received >= published.min(capacity) as u64);
        }
    }
}
