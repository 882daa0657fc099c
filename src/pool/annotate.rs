//! Annotations of volumes: opaque bytes a higher layer keeps with a volume
//! (the containerd snapshotter's records), committed with the catalog.

use super::{Pool, VolumeId};
use crate::error::Result;

impl Pool {
    /// A volume's annotation, if it has one.
    pub fn annotation(&self, id: VolumeId) -> Option<&[u8]> {
        self.annotations.get(id)
    }

    /// Ids of the volumes that carry an annotation.
    pub fn annotated(&self) -> Vec<VolumeId> {
        self.annotations.ids().collect()
    }

    /// Replace (`None`: drop) a volume's annotation and, with `freeze`, make
    /// the volume read-only, in one commit.
    pub fn annotate(
        &mut self,
        id: VolumeId,
        annotation: Option<Vec<u8>>,
        freeze: bool,
    ) -> Result<()> {
        self.stage_annotation(id, annotation, freeze)?;
        self.commit()
    }

    /// `annotate` without the commit: a served pool commits it outside the
    /// engine lock (`SharedPool::change`).
    pub fn stage_annotation(
        &mut self,
        id: VolumeId,
        annotation: Option<Vec<u8>>,
        freeze: bool,
    ) -> Result<()> {
        self.check_mutable()?;
        self.catalog.get(id)?;
        self.annotations.set(id, annotation)?;
        if freeze {
            self.catalog.get_mut(id)?.read_only = true;
        }
        Ok(())
    }
}
