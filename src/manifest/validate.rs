//! Checks that need the whole directory: references between entities,
//! duplicate names, paths, certificates.
