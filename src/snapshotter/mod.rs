//! containerd snapshotter (proxy plugin over gRPC on a Unix socket).

#[allow(clippy::all, missing_docs)]
pub mod api {
    tonic::include_proto!("containerd.services.snapshots.v1");
}
