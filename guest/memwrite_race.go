//go:build race

package guest

import (
	"runtime"
	"unsafe"
)

// raceCopy tells the race detector that copy(dst, src) happens here: the
// kernel's writes (MemWriter) are invisible to it otherwise.
func raceCopy(dst, src []byte) {
	if len(src) == 0 || len(dst) == 0 {
		return
	}
	runtime.RaceReadRange(unsafe.Pointer(unsafe.SliceData(src)), len(src))
	runtime.RaceWriteRange(unsafe.Pointer(unsafe.SliceData(dst)), len(dst))
}
