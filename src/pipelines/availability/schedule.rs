//! The slot grid: site `s` is checked at `scheduled_at = offset(s) + k * interval` (epoch ms), never "sleep
//! after the check", so a slow check never shifts the later ones. A slot that comes while the previous check
//! is still running yields a `missed` result for that slot instead of a late check.
//!
//! The offset spreads sites over the interval (a hash of the site id), so a thousand sites at 30 s do not
//! all fire at :00.

use std::future::Future;
use std::time::Duration;

/// One site's grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grid {
    /// Where in the interval the site's slots fall, in ms.
    pub offset_ms: u64,
    /// The interval, in ms (at least 1).
    pub interval_ms: u64,
}

impl Grid {
    /// The grid of site `id` at `interval`.
    pub fn new(id: u64, interval: Duration) -> Grid {
        let interval_ms = (interval.as_millis() as u64).max(1);
        // splitmix64: the same id lands at the same offset in every checker.
        let mut z = id.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Grid {
            offset_ms: z % interval_ms,
            interval_ms,
        }
    }

    /// The first slot at or after `t_ms`.
    pub fn first_at_or_after(&self, t_ms: u64) -> u64 {
        let base = t_ms.saturating_sub(self.offset_ms);
        let k = base.div_ceil(self.interval_ms);
        self.offset_ms + k * self.interval_ms
    }
}

/// What became of one slot.
#[derive(Debug)]
pub enum Slot<T> {
    /// The check ran and found this.
    Checked(u64, T),
    /// The previous check was still running when the slot came.
    Missed(u64),
}

/// Runs site checks on `grid` until `stop` resolves: `now_ms` is the epoch clock, `check(slot)` one check,
/// `emit` each slot's result in slot order. Time is tokio's, so a paused clock drives it in tests.
pub async fn run<T, C, F>(
    grid: Grid,
    now_ms: impl Fn() -> u64,
    mut check: C,
    mut emit: impl FnMut(Slot<T>),
    stop: impl Future<Output = ()>,
) where
    T: Send + 'static,
    C: FnMut(u64) -> F,
    F: Future<Output = T> + Send + 'static,
{
    tokio::pin!(stop);
    // Epoch ms and tokio's instant at one moment: a slot's instant is derived from its epoch time, so the
    // grid never accumulates error from sleeps.
    let (epoch0, instant0) = (now_ms(), tokio::time::Instant::now());
    let at = |slot: u64| instant0 + Duration::from_millis(slot.saturating_sub(epoch0));
    let mut slot = grid.first_at_or_after(epoch0);
    let mut running: Option<(u64, tokio::task::JoinHandle<T>)> = None;
    loop {
        tokio::select! {
            () = &mut stop => break,
            () = tokio::time::sleep_until(at(slot)) => {}
        }
        if let Some((started, handle)) = running.take() {
            if handle.is_finished() {
                if let Ok(t) = handle.await {
                    emit(Slot::Checked(started, t));
                }
            } else {
                emit(Slot::Missed(slot));
                running = Some((started, handle));
                slot += grid.interval_ms;
                continue;
            }
        }
        running = Some((slot, tokio::spawn(check(slot))));
        slot += grid.interval_ms;
    }
    if let Some((started, handle)) = running {
        if let Ok(t) = handle.await {
            emit(Slot::Checked(started, t));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_offset_plus_k_intervals() {
        let g = Grid {
            offset_ms: 7_000,
            interval_ms: 30_000,
        };
        assert_eq!(g.first_at_or_after(0), 7_000);
        assert_eq!(g.first_at_or_after(7_000), 7_000);
        assert_eq!(g.first_at_or_after(7_001), 37_000);
        assert_eq!(g.first_at_or_after(1_000_000_000_123), 1_000_000_027_000);
        let a = Grid::new(42, Duration::from_secs(30));
        assert_eq!(a, Grid::new(42, Duration::from_secs(30)), "stable per id");
        assert!(a.offset_ms < 30_000);
    }

    #[tokio::test(start_paused = true)]
    async fn ten_thousand_slots_without_drift_and_a_busy_slot_is_missed() {
        let grid = Grid {
            offset_ms: 1_234,
            interval_ms: 1_000,
        };
        let epoch0 = 1_700_000_000_000u64;
        let start = tokio::time::Instant::now();
        let now = move || epoch0 + start.elapsed().as_millis() as u64;
        let slots = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = slots.clone();
        let stop = tokio::time::sleep(Duration::from_millis(10_000 * 1_000));
        let mut n = 0u64;
        run(
            grid,
            now,
            move |slot| {
                n += 1;
                // Checks take 0..=900 ms, and every 1000th takes 2.5 s: its next two slots are missed.
                let took = if n % 1000 == 0 { 2_500 } else { (n * 37) % 901 };
                async move {
                    let began = epoch0 + start.elapsed().as_millis() as u64;
                    tokio::time::sleep(Duration::from_millis(took)).await;
                    (slot, began)
                }
            },
            move |s| seen.lock().expect("not poisoned").push(s),
            stop,
        )
        .await;
        let slots = slots.lock().expect("not poisoned");
        let mut expected = grid.first_at_or_after(epoch0);
        let (mut checked, mut missed) = (0, 0);
        let mut times: Vec<u64> = slots
            .iter()
            .map(|s| match s {
                Slot::Checked(t, (slot, _)) => {
                    assert_eq!(t, slot);
                    checked += 1;
                    *t
                }
                Slot::Missed(t) => {
                    missed += 1;
                    *t
                }
            })
            .collect();
        times.sort_unstable();
        for t in &times {
            assert_eq!(*t, expected, "every slot on the grid, none skipped or shifted");
            expected += grid.interval_ms;
        }
        assert_eq!(times.len(), 10_000);
        assert!(missed > 0);
        assert_eq!(missed, 2 * (checked / 1000), "two missed slots after each slow check");
        // Each check began exactly at its slot, however long the ones before it took.
        for s in slots.iter() {
            if let Slot::Checked(t, (_, began)) = s {
                assert_eq!(began, t);
            }
        }
    }
}
