//! Pool and volume management verbs. Each builds a [`Request`] and hands it to
//! [`super::request`], which asks the pool's server or opens the pool.

use anyhow::{anyhow, bail, Result};
use thinpool::control::{Request, Response};
use thinpool::{CreateOptions, Pool};

use super::{
    print, request, show, CreateArgs, InfoArgs, ListArgs, RemoveArgs, RenameArgs, ResizeArgs,
    SetArgs, SnapshotArgs, VolumeCreateArgs,
};

pub(crate) fn create(a: CreateArgs) -> Result<()> {
    let opts = CreateOptions {
        size: a.size,
        block_size: a.block_size,
    };
    let mut pool = Pool::create(&a.pool, &opts).map_err(|e| match e {
        thinpool::Error::Io(io) => anyhow!("{}: cannot create pool: {io}", a.pool.display()),
        other => other.into(),
    })?;
    if a.low_water != thinpool::pool::DEFAULT_LOW_WATER_PCT {
        pool.set_low_water(a.low_water)?;
    }
    Ok(())
}

pub(crate) fn set(a: SetArgs) -> Result<()> {
    request(&a.pool, Request::SetLowWater { pct: a.low_water })?;
    Ok(())
}

pub(crate) fn info(a: InfoArgs) -> Result<()> {
    let Response::Info(info) = request(&a.pool, Request::Info)? else {
        bail!("unexpected answer to an info request");
    };
    if a.json {
        print(&(serde_json::to_string_pretty(&info)? + "\n"))?;
    } else {
        print(&show::pool_info(&info))?;
    }
    Ok(())
}

pub(crate) fn list(a: ListArgs) -> Result<()> {
    let Response::List(volumes) = request(&a.pool, Request::List)? else {
        bail!("unexpected answer to a list request");
    };
    if a.json {
        print(&(serde_json::to_string_pretty(&volumes)? + "\n"))?;
    } else {
        print(&show::volume_table(&volumes, show::now()))?;
    }
    Ok(())
}

pub(crate) fn volume_create(a: VolumeCreateArgs) -> Result<()> {
    // Unserved, a preallocation shows its progress; a server does it alone.
    if a.preallocate && thinpool::export::control::status(&a.pool).is_none() {
        let mut pool = super::open_pool(&a.pool)?;
        let bar = super::image::progress(a.size, "preallocating");
        let bs = pool.block_size() as u64;
        pool.create_volume_preallocated(&a.name, a.size, &mut |done, _| {
            bar.set_position((done * bs).min(a.size))
        })?;
        bar.finish_and_clear();
        return Ok(());
    }
    request(
        &a.pool,
        Request::CreateVolume {
            name: a.name,
            size: a.size,
            preallocate: a.preallocate,
        },
    )?;
    Ok(())
}

/// `writable == false`: a read-only snapshot; `true`: a clone.
pub(crate) fn snapshot(a: SnapshotArgs, writable: bool) -> Result<()> {
    request(
        &a.pool,
        Request::Snapshot {
            source: a.source,
            name: a.name,
            writable,
        },
    )?;
    Ok(())
}

pub(crate) fn remove(a: RemoveArgs) -> Result<()> {
    request(&a.pool, Request::Remove { name: a.name })?;
    Ok(())
}

pub(crate) fn rename(a: RenameArgs) -> Result<()> {
    request(
        &a.pool,
        Request::Rename {
            old: a.old,
            new: a.new,
        },
    )?;
    Ok(())
}

pub(crate) fn resize(a: ResizeArgs) -> Result<()> {
    let req = match a.name {
        Some(name) => Request::Resize { name, size: a.size },
        None => Request::GrowPool { size: a.size },
    };
    request(&a.pool, req)?;
    Ok(())
}
