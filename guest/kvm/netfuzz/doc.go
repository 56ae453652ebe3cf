// Package netfuzz builds the micro-guest's network stack
// (guest/kvm/microguest/net.c, freestanding C) for the host with cgo, so
// its frame parser is tested and fuzzed against guest/netframe, its
// reference: the same frame must give the same reply frame (or none), the
// same counters and the same IPv4 ID on both.
//
// It is a test harness only: nothing outside tests imports it, and it
// must never carry logic of its own beyond what calling net.c needs.
// net.c, net.h and layout.h here are symbolic links to the micro-guest's
// own files, so the Go build cache sees a change to them (it does not
// follow #include outside a package). Without cgo the package is empty
// and its tests are skipped.
package netfuzz
