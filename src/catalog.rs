//! Volume catalog (WIP).
