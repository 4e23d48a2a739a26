//! Process-level concerns: signals (SIGINT/SIGTERM/SIGHUP), sd_notify (READY, WATCHDOG, STATUS,
//! STOPPING) and the shutdown flag shared by every thread.
