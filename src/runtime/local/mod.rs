//! The local runtime: one bubblewrap sandbox per machine, with a persistent
//! root of its own, for Linux machines without KVM and for CI.
