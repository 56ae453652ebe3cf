package precopy

type kernel struct {
	name string
	fn   func(dst, src []uint64) uint64
}

// kernels lists the portable kernel and whatever orCountWords dispatches to
// on this machine, so the portable path stays tested on every architecture.
func kernels() []kernel {
	return append([]kernel{{"generic", orCountWordsGeneric}, {"dispatch", orCountWords}}, archKernels()...)
}
