//! At Commit: unmap the dead log of a layer's ext4 journal.
//!
//! containerd has unmounted the layer's file system and its loop device is
//! gone, so a clean journal (no needs_recovery, jbd2 `s_start == 0`) will
//! never be read past its superblock: a mount starts a new log, e2fsck
//! replays nothing. Its log blocks (~4 MiB per layer after an unpack) would
//! otherwise stay allocated in every committed layer; every container writes
//! its own journal blocks anyway. The template's journal is unwritten
//! (`lazy_journal_init`), so a punched journal reads as the template's did.
//!
//! The unmap is the engine's discard (the export's punch-hole path, in the
//! intent log and the crash harness), made durable by the commit that
//! freezes the volume. Anything unexpected skips the punch, with the reason
//! on stderr: the commit goes on either way.

use super::ext4::{self, DeadLog};
use crate::export::ServerHandle;
use crate::pool::VolumeId;

/// What [`punch_dead_log`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Punched {
    /// Bytes of log unmapped (mapped bytes of the volume before − after).
    Unmapped(u64),
    /// Left alone, and why.
    Skipped(String),
}

/// Unmap the dead journal log of volume `id`, which nothing holds open.
pub fn punch_dead_log(server: &ServerHandle, id: VolumeId) -> Punched {
    let (size, pool_block, mapped_before) = {
        let pool = server.pool();
        let info = match pool.volume_name(id).and_then(|n| pool.volume_info(&n)) {
            Ok(i) => i,
            Err(e) => return Punched::Skipped(e.to_string()),
        };
        if info.read_only {
            return Punched::Skipped("the volume is read-only".into());
        }
        // A discard there zeroes in place: writes, and no space back.
        if info.preallocated {
            return Punched::Skipped("the volume is preallocated".into());
        }
        if server.in_use(id) {
            return Punched::Skipped("the volume is open".into());
        }
        (
            info.virtual_size,
            pool.block_size() as u64,
            info.mapped_bytes,
        )
    };
    let mut read = |off: u64, buf: &mut [u8]| server.read(id, off, buf).map_err(|e| e.to_string());
    let log: DeadLog = match ext4::dead_log(&mut read, size) {
        Ok(l) => l,
        Err(e) => return Punched::Skipped(e.to_string()),
    };
    // Nothing may have opened the file since the checks above: decided
    // under the engine lock, with the discards.
    match server.discard_unless_open(id, &log.pool_ranges(pool_block)) {
        Ok(true) => {}
        Ok(false) => return Punched::Skipped("the volume was opened".into()),
        // What was unmapped reads as zeros: still a clean journal.
        Err(e) => return Punched::Skipped(format!("discard: {e}")),
    }
    let pool = server.pool();
    let after = pool
        .volume_name(id)
        .and_then(|n| pool.volume_info(&n))
        .map(|i| i.mapped_bytes)
        .unwrap_or(mapped_before);
    Punched::Unmapped(mapped_before.saturating_sub(after))
}
