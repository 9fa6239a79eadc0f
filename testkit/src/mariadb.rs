//! The private MariaDB server of a test process (to be written).
