//! Model-based property test: random sequences of create / snapshot / clone /
//! write / discard / remove / rename / resize / commit / reopen against a
//! plain in-memory model. After every operation each volume must read back
//! exactly what the model holds, and `check()` (every block's refcount equals
//! the references found by walking every map) must be clean. After removing
//! everything, nothing but metadata is left allocated.
//!
//! With the intent log (`engine_matches_model_with_the_intent_log`) the
//! pool logs every map change, halves of a few records fill and restart,
//! `Flush` is one fdatasync, and `Kill` drops the pool without a commit —
//! a killed server: the page cache (the memory storage) keeps what was
//! written, and the reopened pool, after replaying its log, must hold every
//! acknowledged write exactly.

use std::collections::BTreeMap;
use std::path::Path;

use proptest::prelude::*;
use thinpool::io::MemStorage;
use thinpool::{CreateOptions, Error, Pool};

use super::{BS, CASES, GROW_BLOCKS, POOL_SIZE};
const NAMES: usize = 6;

#[derive(Debug, Clone)]
enum Op {
    Create {
        name: usize,
        blocks: u64,
    },
    Snapshot {
        src: usize,
        name: usize,
        writable: bool,
    },
    Write {
        vol: usize,
        at: u64,
        len: u64,
        seed: u8,
    },
    Discard {
        vol: usize,
        at: u64,
        len: u64,
    },
    Remove {
        vol: usize,
    },
    Rename {
        vol: usize,
        name: usize,
    },
    Grow {
        vol: usize,
        extra: u64,
    },
    Commit,
    Reopen,
    Flush,
    /// Drop the pool without committing, then open it again.
    Kill,
}

fn op() -> impl Strategy<Value = Op> {
    let n = 0..NAMES;
    prop_oneof![
        2 => (n.clone(), 1u64..48).prop_map(|(name, blocks)| Op::Create { name, blocks }),
        3 => (n.clone(), n.clone(), any::<bool>()).prop_map(|(src, name, writable)| Op::Snapshot { src, name, writable }),
        8 => (n.clone(), 0u64..1000, 1u64..3 * BS, any::<u8>()).prop_map(|(vol, at, len, seed)| Op::Write { vol, at, len, seed }),
        3 => (n.clone(), 0u64..1000, 1u64..8 * BS).prop_map(|(vol, at, len)| Op::Discard { vol, at, len }),
        2 => n.clone().prop_map(|vol| Op::Remove { vol }),
        1 => (n.clone(), n.clone()).prop_map(|(vol, name)| Op::Rename { vol, name }),
        1 => (n.clone(), 0u64..GROW_BLOCKS * BS).prop_map(|(vol, extra)| Op::Grow { vol, extra }),
        1 => Just(Op::Commit),
        1 => Just(Op::Reopen),
        1 => Just(Op::Flush),
        1 => Just(Op::Kill),
    ]
}

struct Vol {
    data: Vec<u8>,
    read_only: bool,
}

fn name(i: usize) -> String {
    format!("vol{i}")
}

/// Open `mem`, with the intent log on (`log`: at most that many records
/// per half) or off.
fn open(mem: &MemStorage, log: Option<u32>) -> Pool {
    let mut p = Pool::open_with(Box::new(mem.clone()), Path::new("mem")).unwrap();
    if let Some(n) = log {
        p.set_logging(true);
        p.limit_log(n);
    }
    p
}

fn run(ops: Vec<Op>, log: Option<u32>) {
    let mem = MemStorage::new();
    let opts = CreateOptions {
        size: POOL_SIZE,
        block_size: BS as u32,
    };
    let mut pool = Some(Pool::create_with(Box::new(mem.clone()), Path::new("mem"), &opts).unwrap());
    if let Some(n) = log {
        let p = pool.as_mut().unwrap();
        p.set_logging(true);
        p.limit_log(n);
    }
    let mut model: BTreeMap<String, Vol> = BTreeMap::new();
    for (step, op) in ops.into_iter().enumerate() {
        let p = pool.as_mut().unwrap();
        match op {
            Op::Create { name: n, blocks } => {
                let r = p.create_volume(&name(n), blocks * BS);
                match model.entry(name(n)) {
                    std::collections::btree_map::Entry::Occupied(_) => {
                        assert!(matches!(r, Err(Error::VolumeExists(_))))
                    }
                    std::collections::btree_map::Entry::Vacant(e) => {
                        r.unwrap();
                        e.insert(Vol {
                            data: vec![0; (blocks * BS) as usize],
                            read_only: false,
                        });
                    }
                }
            }
            Op::Snapshot {
                src,
                name: n,
                writable,
            } => {
                let r = p.snapshot(&name(src), &name(n), writable);
                match (model.get(&name(src)), model.contains_key(&name(n))) {
                    (None, _) => assert!(r.is_err()),
                    (Some(_), true) => assert!(matches!(r, Err(Error::VolumeExists(_)))),
                    (Some(v), false) => {
                        r.unwrap();
                        let data = v.data.clone();
                        model.insert(
                            name(n),
                            Vol {
                                data,
                                read_only: !writable,
                            },
                        );
                    }
                }
            }
            Op::Write { vol, at, len, seed } => {
                let Some(v) = model.get_mut(&name(vol)) else {
                    continue;
                };
                // `at` is a position in thousandths of the volume, so grown
                // (multi-level) maps are written all over.
                let offset = at * v.data.len() as u64 / 1000;
                let id = p.lookup(&name(vol)).unwrap();
                let buf: Vec<u8> = (0..len).map(|i| seed.wrapping_add(i as u8 | 1)).collect();
                let r = p.write(id, offset, &buf);
                if v.read_only {
                    assert!(matches!(r, Err(Error::ReadOnly(_))), "{r:?}");
                } else if offset + len > v.data.len() as u64 {
                    assert!(matches!(r, Err(Error::OutOfRange { .. })), "{r:?}");
                } else {
                    r.unwrap();
                    v.data[offset as usize..(offset + len) as usize].copy_from_slice(&buf);
                }
            }
            Op::Discard { vol, at, len } => {
                let Some(v) = model.get_mut(&name(vol)) else {
                    continue;
                };
                let offset = at * v.data.len() as u64 / 1000;
                let id = p.lookup(&name(vol)).unwrap();
                let r = p.discard(id, offset, len);
                if v.read_only {
                    assert!(r.is_err());
                } else if offset + len > v.data.len() as u64 {
                    assert!(matches!(r, Err(Error::OutOfRange { .. })), "{r:?}");
                } else {
                    r.unwrap();
                    v.data[offset as usize..(offset + len) as usize].fill(0);
                }
            }
            Op::Remove { vol } => {
                let r = p.remove_volume(&name(vol));
                assert_eq!(r.is_ok(), model.remove(&name(vol)).is_some());
            }
            Op::Rename { vol, name: n } => {
                let r = p.rename_volume(&name(vol), &name(n));
                if model.contains_key(&name(vol)) && !model.contains_key(&name(n)) {
                    r.unwrap();
                    let v = model.remove(&name(vol)).unwrap();
                    model.insert(name(n), v);
                } else {
                    assert!(r.is_err());
                }
            }
            Op::Grow { vol, extra } => {
                let Some(v) = model.get_mut(&name(vol)) else {
                    continue;
                };
                let size = v.data.len() as u64 + extra;
                let r = p.resize_volume(&name(vol), size);
                if v.read_only {
                    assert!(matches!(r, Err(Error::ReadOnly(_))));
                } else {
                    r.unwrap();
                    v.data.resize(size as usize, 0);
                }
            }
            Op::Commit => p.commit().unwrap(),
            Op::Flush => p.flush().unwrap(),
            Op::Reopen => {
                pool.take().unwrap().close().unwrap();
                pool = Some(open(&mem, log));
            }
            Op::Kill if log.is_some() => {
                let mut p = pool.take().unwrap();
                let logged = p.log_records() > 0;
                let g = p.generation();
                // Dropped with nothing committed: what a SIGKILL leaves.
                p.fail("killed");
                drop(p);
                let p = open(&mem, log);
                if logged {
                    assert!(p.log_replay().is_some(), "step {step}: no replay");
                }
                assert!(p.generation() <= g + 1, "step {step}");
                pool = Some(p);
            }
            Op::Kill => {
                // Without the log nothing survives a kill uncommitted:
                // the model would not hold; close instead.
                pool.take().unwrap().close().unwrap();
                pool = Some(open(&mem, log));
            }
        }
        verify(pool.as_mut().unwrap(), &model, step);
    }
    // Remove everything: only the pool's own metadata may remain.
    let p = pool.as_mut().unwrap();
    for n in model.keys() {
        p.remove_volume(n).unwrap();
    }
    p.commit().unwrap();
    let info = p.info().unwrap();
    assert_eq!(
        info.data_used_bytes, 0,
        "data left allocated after removing every volume"
    );
    assert_eq!(info.volumes, 0);
    let r = p.check().unwrap();
    assert!(r.is_clean(), "{:#?}", r.problems);
    assert_eq!(r.map_nodes, 0, "map nodes left allocated");
}

fn verify(p: &mut Pool, model: &BTreeMap<String, Vol>, step: usize) {
    let list = p.list().unwrap();
    assert_eq!(list.len(), model.len(), "step {step}: volume count");
    for (n, v) in model {
        let id = p.lookup(n).unwrap();
        let mut buf = vec![0u8; v.data.len()];
        p.read(id, 0, &mut buf).unwrap();
        assert!(
            buf == v.data,
            "step {step}: contents of {n} differ from the model"
        );
        let info = list.iter().find(|i| &i.name == n).unwrap();
        assert_eq!(info.read_only, v.read_only);
        assert_eq!(info.virtual_size, v.data.len() as u64);
        assert!(info.exclusive_bytes <= info.mapped_bytes);
    }
    let r = p.check().unwrap();
    assert!(r.is_clean(), "step {step}: {:#?}", r.problems);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: std::env::var("MODEL_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(CASES), max_shrink_iters: 2000, ..ProptestConfig::default() })]
    #[test]
    fn engine_matches_model(ops in prop::collection::vec(op(), 20..80)) {
        run(ops, None);
    }

    #[test]
    fn engine_matches_model_with_the_intent_log(
        ops in prop::collection::vec(prop_oneof![5 => op(), 1 => Just(Op::Kill)], 20..80),
        per_half in 2u32..40,
    ) {
        run(ops, Some(per_half));
    }
}
