// Package guest defines the machine Tandem protects: the Guest interface
// that every backend (guest/kvm, guest/synth) implements, the shared
// configuration of guest flags, and helpers that work on any guest
// (digests of memory and state).
//
// It owns no policy: when to pause, what to copy and where to send it
// belong to precopy, replica and failover. It must never import those
// packages (they import it), never parse flags and never print.
package guest
