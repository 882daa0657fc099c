//! Persistent-data helpers shared by the catalog, the block map and the
//! space map: validated page reads and shadowed arrays of pages.

mod array;
mod page;

pub use array::PagedArray;
pub use page::read_page;
