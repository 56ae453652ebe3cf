// Package logging builds the slog logger of a long-running tandem
// command from its --log-format and --log-level flags.
//
// It owns only the choice of handler and level; it must never decide what
// is logged (raft's lines are mapped to levels and rate-limited in
// package failover) nor write anywhere but the writer it is given.
package logging
