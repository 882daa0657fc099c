//! Persistent-data helpers shared by the catalog, the block map and the
//! space map: validated page reads, shadowed arrays of pages, and blocks
//! allocated with their host space reserved.

mod array;
mod page;
mod reserve;

pub use array::PagedArray;
pub use page::read_page;
pub use reserve::alloc_block;
