//go:build amd64 && !purego

package precopy

func orCountWords(dst, src []uint64) uint64 { return orCountWordsGeneric(dst, src) }
