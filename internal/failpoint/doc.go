// Package failpoint names the points in Tandem's durability path where a
// test may make things go wrong: before and after each fsync, before a
// rename, between an epoch's disk and its memory, before an
// acknowledgement is sent, before output is released.
//
// A Point is declared once, as a package variable, with New; the code
// calls Hit at the point. Disarmed (always, outside tests) Hit is one
// atomic load and returns nil, so no build tag is needed. A test arms a
// point with Enable, giving the action to run there: typically it crashes
// a vfs.MemFS and returns an error, so the code under test stops at that
// exact step as a power loss would stop it.
//
// It must never do anything a production build can observe: nothing arms
// a point but a test, and a disarmed point has no effect at all.
package failpoint
