// Package smaps reads this process's /proc/self/smaps, for tests that
// check how the kernel backs a mapping (huge pages, advice).
package smaps

import (
	"bufio"
	"fmt"
	"os"
	"strings"
)

// Mapping describes the mapping holding addr: its flags (VmFlags, as
// " rd wr ... hg" with a leading space) and its huge-page kilobytes
// (AnonHugePages). found is false when no mapping holds addr.
func Mapping(addr uintptr) (flags string, hugeKB int, found bool, err error) {
	f, err := os.Open("/proc/self/smaps")
	if err != nil {
		return "", 0, false, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	in := false
	for sc.Scan() {
		line := sc.Text()
		var lo, hi uintptr
		if n, _ := fmt.Sscanf(line, "%x-%x", &lo, &hi); n == 2 && strings.Contains(line, " ") && !strings.Contains(line, ":  ") {
			if in {
				return flags, hugeKB, true, nil
			}
			in = addr >= lo && addr < hi
			continue
		}
		if !in {
			continue
		}
		if v, ok := strings.CutPrefix(line, "VmFlags:"); ok {
			flags = v
		}
		if v, ok := strings.CutPrefix(line, "AnonHugePages:"); ok {
			fmt.Sscanf(strings.TrimSpace(v), "%d", &hugeKB)
		}
	}
	return flags, hugeKB, in, sc.Err()
}

// HugeAdvised says whether flags (Mapping's) include MADV_HUGEPAGE's.
func HugeAdvised(flags string) bool { return strings.Contains(flags+" ", " hg ") }
