//! The manager: a pure membership registry and the event loop around it.
