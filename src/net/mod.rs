//! mio plumbing shared by both binaries.
