//go:build !amd64 || purego

package precopy

// orCountWords is the kernel behind OrCount's dense runs: dst |= src,
// returning the number of bits set in src and not in dst.
func orCountWords(dst, src []uint64) uint64 { return orCountWordsGeneric(dst, src) }
