//! The snapshot records of the pool, decoded once and kept by key, with the
//! number of children of each key.
//!
//! A cache of the pool, never a second source of truth: an entry is used only
//! after its bytes have been compared with its volume's annotation (no
//! decoding), and the whole index is read again from the pool when one
//! differs — a volume removed or renamed through the CLI, or a change whose
//! commit failed (then the index is marked stale). New records are written
//! only by the snapshotter, which adds them here after their commit, so a key
//! missing here is missing from the pool.

use std::collections::HashMap;

use super::record::{Kind, Record};
use crate::pool::{Pool, VolumeId};

/// A snapshot: its volume, its record, and the record's bytes as stored.
#[derive(Debug, Clone)]
pub struct Entry {
    pub id: VolumeId,
    pub rec: Record,
    raw: Vec<u8>,
}

impl Entry {
    pub fn new(id: VolumeId, rec: Record) -> Entry {
        let raw = rec.encode();
        Entry { id, rec, raw }
    }

    /// Is this still what the pool holds for the volume?
    fn current(&self, pool: &Pool) -> bool {
        pool.annotation(self.id) == Some(&self.raw[..])
    }
}

#[derive(Debug, Default)]
pub struct Index {
    by_key: HashMap<String, Entry>,
    children: HashMap<String, usize>,
    /// Annotations in the pool when last counted (undecodable ones included).
    annotated: usize,
    stale: bool,
}

impl Index {
    /// Read every record of the pool (one that cannot be decoded is reported
    /// and skipped: it is not containerd's).
    pub fn load(pool: &Pool) -> Index {
        let mut ix = Index::default();
        for id in pool.annotated() {
            ix.annotated += 1;
            let Some(raw) = pool.annotation(id) else {
                continue;
            };
            match Record::decode(raw) {
                Ok(rec) => ix.add(Entry {
                    id,
                    rec,
                    raw: raw.to_vec(),
                }),
                Err(e) => eprintln!("thinpool snapshotter: volume #{id}: {e}"),
            }
        }
        ix
    }

    /// A change was attempted and may or may not have been committed: read
    /// the pool again before the next use.
    pub fn mark_stale(&mut self) {
        self.stale = true;
    }

    fn reload(&mut self, pool: &Pool) {
        *self = Index::load(pool);
    }

    fn fresh(&mut self, pool: &Pool) {
        if self.stale {
            self.reload(pool);
        }
    }

    fn add(&mut self, e: Entry) {
        if !e.rec.parent.is_empty() {
            *self.children.entry(e.rec.parent.clone()).or_insert(0) += 1;
        }
        self.by_key.insert(e.rec.key.clone(), e);
    }

    fn take(&mut self, key: &str) -> Option<Entry> {
        let e = self.by_key.remove(key)?;
        if let Some(n) = self.children.get_mut(&e.rec.parent) {
            *n -= 1;
            if *n == 0 {
                self.children.remove(&e.rec.parent);
            }
        }
        Some(e)
    }

    /// The snapshot named `key`, checked against the pool.
    pub fn get(&mut self, pool: &Pool, key: &str) -> Option<Entry> {
        self.fresh(pool);
        match self.by_key.get(key) {
            Some(e) if e.current(pool) => Some(e.clone()),
            Some(_) => {
                self.reload(pool);
                self.by_key.get(key).cloned()
            }
            None => None,
        }
    }

    /// Does any snapshot have `key` as its parent?
    pub fn has_children(&mut self, pool: &Pool, key: &str) -> bool {
        self.fresh(pool);
        if !self.children.contains_key(key) {
            return false;
        }
        let gone = self
            .by_key
            .values()
            .any(|e| e.rec.parent == key && !e.current(pool));
        if gone {
            self.reload(pool);
        }
        self.children.contains_key(key)
    }

    /// A committed layer with this `containerd.io/snapshot.ref` label and parent.
    pub fn committed_ref(
        &mut self,
        pool: &Pool,
        label: &str,
        target: &str,
        parent: &str,
    ) -> Option<Entry> {
        self.fresh(pool);
        let key = self
            .by_key
            .values()
            .find(|e| {
                e.rec.kind == Kind::Committed
                    && e.rec.parent == parent
                    && e.rec.labels.get(label).map(String::as_str) == Some(target)
            })?
            .rec
            .key
            .clone();
        self.get(pool, &key)
    }

    /// Every record, checked against the pool (read again when any differs).
    pub fn all(&mut self, pool: &Pool) -> Vec<Record> {
        self.fresh(pool);
        if pool.annotated().len() != self.annotated
            || self.by_key.values().any(|e| !e.current(pool))
        {
            self.reload(pool);
        }
        self.by_key.values().map(|e| e.rec.clone()).collect()
    }

    /// A record committed for a new snapshot.
    pub fn insert(&mut self, e: Entry) {
        self.annotated += 1;
        self.add(e);
    }

    /// The record of `old_key` replaced (Commit renames, Update relabels).
    pub fn replace(&mut self, old_key: &str, e: Entry) {
        self.take(old_key);
        self.add(e);
    }

    /// The snapshot's volume was removed.
    pub fn remove(&mut self, key: &str) {
        if self.take(key).is_some() {
            self.annotated = self.annotated.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(key: &str, parent: &str) -> Record {
        Record {
            kind: Kind::Committed,
            key: key.into(),
            parent: parent.into(),
            created_ns: 1,
            updated_ns: 1,
            labels: Default::default(),
        }
    }

    #[test]
    fn children_are_counted_through_replace_and_remove() {
        let mut ix = Index::default();
        ix.insert(Entry::new(1, rec("a", "")));
        ix.insert(Entry::new(2, rec("b", "a")));
        ix.insert(Entry::new(3, rec("c", "a")));
        assert_eq!(ix.children.get("a"), Some(&2));
        ix.replace("b", Entry::new(2, rec("b2", "a")));
        assert_eq!(ix.children.get("a"), Some(&2));
        ix.remove("b2");
        ix.remove("c");
        assert!(!ix.children.contains_key("a"));
        assert_eq!(ix.annotated, 1);
        assert_eq!(ix.by_key.len(), 1);
    }
}
