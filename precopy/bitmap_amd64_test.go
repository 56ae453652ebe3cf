//go:build amd64 && !purego

package precopy

// archKernels adds the AVX-512 kernel when this CPU has it, called
// directly so it is tested even where dispatch would pick it anyway.
func archKernels() []kernel {
	if !useAVX512 {
		return nil
	}
	return []kernel{{"avx512", func(dst, src []uint64) uint64 {
		if len(src) == 0 {
			return 0
		}
		return orCountAVX512(&dst[0], &src[0], len(src))
	}}}
}
