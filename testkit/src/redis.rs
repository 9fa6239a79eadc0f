//! The private Redis server of a test process (to be written).
