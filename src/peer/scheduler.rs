//! Download scheduler core (pure).
