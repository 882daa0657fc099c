//! The gRPC face of [`Store`]: containerd's `Snapshots` service. Each call
//! runs the store's blocking work on tokio's blocking pool and maps its
//! errors to the gRPC codes containerd turns back into its errdefs
//! (NotFound, AlreadyExists, FailedPrecondition, InvalidArgument).

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;

use prost_types::Timestamp;
use tonic::{Request, Response, Status};

use super::api::{self, snapshots_server::Snapshots};
use super::record::{Kind, Record};
use super::store::{Mount, SnapError, Store};

pub struct Service {
    pub store: Arc<Store>,
}

fn status(e: SnapError) -> Status {
    match e {
        SnapError::NotFound(m) => Status::not_found(m),
        SnapError::AlreadyExists(m) => Status::already_exists(m),
        SnapError::FailedPrecondition(m) => Status::failed_precondition(m),
        SnapError::InvalidArgument(m) => Status::invalid_argument(m),
        SnapError::Internal(m) => Status::internal(m),
    }
}

/// Run blocking store work off the async workers.
async fn blocking<T: Send + 'static>(
    store: &Arc<Store>,
    f: impl FnOnce(&Store) -> Result<T, SnapError> + Send + 'static,
) -> Result<T, Status> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || f(&store))
        .await
        .map_err(|e| Status::internal(format!("snapshotter task failed: {e}")))?
        .map_err(status)
}

fn mounts(v: Vec<Mount>) -> Vec<api::Mount> {
    v.into_iter()
        .map(|m| api::Mount {
            r#type: m.fstype,
            source: m.source,
            target: String::new(),
            options: m.options,
        })
        .collect()
}

fn ts(ns: i64) -> Option<Timestamp> {
    Some(Timestamp {
        seconds: ns.div_euclid(1_000_000_000),
        nanos: ns.rem_euclid(1_000_000_000) as i32,
    })
}

fn info(r: Record) -> api::Info {
    let kind = match r.kind {
        Kind::View => api::Kind::View,
        Kind::Active => api::Kind::Active,
        Kind::Committed => api::Kind::Committed,
    };
    api::Info {
        name: r.key,
        parent: r.parent,
        kind: kind as i32,
        created_at: ts(r.created_ns),
        updated_at: ts(r.updated_ns),
        labels: r.labels.into_iter().collect(),
    }
}

fn sorted(m: HashMap<String, String>) -> BTreeMap<String, String> {
    m.into_iter().collect()
}

type ListStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<api::ListSnapshotsResponse, Status>> + Send>>;

/// Infos per List message: containerd streams them in batches too.
const LIST_BATCH: usize = 100;

#[tonic::async_trait]
impl Snapshots for Service {
    async fn prepare(
        &self,
        req: Request<api::PrepareSnapshotRequest>,
    ) -> Result<Response<api::PrepareSnapshotResponse>, Status> {
        let r = req.into_inner();
        let m = blocking(&self.store, move |s| {
            s.prepare(Kind::Active, &r.key, &r.parent, sorted(r.labels))
        })
        .await?;
        Ok(Response::new(api::PrepareSnapshotResponse {
            mounts: mounts(m),
        }))
    }

    async fn view(
        &self,
        req: Request<api::ViewSnapshotRequest>,
    ) -> Result<Response<api::ViewSnapshotResponse>, Status> {
        let r = req.into_inner();
        let m = blocking(&self.store, move |s| {
            s.prepare(Kind::View, &r.key, &r.parent, sorted(r.labels))
        })
        .await?;
        Ok(Response::new(api::ViewSnapshotResponse {
            mounts: mounts(m),
        }))
    }

    async fn mounts(
        &self,
        req: Request<api::MountsRequest>,
    ) -> Result<Response<api::MountsResponse>, Status> {
        let r = req.into_inner();
        let m = blocking(&self.store, move |s| s.mounts(&r.key)).await?;
        Ok(Response::new(api::MountsResponse { mounts: mounts(m) }))
    }

    async fn commit(
        &self,
        req: Request<api::CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = req.into_inner();
        blocking(&self.store, move |s| {
            s.commit(&r.name, &r.key, sorted(r.labels))
        })
        .await?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        req: Request<api::RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = req.into_inner();
        blocking(&self.store, move |s| s.remove(&r.key)).await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        req: Request<api::StatSnapshotRequest>,
    ) -> Result<Response<api::StatSnapshotResponse>, Status> {
        let r = req.into_inner();
        let rec = blocking(&self.store, move |s| s.stat(&r.key)).await?;
        Ok(Response::new(api::StatSnapshotResponse {
            info: Some(info(rec)),
        }))
    }

    async fn update(
        &self,
        req: Request<api::UpdateSnapshotRequest>,
    ) -> Result<Response<api::UpdateSnapshotResponse>, Status> {
        let r = req.into_inner();
        let i = r
            .info
            .ok_or_else(|| Status::invalid_argument("update without info"))?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let rec = blocking(&self.store, move |s| {
            s.update(&i.name, sorted(i.labels), &paths)
        })
        .await?;
        Ok(Response::new(api::UpdateSnapshotResponse {
            info: Some(info(rec)),
        }))
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        req: Request<api::ListSnapshotsRequest>,
    ) -> Result<Response<ListStream>, Status> {
        let r = req.into_inner();
        let recs = blocking(&self.store, move |s| s.list(&r.filters)).await?;
        let infos: Vec<api::Info> = recs.into_iter().map(info).collect();
        let batches: Vec<Result<api::ListSnapshotsResponse, Status>> = infos
            .chunks(LIST_BATCH)
            .map(|c| Ok(api::ListSnapshotsResponse { info: c.to_vec() }))
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(batches))))
    }

    async fn usage(
        &self,
        req: Request<api::UsageRequest>,
    ) -> Result<Response<api::UsageResponse>, Status> {
        let r = req.into_inner();
        let (size, inodes) = blocking(&self.store, move |s| s.usage(&r.key)).await?;
        Ok(Response::new(api::UsageResponse { size, inodes }))
    }

    async fn cleanup(&self, _req: Request<api::CleanupRequest>) -> Result<Response<()>, Status> {
        blocking(&self.store, |s| s.cleanup()).await?;
        Ok(Response::new(()))
    }
}
