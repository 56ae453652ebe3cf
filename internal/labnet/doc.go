// Package labnet makes a small network on this host: a Linux bridge and a
// client network namespace joined to it by a veth pair, the client at
// ClientIP/24. TAP devices a node opens attach to the bridge; the client
// reaches them from its namespace. Tests use it through internal/netlab,
// `tandem demo` directly.
//
// It owns the names it makes (a per-process prefix, so two programs at
// once do not collide) and nothing else: it must never touch an interface
// it did not create. A name already in use is someone else's: Make
// leaves it alone and tries another prefix. Every ip command it runs has
// a deadline, and Close removes everything Make made (only that), even
// after a partial Make.
package labnet
