//go:build amd64 && !purego

package precopy

func archKernels() []kernel { return nil }
