//go:build !race

package guest

// raceCopy is the race build's annotation of a kernel-side copy; nothing
// without -race.
func raceCopy(dst, src []byte) {}
