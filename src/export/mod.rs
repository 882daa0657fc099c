//! Exporting volumes to the kernel: a FUSE file per volume, loop devices on
//! top, and the control socket through which the CLI talks to a serving pool.

pub mod control;
